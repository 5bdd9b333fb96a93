"""The ReMA multi-agent RL trainer: the glue of one step, evaluation, checkpoints and the loop.

data → rollout → reward → advantage → loss → update → checkpoint, one module per arrow:
  * ``AgentLayout`` (layout.py): roles → agents, trainable trees and constants, policy/reference views;
  * ``RolloutWorker`` (rollout_worker.py): sampler + encoder + grader, ``collect`` → ``Experience``;
  * ``role_batches.py``: experience → one ``RoleBatch`` per trained role → advantages;
  * ``Learner`` (learner.py): RL state, log-prob passes, the donated jitted update, mesh placement;
  * ``curriculum.py``: Algorithm 1's question filter at each phase start.

One step (``Trainer.step``): the schedule names the trained agent(s) (the others are frozen); at a
phase start the curriculum rebuilds the question pool; both agents roll out; the trained roles' rows
get old (and reference) log-probs under the training graph and advantages; one update steps the
trained agent(s); metrics go to JSONL + TensorBoard and an orbax checkpoint is written.

With more than one device the run is laid out on a mesh (``config.mesh``) by the sharding rules; with
several processes each host rolls out its own questions (``host_rows``), host-local metrics are
averaged over hosts, and only process 0 writes files (orbax checkpoints are written by all).
Everything random is derived from ``(loop.seed, step)``, and the data position and curriculum pool
are checkpointed, so a killed run resumes exactly.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax

from rema_jax import sharding
from rema_jax.errors import UserError
from rema_jax.host_memory import PeakRss, release_memory
from rema_jax.tasks.types import Task
from rema_jax.training import experience as experience_lib
from rema_jax.training import learner as learner_lib
from rema_jax.training.base_model import build_base_model, stable_seed
from rema_jax.training.checkpoint import CheckpointManager
from rema_jax.training.config import TrainConfig
from rema_jax.training.curriculum import curriculum_pool, in_success_band  # noqa: F401  (re-exported)
from rema_jax.training.data_iterator import TaskIterator
from rema_jax.training.layout import AgentLayout
from rema_jax.training.learner import Learner
from rema_jax.training.memory_check import check_memory
from rema_jax.training.role_batches import RoleBatch, build_role_batch, step_advantages
from rema_jax.training.rollout_worker import RolloutWorker
from rema_jax.training.schedules import Phase, phase_at
from rema_jax.training.task_data import heldout_subset, load_tasks  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

RewardOverride = Callable[[experience_lib.Experience], experience_lib.Experience]


class NonFiniteUpdateError(learner_lib.NonFiniteUpdateError, UserError):
    """The loss or a gradient was NaN/inf; the update was not applied (the message names the last
    good checkpoint)."""


class Trainer:
    """One training run: a layout, a rollout worker, a learner, the data position and checkpoints."""

    def __init__(
        self, config: TrainConfig, workdir: str, *, reward_override: RewardOverride | None = None, tokenizer=None
    ):
        cfg = self.config = config
        self.workdir = os.path.abspath(workdir)
        self.reward_override = reward_override
        os.makedirs(self.workdir, exist_ok=True)

        # Mesh: one device keeps plain (uncommitted) arrays; more are laid out by the sharding rules.
        self.mesh = plan = None
        if jax.device_count() > 1:
            sizes = cfg.mesh.resolve(jax.device_count())
            cfg.check_batch_shards(sizes["data"] * sizes["fsdp"])
            self.mesh = sharding.make_mesh(cfg.mesh)
        t0 = time.perf_counter()
        # The same builder as SFT's, so warm-start adapters land on the base they were trained on.
        self.model_config, base, self.tokenizer = build_base_model(cfg.model, self.mesh, tokenizer)
        if self.mesh is not None:
            plan = sharding.ShardingPlan(self.mesh, self.model_config)
            base = plan.put(base)  # a no-op for load_sharded's arrays
        self.load_seconds = time.perf_counter() - t0

        self.layout = AgentLayout.from_train_config(cfg)
        self.worker = RolloutWorker(cfg, self.model_config, self.tokenizer)
        self.memory_plan = check_memory(cfg, self.layout, self.model_config, self.worker.sampler, self.mesh)
        key = jax.random.key(stable_seed(cfg.loop.seed, "adapters"))
        trainable = self.layout.init_trainable(self.model_config, base, cfg.adapter, key)
        if cfg.model.init_adapters_from:
            trainable = self.layout.load_warm_start(cfg.model.init_adapters_from, trainable)
        constants = self.layout.constants(base, trainable, warm_started=bool(cfg.model.init_adapters_from))
        self.learner = Learner(cfg, self.layout, self.model_config, trainable, constants, plan)

        self.train_tasks, self.test_tasks = load_tasks(cfg)
        self.pool: list[Task] = list(self.train_tasks)
        self._pool_phase = -1  # the phase whose curriculum pool ``self.pool`` is
        self.iterator = TaskIterator(self.pool, cfg.loop.questions_per_step, seed=cfg.loop.seed)
        self.step_index = 0
        self.checkpoints = CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            keep_last=cfg.checkpoint.keep_last,
            keep_steps=cfg.checkpoint.keep_steps,
        )

    @property
    def roles(self) -> tuple[str, ...]:
        return self.layout.roles

    @property
    def state(self):
        return self.learner.state

    def sampling_view(self):
        """(model tree, {role: adapter or None}) of the current agents."""
        return self.layout.sampling_view(self.learner.params)

    def phase(self, step: int) -> Phase:
        """The trained roles at ``step``: every role when one agent plays them all, else the schedule's."""
        if len(self.layout.agents) == 1:
            return Phase(trained=self.roles, index=0, starts=step == 0)
        return phase_at(self.config.schedule, step)

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, Any]:
        """Run one RL step; returns its metrics."""
        cfg, step, t_start = self.config, self.step_index, time.perf_counter()
        phase = self.phase(step)
        if cfg.curriculum.enabled and (phase.starts or self._pool_phase != phase.index):
            self.pool = curriculum_pool(self.worker, self.sampling_view(), self.train_tasks, self.roles, phase, cfg)
            self._pool_phase = phase.index
            self.iterator = TaskIterator(
                self.pool, cfg.loop.questions_per_step, seed=stable_seed(cfg.loop.seed, "pool", phase.index)
            )
        if cfg.memory.release_programs == "phase" and phase.starts and step > 0:
            self.release_programs()  # the previous phase's agent's update and log-prob programs
        tasks = self.iterator.next()
        if jax.process_count() > 1:  # each host rolls out (and grades) its own questions
            tasks = tasks[sharding.host_rows(len(tasks))]

        self.worker.sampler.reset_stats()
        # the last update's freed scratch, before the rollout's KV (freed by reference count: no gc pass)
        release_memory(clear_jax_caches=False, collect_garbage=False)
        t0 = time.perf_counter()
        peaks = {"rollout": PeakRss(), "prepare": PeakRss(), "update": PeakRss()}  # host RSS per phase
        with peaks["rollout"]:
            exp = self.worker.collect(
                self.sampling_view(),
                tasks,
                stable_seed(cfg.loop.seed, "rollout", step),
                solutions_per_plan=cfg.loop.solutions_per_plan,
            )
        if self.reward_override is not None:
            exp = self.reward_override(exp)
        t_rollout = time.perf_counter() - t0
        metrics = experience_lib.rollout_metrics(exp)

        t0 = time.perf_counter()
        with peaks["prepare"]:
            batches = self._role_batches(exp, phase.trained, metrics)
        t_prepare = time.perf_counter() - t0
        if jax.process_count() > 1:  # rollout/reward/prepare metrics above are host-local
            metrics.update(_reduce_host_metrics(metrics))

        t0 = time.perf_counter()
        # the rollout's freed buffers, before the update's scratch
        release_memory(clear_jax_caches=False, collect_garbage=False)
        trained_agents = self.layout.agents_of(phase.trained)
        try:
            with peaks["update"]:
                upd = self.learner.update({r: b.train for r, b in batches.items()}, trained_agents)
        except learner_lib.NonFiniteUpdateError as e:
            raise NonFiniteUpdateError(
                f"step {step}: {e}; the last good checkpoint (step {self.checkpoints.latest_step()}) in "
                f"{self.checkpoints.directory} is intact"
            ) from None
        t_update = time.perf_counter() - t0
        metrics.update({k if "/" in k else f"{'+'.join(trained_agents)}/{k}": v for k, v in upd.items()})
        metrics.update(self._step_info(phase, exp, batches, t_start, t_rollout, t_prepare, t_update))
        metrics.update({f"memory/{p}_peak_rss_mib": span.mib for p, span in peaks.items() if span.mib is not None})
        self.step_index += 1
        return metrics

    def _role_batches(self, exp, roles: Sequence[str], metrics: dict) -> dict[str, RoleBatch]:
        """The trained roles' batches with old (unless the update computes them) / reference log-probs and
        advantages filled in."""
        cfg, learner = self.config, self.learner
        batches = {}
        for role in roles:
            b = build_role_batch(
                exp,
                role,
                self.worker.encoder,
                cfg.rollout,
                cfg.loop.solutions_per_plan,
                cfg.loop.max_seq_len,
                learner.max_loss_tokens,
            )
            if not cfg.old_logprobs_in_update:  # else the update's own forward gives log π_old
                b.train = b.train.replace(old_logprobs=learner.old_logprobs(role, b.train))
            if self.layout.needs_reference:
                b.train = b.train.replace(ref_logprobs=learner.ref_logprobs(role, b.train))
            metrics[f"{role}/loss_tokens"] = float(b.sequences.loss_mask.sum())
            batches[role] = b
        for role, adv in step_advantages(cfg, batches).items():
            batches[role].train = batches[role].train.replace(advantages=adv)
        return batches

    def _step_info(self, phase, exp, batches, t_start, t_rollout, t_prepare, t_update) -> dict[str, Any]:
        sampler = self.worker.sampler
        tokens = sum(float(b.sequences.attention_mask.sum()) for b in batches.values()) * jax.process_count()
        generated = sum(len(t.token_ids) for tr in exp.trajectories for t in tr.turns)
        return {
            "phase/trained": "+".join(phase.trained),
            "phase/index": phase.index,
            "time/rollout_s": t_rollout,
            "time/prepare_s": t_prepare,
            "time/update_s": t_update,
            "time/step_s": time.perf_counter() - t_start,
            # rollout_s includes grading; these are the parts inside the compiled sampler / compiling
            "time/rollout_kernel_s": sampler.stats.kernel_s,
            "time/rollout_compile_s": sampler.stats.compile_s,
            "throughput/rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
            "throughput/update_tokens_per_s": tokens / max(t_update, 1e-9),
            "sampler/compile_count": sampler.compile_count,
        }

    def release_programs(self, *, final: bool = False) -> None:
        """Drops the compiled training programs (update, log-prob passes; JAX's caches) and trims the
        heap; what needs them compiles them again (or reads the persistent compilation cache).
        ``final`` (no rollout follows): with ``memory.release_programs='phase'`` the sampler's rollout
        programs go too."""
        self.learner.release_programs()
        if final and self.config.memory.release_programs == "phase":
            self.worker.sampler.drop_programs()
        release_memory(clear_jax_caches=True)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, tasks: Sequence[Task], tag: str) -> dict[str, Any]:
        """Greedy pass@1 of the current agents on ``tasks`` (per-sample JSONL under eval/); the harness
        summary plus ``peak_rss_mib`` (host memory while it ran; absent off Linux)."""
        path = os.path.join(self.workdir, "eval", f"{tag}.jsonl") if sharding.is_main_process() else None
        release_memory(clear_jax_caches=False)  # freed update scratch, before the eval's KV cache
        held = self.worker.sampler.program_keys()
        with PeakRss() as peak:
            out = self.worker.evaluate(
                self.sampling_view(), tasks, stable_seed(self.config.loop.seed, "eval", tag), path
            )
        if self.config.memory.release_programs == "phase":  # greedy eval programs: rollouts sample
            self.worker.sampler.drop_programs(keep=held)
        return out if peak.mib is None else {**out, "peak_rss_mib": peak.mib}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        meta = {
            "step": self.step_index,
            "data_position": self.iterator.position,
            "pool": [t.uid for t in self.pool] if self.config.curriculum.enabled else None,
            "pool_phase": self._pool_phase,
            "prefix_buckets": self.learner.prefix_bucket_record(),
            "sampler_layouts": self.worker.sampler.layout_record(),
        }
        self.checkpoints.save(self.step_index, self.learner.checkpoint_tree(), meta, force=True)

    def restore(self) -> bool:
        """Restore the latest checkpoint if any; True when restored."""
        latest = self.checkpoints.latest_step()
        if latest is None:
            return False
        tree, meta = self.checkpoints.restore(latest, self.learner.checkpoint_tree())
        self.learner.load_checkpoint_tree(tree)
        self.learner.load_prefix_bucket_record(meta.get("prefix_buckets") or [])
        self.worker.sampler.load_layout_record(meta.get("sampler_layouts") or [])
        self.step_index = int(meta["step"])
        if meta.get("pool") is not None:
            by_uid = {t.uid: t for t in self.train_tasks}
            missing = [u for u in meta["pool"] if u not in by_uid]
            if missing:
                raise ValueError(
                    f"checkpoint step {latest}: curriculum pool names unknown task uids "
                    f"{missing[:3]}...; was the data config changed?"
                )
            self.pool = [by_uid[u] for u in meta["pool"]]
            self._pool_phase = int(meta["pool_phase"])
            self.iterator = TaskIterator(
                self.pool,
                self.config.loop.questions_per_step,
                seed=stable_seed(self.config.loop.seed, "pool", self._pool_phase),
            )
        self.iterator.position = int(meta["data_position"])
        return True


def _reduce_host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host-local numeric metrics averaged over hosts (loss-token counts summed)."""
    local = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sums = {k for k in local if k.endswith("/loss_tokens")}
    out = sharding.reduce_metrics({k: v for k, v in local.items() if k not in sums}, "mean")
    out.update(sharding.reduce_metrics({k: local[k] for k in sums}, "sum") if sums else {})
    return out
