"""Train the ReMA agents with multi-agent RL.

    python launch/train.py --config=configs/default.py --workdir=runs/default
    python launch/train.py --config=configs/default.py --config.rl.loop.steps=4 --workdir=/tmp/r
    python launch/train.py --config=configs/rl_from_base.py --config.loop.steps=4 --workdir=/tmp/r

A config with ``sft`` and ``rl`` sections (``configs/default.py``) runs the paper's bootstrap as
one job (``rema_jax.training.bootstrap``): held-out eval of the base model, SFT warm start, RL from
it, held-out eval after each; finished stages are skipped when the command is re-run. Any other
config is one RL run.

The config is an ml_collections file; every ``--config.x.y=value`` override is validated (wrong
key, type or value → a clear error) before any model is loaded. Re-running with the same
``--workdir`` resumes from the latest checkpoint.

Multi-device and multi-host: ``--config.mesh.data/fsdp/tensor`` lay the run out on a device mesh
(default: every device on ``data``). On a pod slice (or multi-node GPU with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) run the same command on every host
(``launch/tpu_pod.sh``); ``jax.distributed`` is initialised here before any device is touched.

Compiled programs are kept in a persistent cache (``--compilation_cache=DIR``, default
``~/.cache/rema_jax/xla``; ``--compilation_cache=off`` disables it), set up by ``run_main`` before
``main`` without touching a device, so a second identical run skips most of its compilation.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from rema_jax.cli import run_main

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory: checkpoints, metrics.jsonl, tb/, plots.")
flags.DEFINE_bool("resume", True, "Resume from the latest checkpoint in --workdir if there is one.")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from rema_jax.sharding import maybe_initialize

    maybe_initialize()  # jax.distributed on multi-process runs; must precede any device use
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from rema_jax.config_utils import ConfigError
    from rema_jax.training import bootstrap
    from rema_jax.training.config import load_train_config
    from rema_jax.training.loop import train

    staged = bootstrap.is_bootstrap_config(FLAGS.config)  # sft + rl sections: base → SFT → RL
    try:
        config = (bootstrap.load_bootstrap_config if staged else load_train_config)(FLAGS.config)
    except ConfigError as e:
        raise ConfigError(f"invalid config {FLAGS['config'].config_filename!r}: {e}") from None
    if staged:
        if not FLAGS.resume:
            raise ConfigError(
                "--noresume: a bootstrap job always continues its finished stages; pass a new --workdir to start over"
            )
        bootstrap.run_bootstrap(config, FLAGS.workdir)
    else:
        train(config, FLAGS.workdir, resume=FLAGS.resume)


if __name__ == "__main__":
    run_main(main)
