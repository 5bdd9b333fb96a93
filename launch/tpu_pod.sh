#!/usr/bin/env bash
# Launch a rema_jax training run on every worker of a Cloud TPU pod slice (one process per host).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a PROJECT=my-proj \
#   REPO_URL=https://github.com/<you>/rema_jax.git REF=main \
#   WORKDIR=gs://my-bucket/runs/rema-1 CONFIG=configs/default.py \
#   bash launch/tpu_pod.sh [--config.loop.steps=100 ...]     # extra args go to launch/train.py
#
# What it does on every worker (gcloud ... tpu-vm ssh --worker=all): clone/update the repo, install
# jax[tpu] and the package, then start launch/train.py with the same arguments. The TPU runtime tells
# JAX the coordinator and each process's id, and launch code calls
# rema_jax.sharding.maybe_initialize() -> jax.distributed.initialize() before touching devices.
# WORKDIR must be storage all hosts share (a gs:// bucket or NFS): orbax writes checkpoints from
# every host; only process 0 writes metrics/plots.
# Set STAGE=install to only install, STAGE=run to only run (faster re-launches), DRY_RUN=1 to print.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
: "${WORKDIR:?set WORKDIR to shared storage, e.g. gs://bucket/runs/name}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
REPO_URL="${REPO_URL:?set REPO_URL (git URL of this repository)}"
REF="${REF:-main}"
CONFIG="${CONFIG:-configs/default.py}"
STAGE="${STAGE:-all}"
REMOTE_DIR="${REMOTE_DIR:-\$HOME/rema_jax}"
EXTRA_ARGS="$*"

install_cmd="set -e; \
if [ -d ${REMOTE_DIR}/.git ]; then git -C ${REMOTE_DIR} fetch -q origin && git -C ${REMOTE_DIR} checkout -q ${REF} && git -C ${REMOTE_DIR} pull -q --ff-only || true; \
else git clone -q ${REPO_URL} ${REMOTE_DIR} && git -C ${REMOTE_DIR} checkout -q ${REF}; fi; \
python3 -m pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
python3 -m pip install -q -e ${REMOTE_DIR}"

# Environment for the run: no HF downloads mid-run on 32 hosts at once (pre-stage weights on the
# shared disk or a bucket and point the config at them), quiet TF/XLA logs, persistent compile cache.
run_env="export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=2 \
JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax_compile JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=5"
run_cmd="set -e; ${run_env}; cd ${REMOTE_DIR}; \
python3 launch/train.py --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA_ARGS} 2>&1 | tee -a \$HOME/rema_train.log"

ssh_all() {
  local cmd="$1"
  local args=(compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="${cmd}")
  [ -n "${PROJECT}" ] && args+=(--project="${PROJECT}")
  if [ "${DRY_RUN:-0}" = "1" ]; then printf 'gcloud'; printf ' %q' "${args[@]}"; echo; else gcloud "${args[@]}"; fi
}

case "${STAGE}" in
  install) ssh_all "${install_cmd}" ;;
  run) ssh_all "${run_cmd}" ;;
  all) ssh_all "${install_cmd}"; ssh_all "${run_cmd}" ;;
  *) echo "STAGE must be install, run or all (got ${STAGE})" >&2; exit 2 ;;
esac
