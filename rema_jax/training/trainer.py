"""The ReMA multi-agent RL trainer: rollout → reward → advantage → loss → update → checkpoint.

One step (``Trainer.step``):
  1. the schedule names the trained agent(s) (the other is frozen);
  2. at a phase start, the curriculum filter (Alg. 1) rebuilds the question pool;
  3. both agents roll out on the next questions with the jitted sampler (no re-tokenization);
  4. trajectories are graded (math-verify in worker processes) and rewarded per role;
  5. the trained roles' sequences get old log-probs recomputed under the training graph,
     reference log-probs when a KL term needs them, and advantages;
  6. one jitted update (mini/micro-batches) steps the trained agent; the frozen agent's
     parameters and optimizer state pass through bit-identical;
  7. metrics go to JSONL + TensorBoard, and an orbax checkpoint is written.

With more than one device the run is laid out on a mesh (``config.mesh``): base params, adapters
and optimizer state by the sharding rules, batch rows over ``data``×``fsdp``, the update and the
log-prob passes jitted with explicit in/out shardings. One process driving several devices needs
nothing else; with several processes (a pod slice) each host rolls out its own questions
(``host_rows``), the global batch is assembled from the hosts' rows, host-local metrics are
averaged over hosts, and only process 0 writes files (orbax checkpoints are written by all).

Everything random is derived from ``(loop.seed, step)``, and the data position and curriculum pool
are checkpointed, so a killed run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax import models, rl, sharding
from rema_jax.config_utils import to_dict
from rema_jax.errors import UserError
from rema_jax.models.adapters import Adapter, init_adapter
from rema_jax.rewards.math_grading import get_grader
from rema_jax.rl.update import MODEL_KEYS, OPTIONAL_KEYS, RL_KEYS
from rema_jax.rollout import (META_THINKING, REASONING, SINGLE, ChatEncoder,
                              build_role_sequences, make_sampler_policy)
from rema_jax.sampling import Sampler
from rema_jax.tasks.types import Task
from rema_jax.training import experience as experience_lib
from rema_jax.training.base_model import build_base_model, stable_seed
from rema_jax.training.checkpoint import CheckpointManager
from rema_jax.training.config import TrainConfig
from rema_jax.training.data_iterator import TaskIterator
from rema_jax.training.metrics import MetricsLogger
from rema_jax.training.plots import plot_training_curves
from rema_jax.training.schedules import Phase, phase_at

log = logging.getLogger(__name__)

SHARED = "shared"
BASE = "base"          # the frozen base parameters, passed to jitted functions as an argument
REFERENCE = "reference"  # a frozen copy of the starting policy's weights (KL term only)


class NonFiniteUpdateError(FloatingPointError, UserError):
    """The loss or a gradient was NaN/inf; the update was not applied."""


RewardOverride = Callable[[experience_lib.Experience], experience_lib.Experience]


_seed = stable_seed  # a stable 31-bit seed from any parts, e.g. (run seed, step, purpose)


def load_tasks(config: TrainConfig) -> tuple[list[Task], list[Task]]:
    """(train, held-out test) tasks for the data section."""
    data = config.data
    if data.source == "builtin":
        from rema_jax.tasks.builtin import builtin_split
        return builtin_split(data.train_per_cell, data.test_per_cell, seed=data.split_seed,
                             families=data.families, levels=data.levels)
    from rema_jax.tasks.loaders import load_benchmark
    train = load_benchmark(data.benchmark, data.train_path, skip_bad_records=data.skip_bad_records).tasks
    test = (load_benchmark(data.benchmark, data.test_path, skip_bad_records=data.skip_bad_records).tasks
            if data.test_path else [])
    return list(train), list(test)


class Trainer:
    """Holds the model, sampler, RL state and bookkeeping of one training run."""

    def __init__(self, config: TrainConfig, workdir: str, *,
                 reward_override: RewardOverride | None = None, progress: bool = True):
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.reward_override = reward_override
        self.progress = progress
        os.makedirs(self.workdir, exist_ok=True)
        cfg = config

        # Mesh: one device keeps plain (uncommitted) arrays; more are laid out by the sharding rules.
        self.mesh = self.plan = None
        self._update_steps: dict[tuple, Any] = {}
        self._logprob_steps: dict[tuple, Any] = {}
        if jax.device_count() > 1:
            sizes = cfg.mesh.resolve(jax.device_count())
            cfg.check_batch_shards(sizes["data"] * sizes["fsdp"])
            self.mesh = sharding.make_mesh(cfg.mesh)

        # Model, tokenizer, sampler.
        t0 = time.perf_counter()
        # The same builder as SFT's, so warm-start adapters land on the base they were trained on.
        self.model_config, base, self.tokenizer = build_base_model(cfg.model, self.mesh)
        if self.mesh is not None:
            self.plan = sharding.ShardingPlan(self.mesh, self.model_config)
            base = self.plan.put(base)  # a no-op for load_sharded's arrays
        self.load_seconds = time.perf_counter() - t0
        self.encoder = ChatEncoder(self.tokenizer)
        self.sampler = Sampler(self.model_config, self.tokenizer, max_cache_len=cfg.model.max_cache_len)

        # Roles and the agents that own parameters.
        self.roles: tuple[str, ...] = cfg.rollout.agent_roles
        self.shared = cfg.adapter.kind == SHARED
        self.memory_plan = self._check_memory()
        key = jax.random.key(_seed(cfg.loop.seed, "adapters"))
        self.need_ref = cfg.loss.kl_coef > 0 or (cfg.advantage.estimator == "reinforce_pp"
                                                 and cfg.advantage.kl_coef > 0)
        if self.shared:
            trainable = {SHARED: base}
            if cfg.model.init_adapters_from:
                trainable = self._load_sft_adapters(cfg, trainable)
            self.constants = {}
            if self.need_ref:  # the model the run starts from: the SFT model after a warm start
                self.constants[REFERENCE] = jax.tree.map(jnp.copy, trainable[SHARED])
        else:
            trainable = {}
            for i, role in enumerate(self.roles):
                adapter = init_adapter(self.model_config, base, cfg.adapter, jax.random.fold_in(key, i))
                trainable[role] = adapter.weights
            if cfg.model.init_adapters_from:
                trainable = self._load_sft_adapters(cfg, trainable)
            self.constants = {BASE: base}
            if self.need_ref and cfg.model.init_adapters_from:  # reference = base + the SFT adapters
                self.constants[REFERENCE] = {r: jax.tree.map(jnp.copy, w) for r, w in trainable.items()}
            self._adapter_kind = cfg.adapter.kind
            self._adapter_scale = cfg.adapter.scale if cfg.adapter.kind == "lora" else 1.0

        self.optimizer = rl.MultiAgentOptimizer(cfg.optimizer)
        self.state = rl.init_rl_state(trainable, self.optimizer)
        if self.plan is not None:  # adapters / trained params and their AdamW moments by the rules
            self.state = self.plan.put(self.state)
            self.constants = self.plan.put(self.constants)
        # Log-probs are needed at response tokens only: project to the vocabulary there alone.
        rounds = cfg.rollout.max_turns if cfg.rollout.mode == "multi_turn" else 1
        self.max_loss_tokens = min(rounds * (cfg.rollout.max_new_tokens + 1), cfg.loop.max_seq_len)
        self.update_fn = rl.make_update_fn(None, cfg.loss, self.optimizer, cfg.update,
                                           logprobs_fn=self._sparse_logprobs(self._policy_params_for))
        self.logprob_fn = rl.compute_logprobs_fn(
            None, cfg.loss.temperature, num_micro_batches=cfg.update.num_micro_batches,
            logprobs_fn=self._sparse_logprobs(self._policy_params_for))
        self.ref_logprob_fn = rl.compute_logprobs_fn(
            None, cfg.loss.temperature, num_micro_batches=cfg.update.num_micro_batches,
            logprobs_fn=self._sparse_logprobs(self._reference_params_for))
        self.grader = get_grader(cfg.grading)

        # Data.
        self.train_tasks, self.test_tasks = load_tasks(cfg)
        self.pool: list[Task] = list(self.train_tasks)
        self._pool_phase = -1  # the phase whose curriculum pool ``self.pool`` is
        self.iterator = TaskIterator(self.pool, cfg.loop.questions_per_step, seed=cfg.loop.seed)
        self.rng = jax.random.key(_seed(cfg.loop.seed, "rng"))
        self.step_index = 0

        self.checkpoints = CheckpointManager(os.path.join(self.workdir, "checkpoints"),
                                             keep_last=cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ model plumbing
    def _check_memory(self) -> sharding.MemoryPlan:
        """Plans per-device memory for this run's shapes, prints the table (main process) and refuses
        a run that cannot fit (``MemoryPlanError`` with the breakdown) before anything is compiled."""
        cfg = self.config
        chunk = cfg.update.num_mini_batches * cfg.update.num_micro_batches
        rows = cfg.rows_per_step
        role_rows = [rows["mta"] if r in (META_THINKING, SINGLE) else rows["ra"] for r in self.roles]
        # one micro-batch holds every trained role's rows: all roles in shared mode, one otherwise
        train_rows = sum(role_rows) // chunk if self.shared else max(role_rows) // chunk
        buckets = self.sampler.batch_buckets
        rollout_rows = next((b for b in buckets if b >= max(role_rows)), buckets[-1])
        mesh = self.mesh if self.mesh is not None else {"data": 1, "fsdp": 1, "tensor": 1}
        plan = sharding.plan_memory(
            self.model_config, mesh, adapter_kind=cfg.adapter.kind, lora_rank=cfg.adapter.rank,
            lora_targets=cfg.adapter.targets, num_agents=len(self.roles), train_batch=train_rows,
            train_seq=cfg.loop.max_seq_len, rollout_batch=rollout_rows, cache_len=cfg.model.max_cache_len)
        device_bytes = sharding.device_memory_bytes(default=cfg.memory.device_bytes)
        if sharding.is_main_process():
            print(plan.table(device_bytes), flush=True)
            if cfg.memory.check and device_bytes is None:
                print(f"memory check skipped: {jax.devices()[0].platform} reports no memory limit and "
                      "memory.device_bytes is not set", flush=True)
        if cfg.memory.check:
            sharding.check_fits(plan, device_bytes, headroom=cfg.memory.headroom)
        return plan

    def _global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows → global arrays with rows over data × fsdp (the batch spec of the *global* shape)."""
        n_proc = jax.process_count()
        host_batch = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
                      for k, v in host_batch.items()}
        global_shapes = {k: np.broadcast_to(np.zeros((), v.dtype), (v.shape[0] * n_proc,) + v.shape[1:])
                         for k, v in host_batch.items()}
        return sharding.global_batch_from_host(host_batch, self.plan.batch_shardings(global_shapes))

    @staticmethod
    def _host_values(x: jax.Array) -> np.ndarray:
        """This host's rows of a global batch-sharded array."""
        if jax.process_count() == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return full[sharding.host_rows(full.shape[0])]

    def _logprobs(self, fn, all_params: Mapping[str, Any], role: str, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Old / reference log-probs ``[N, L]`` of ``role``'s rows (this host's rows under a mesh)."""
        if self.plan is None:
            return np.asarray(fn(all_params, role, batch))
        gb = self._global_batch({k: batch[k] for k in MODEL_KEYS})
        key = (id(fn), role, tuple(gb["tokens"].shape))
        if key not in self._logprob_steps:
            self._logprob_steps[key] = sharding.shard_logprobs_fn(fn, self.plan, all_params, gb, role)
        return self._host_values(self._logprob_steps[key](all_params, gb))

    def _update(self, batches: Mapping[str, Mapping[str, np.ndarray]], trained_agents: tuple[str, ...]):
        """One RL update: the plain jitted step on one device, or the mesh step with explicit shardings."""
        if self.plan is None:
            return self.update_fn(self.state, batches, trained_agents, constants=self.constants)
        keys = MODEL_KEYS + RL_KEYS + (OPTIONAL_KEYS if self.config.loss.kl_coef > 0 else ())
        host = {}
        for role, b in batches.items():
            bad = (b["loss_mask"] > 0) & ((b["turn_ids"] < 0) | (b["turn_ids"] >= self.config.loss.max_turns))
            if bad.any():
                raise ValueError(f"{role}: {int(bad.sum())} loss tokens have turn_ids outside "
                                 f"[0, loss.max_turns={self.config.loss.max_turns})")
            host[role] = {k: b[k] for k in keys}
        global_batches = {role: self._global_batch(b) for role, b in host.items()}
        key = (trained_agents, tuple((r, b["tokens"].shape) for r, b in sorted(global_batches.items())))
        if key not in self._update_steps:
            self._update_steps[key] = sharding.shard_update_fn(
                self.update_fn, self.plan, self.state, global_batches, trained_agents, self.constants)
        return self._update_steps[key](self.state, global_batches, self.constants)

    def _load_sft_adapters(self, cfg: TrainConfig, trainable: dict[str, Any]) -> dict[str, Any]:
        """Start RL from an SFT warm-start: ``<init_adapters_from>/<agent>`` written by
        ``launch/sft.py`` (``models.save_adapter``). Kind, scale and tree shapes must match the config;
        the optimizer state starts fresh."""
        out = dict(trainable)
        want_kind = "full" if self.shared else cfg.adapter.kind
        want_scale = cfg.adapter.scale if want_kind == "lora" else 1.0
        for agent, tree in trainable.items():
            path = os.path.join(cfg.model.init_adapters_from, agent)
            loaded = models.load_adapter(path)
            if loaded.kind != want_kind or not np.isclose(loaded.scale, want_scale):
                raise ValueError(f"{path}: adapter {loaded.kind} with scale {loaded.scale}, but the config "
                                 f"wants {want_kind} with scale {want_scale}")
            shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
            if shapes(loaded.weights) != shapes(tree):
                raise ValueError(f"{path}: the adapter's tree or shapes differ from the config's adapter "
                                 "(rank, targets or model)")
            out[agent] = jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), loaded.weights, tree)
        return out

    def _agent(self, role: str) -> str:
        return SHARED if self.shared else role

    def _adapter(self, weights) -> Adapter:
        return Adapter(weights=weights, kind=self._adapter_kind, scale=self._adapter_scale)

    def _policy_params_for(self, params: Mapping[str, Any], role: str):
        """(base tree, adapter) of ``role``'s current policy; ``params`` = agents' trees + constants."""
        if self.shared:
            return params[SHARED], None
        return params[BASE], self._adapter(params[role])

    def _reference_params_for(self, params: Mapping[str, Any], role: str):
        """The reference policy = the policy the run starts from: the frozen copy of the initial
        shared model (the SFT model after a warm start); with adapters, the base plus a frozen copy
        of the role's SFT adapter after a warm start, else the bare base (no copy: a fresh LoRA
        adapter is the base exactly)."""
        if self.shared:
            return params[REFERENCE], None
        if REFERENCE in params:
            return params[BASE], self._adapter(params[REFERENCE][role])
        return params[BASE], None

    def _sparse_logprobs(self, params_for):
        """``logprobs_fn(params, role, batch)`` for the RL update: logits at loss positions only."""
        temperature, k = self.config.loss.temperature, self.max_loss_tokens

        def logprobs_fn(params, role, batch):
            base, adapter = params_for(params, role)

            def logits_at(pos_bk):
                return models.forward(self.model_config, base, batch["tokens"], adapter=adapter,
                                      attention_mask=batch["attention_mask"], logits_at_bk=pos_bk)

            return rl.sparse_token_logprobs_and_entropy(
                logits_at, batch["tokens"], batch["loss_mask"], k, temperature)

        return logprobs_fn

    def policy_params(self) -> tuple[Any, dict[str, Any]]:
        """(base tree, {role: adapter or None}) for sampling with the current agents."""
        if self.shared:
            return self.state.params[SHARED], {r: None for r in self.roles}
        return self.constants[BASE], {r: self._adapter(self.state.params[r]) for r in self.roles}

    def make_policy(self, seed: int):
        base, adapters = self.policy_params()
        return make_sampler_policy(self.sampler, base, adapters, seed=seed)

    def _grade(self, predictions: Sequence[str], tasks: Sequence[Task]):
        return self.grader.grade_batch(list(predictions), [t.answer for t in tasks])

    # ------------------------------------------------------------------ schedule / curriculum
    def phase(self, step: int) -> Phase:
        if self.config.single_agent:
            return Phase(trained=(SINGLE,), index=0, starts=step == 0)
        if self.shared:
            return Phase(trained=self.roles, index=0, starts=step == 0)
        return phase_at(self.config.schedule, step)

    def curriculum_pool(self, phase: Phase, step: int) -> list[Task]:
        """Algorithm 1's filter for this phase: questions whose success rate is in [low, high]."""
        cur = self.config.curriculum
        candidates = TaskIterator(self.train_tasks, cur.pool_size,
                                  seed=_seed(self.config.loop.seed, "curriculum", phase.index)).next()
        trained = phase.trained[0] if len(phase.trained) == 1 else None
        overrides = {}
        if trained in (META_THINKING, REASONING) and not self.config.single_agent:
            other = REASONING if trained == META_THINKING else META_THINKING
            overrides = {other: {"greedy": True}, trained: {"greedy": False, "temperature": 1.0}}
        rollout = dataclasses.replace(self.config.rollout, num_samples=cur.num_samples)
        exp = experience_lib.collect(
            self.make_policy(_seed(self.config.loop.seed, "curriculum_rollout", phase.index)),
            self.encoder, candidates, rollout, self.config.reward, self._grade,
            sampling_overrides=overrides)
        successes = np.asarray(exp.correct, bool).reshape(len(candidates), cur.num_samples).sum(1)
        kept = [t for t, k in zip(candidates, successes)
                if in_success_band(int(k), cur.num_samples, cur.low, cur.high)]
        log.info("curriculum (phase %d, %s): kept %d of %d questions with success in [%.2f, %.2f]",
                 phase.index, "+".join(phase.trained), len(kept), len(candidates), cur.low, cur.high)
        if not kept:
            log.warning("curriculum kept no question; training on the unfiltered candidates")
            kept = candidates
        return kept

    # ------------------------------------------------------------------ one step
    def _role_batch(self, exp: experience_lib.Experience, role: str) -> dict[str, np.ndarray]:
        cfg = self.config
        rollout_k = dataclasses.replace(cfg.rollout, num_samples=cfg.rollout.num_samples * cfg.loop.solutions_per_plan)
        seqs = build_role_sequences(exp.rows[role], self.encoder, rollout_k, role,
                                    pad_to=cfg.loop.max_seq_len)
        batch = {k: np.asarray(v) for k, v in seqs.as_dict().items()}
        most = int(batch["loss_mask"].sum(1).max())
        if most > self.max_loss_tokens:
            raise ValueError(f"{role}: a row has {most} loss tokens, more than the {self.max_loss_tokens} "
                             "the log-prob kernel gathers (rollout.max_turns × (max_new_tokens + 1))")
        batch["rewards"] = exp.rewards[role]
        batch["group_ids"] = exp.group_ids[role]
        return batch

    def step(self) -> dict[str, Any]:
        """Run one RL step; returns its metrics."""
        cfg = self.config
        step = self.step_index
        phase = self.phase(step)
        t_start = time.perf_counter()
        if cfg.curriculum.enabled and (phase.starts or self._pool_phase != phase.index):
            self.pool = self.curriculum_pool(phase, step)
            self._pool_phase = phase.index
            self.iterator = TaskIterator(self.pool, cfg.loop.questions_per_step,
                                         seed=_seed(cfg.loop.seed, "pool", phase.index))
        tasks = self.iterator.next()
        if jax.process_count() > 1:  # each host rolls out (and grades) its own questions
            tasks = tasks[sharding.host_rows(len(tasks))]

        self.sampler.reset_stats()
        t0 = time.perf_counter()
        exp = experience_lib.collect(
            self.make_policy(_seed(cfg.loop.seed, "rollout", step)), self.encoder, tasks,
            cfg.rollout, cfg.reward, self._grade, solutions_per_plan=cfg.loop.solutions_per_plan)
        if self.reward_override is not None:
            exp = self.reward_override(exp)
        t_rollout = time.perf_counter() - t0
        metrics = experience_lib.rollout_metrics(exp)

        t0 = time.perf_counter()
        trained_roles = self.roles if self.shared else phase.trained
        all_params = {**self.state.params, **self.constants}
        need_ref = self.need_ref
        batches = {}
        for role in trained_roles:
            b = self._role_batch(exp, role)
            b["old_logprobs"] = self._logprobs(self.logprob_fn, all_params, role, b)
            if need_ref:
                b["ref_logprobs"] = self._logprobs(self.ref_logprob_fn, all_params, role, b)
            # Behaviour vs recomputed old log-probs: how far the sampler's numerics drift.
            sampled = (b["loss_mask"] > 0) & (b["eos_label_mask"] == 0)
            if sampled.any():
                metrics[f"{role}/behaviour_logprob_gap"] = float(
                    np.abs(b["behaviour_logprobs"] - b["old_logprobs"])[sampled].mean())
            metrics[f"{role}/loss_tokens"] = float(b["loss_mask"].sum())
            batches[role] = b
        for role, adv in step_advantages(cfg, batches).items():
            batches[role]["advantages"] = adv
        t_prepare = time.perf_counter() - t0
        if jax.process_count() > 1:  # rollout/reward/prepare metrics above are host-local
            local = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            sums = {k for k in local if k.endswith("/loss_tokens")}
            metrics.update(sharding.reduce_metrics({k: v for k, v in local.items() if k not in sums}, "mean"))
            metrics.update(sharding.reduce_metrics({k: local[k] for k in sums}, "sum") if sums else {})

        t0 = time.perf_counter()
        trained_agents = tuple(dict.fromkeys(self._agent(r) for r in trained_roles))
        new_state, upd = self._update(batches, trained_agents)
        upd = jax.device_get(upd)
        t_update = time.perf_counter() - t0
        if not bool(upd["finite"]):
            last = self.checkpoints.latest_step()
            raise NonFiniteUpdateError(
                f"step {step}: the loss or a gradient is NaN/inf (loss={upd.get('loss')}, "
                f"grad_norm={upd.get('grad_norm')}); the update was not applied and the last good "
                f"checkpoint (step {last}) in {self.checkpoints.directory} is intact")
        self.state = new_state
        for k, v in upd.items():
            if k == "finite":
                continue
            key = k if "/" in k else f"{'+'.join(trained_agents)}/{k}"
            metrics[key] = float(np.asarray(v))
        tokens = sum(float(b["attention_mask"].sum()) for b in batches.values()) * jax.process_count()
        generated = sum(len(t.token_ids) for tr in exp.trajectories for t in tr.turns)
        metrics.update({
            "phase/trained": "+".join(phase.trained), "phase/index": phase.index,
            "time/rollout_s": t_rollout, "time/prepare_s": t_prepare, "time/update_s": t_update,
            "time/step_s": time.perf_counter() - t_start,
            # rollout_s includes grading; these are the parts inside the compiled sampler / compiling
            "time/rollout_kernel_s": self.sampler.stats.kernel_s,
            "time/rollout_compile_s": self.sampler.stats.compile_s,
            "throughput/rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
            "throughput/update_tokens_per_s": tokens / max(t_update, 1e-9),
            "sampler/compile_count": self.sampler.compile_count,
        })
        self.step_index += 1
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, tasks: Sequence[Task], tag: str) -> dict[str, Any]:
        """Greedy pass@1 of the current agents on ``tasks`` (per-sample JSONL under eval/)."""
        from rema_jax.eval.harness import EvalSettings, evaluate_benchmark
        from rema_jax.eval.solvers import rollout_solver

        rollout = dataclasses.replace(self.config.rollout, num_samples=1, greedy=True)
        # The solver takes math settings first and judge settings apart (a judge run's are the latter).
        math_rollout, judge_rollout = ((dataclasses.replace(rollout, task="math"), rollout)
                                       if rollout.task == "judge" else (rollout, None))
        solver = rollout_solver(self.make_policy(_seed(self.config.loop.seed, "eval", tag)),
                                self.encoder, math_rollout, judge_rollout)
        settings = EvalSettings(batch_size=max(len(tasks), 1), grade_timeout=self.config.grading.timeout_s,
                                progress=False)
        path = os.path.join(self.workdir, "eval", f"{tag}.jsonl") if sharding.is_main_process() else None
        if path is not None and os.path.exists(path):
            os.remove(path)  # evaluations inside training are recomputed, never resumed
        summary = evaluate_benchmark(list(tasks), solver, benchmark="heldout", mode=self.config.rollout.mode,
                                     settings=settings, samples_path=path)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict[str, Any]:
        return {"params": self.state.params, "opt_state": self.state.opt_state,
                "rng": jax.random.key_data(self.rng)}

    def save(self) -> None:
        meta = {"step": self.step_index, "data_position": self.iterator.position,
                "pool": [t.uid for t in self.pool] if self.config.curriculum.enabled else None,
                "pool_phase": self._pool_phase}
        self.checkpoints.save(self.step_index, self._checkpoint_state(), meta, force=True)

    def restore(self) -> bool:
        """Restore the latest checkpoint if any; True when restored."""
        latest = self.checkpoints.latest_step()
        if latest is None:
            return False
        state, meta = self.checkpoints.restore(latest, self._checkpoint_state())
        self.state = rl.RLState(params=state["params"], opt_state=state["opt_state"])
        self.rng = jax.random.wrap_key_data(state["rng"])
        self.step_index = int(meta["step"])
        if meta.get("pool") is not None:
            by_uid = {t.uid: t for t in self.train_tasks}
            missing = [u for u in meta["pool"] if u not in by_uid]
            if missing:
                raise ValueError(f"checkpoint step {latest}: curriculum pool names unknown task uids "
                                 f"{missing[:3]}...; was the data config changed?")
            self.pool = [by_uid[u] for u in meta["pool"]]
            self._pool_phase = int(meta["pool_phase"])
            self.iterator = TaskIterator(self.pool, self.config.loop.questions_per_step,
                                         seed=_seed(self.config.loop.seed, "pool", self._pool_phase))
        self.iterator.position = int(meta["data_position"])
        return True


def in_success_band(successes: int, n: int, low: float, high: float) -> bool:
    """Whether ``successes`` of ``n`` samples lie in Algorithm 1's band: ``low*n <= k <= high*n``,
    exactly. The edges are read as the decimals they are written as (``Fraction(str(0.2)) = 1/5``),
    so 1 of 5 is in [0.2, 0.8] whatever the float width or NumPy's promotion rules."""
    k = Fraction(successes)
    return Fraction(str(low)) * n <= k <= Fraction(str(high)) * n


def step_advantages(config: TrainConfig, batches: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Token advantages ``{role: [N, L]}`` of every role trained in one step.

    Multi-turn rollouts pass per-turn rewards (each row's outcome on its last turn,
    ``experience.outcome_turn_rewards``), so REINFORCE++ puts the turn-level return on the last
    token of every turn with returns reset between turns, as the official code; without them the
    outcome would sit on the last loss token only and every earlier turn would get return 0.
    With ``advantage.whiten_scope="batch"`` the roles' rows are one estimator call (REINFORCE++
    whitens them together like the official merged two-role batch; GRPO groups stay per
    (role, question) through ``role_ids_n``); ``"role"`` makes one call per role.
    """
    cfg = config.advantage
    inputs = {}
    for role, b in batches.items():
        x = {"rewards_n": b["rewards"], "group_ids_n": b["group_ids"], "loss_mask_nl": b["loss_mask"],
             "turn_ids_nl": b["turn_ids"], "old_logprobs_nl": b.get("old_logprobs"),
             "ref_logprobs_nl": b.get("ref_logprobs")}
        if config.rollout.mode == "multi_turn":
            x["turn_rewards_nk"] = experience_lib.outcome_turn_rewards(
                b["rewards"], b["turn_ids"], b["loss_mask"], config.loss.max_turns)
        inputs[role] = x
    if cfg.whiten_scope == "role" or len(inputs) < 2:
        return {role: np.asarray(rl.compute_advantages(cfg, **x)) for role, x in inputs.items()}
    roles = list(inputs)
    merged = {k: None if inputs[roles[0]][k] is None else np.concatenate([inputs[r][k] for r in roles])
              for k in inputs[roles[0]]}
    sizes = [len(inputs[r]["rewards_n"]) for r in roles]
    merged["role_ids_n"] = np.repeat(np.arange(len(roles)), sizes)
    adv = np.asarray(rl.compute_advantages(cfg, **merged))
    return dict(zip(roles, np.split(adv, np.cumsum(sizes)[:-1])))


def heldout_subset(tasks: Sequence[Task], n: int) -> list[Task]:
    """The first ``n`` held-out tasks taken round-robin over (subject, level) cells, so a small
    evaluation still covers every task family and level."""
    cells: dict[tuple, list[Task]] = {}
    for t in tasks:
        cells.setdefault((t.subject, t.level), []).append(t)
    out: list[Task] = []
    queues = list(cells.values())
    i = 0
    while len(out) < min(n, len(tasks)):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out


def _eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Harness summary (percentages) → logged fractions."""
    out = {"eval/accuracy": summary["score"] / 100.0}
    if "boxed_rate" in summary:  # math
        out["eval/boxed_rate"] = summary["boxed_rate"] / 100.0
    if "no_verdict_rate" in summary:  # judge
        out["eval/no_verdict_rate"] = summary["no_verdict_rate"] / 100.0
    return out


def _format_summary(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def train(config: TrainConfig, workdir: str, *, resume: bool = True,
          reward_override: RewardOverride | None = None, progress: bool = True,
          max_steps: int | None = None) -> dict[str, Any]:
    """Train for ``config.loop.steps`` (or stop after ``max_steps`` more, for tests); returns a summary.

    Writes ``metrics.jsonl``, ``tb/``, ``checkpoints/``, ``eval/``, ``curves.png``,
    ``config.json`` and ``summary.json`` under ``workdir``.
    """
    from tqdm import tqdm

    t_run = time.perf_counter()
    trainer = Trainer(config, workdir, reward_override=reward_override, progress=progress)
    resumed = resume and trainer.restore()
    is_main = sharding.is_main_process()
    if is_main:
        with open(os.path.join(trainer.workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_dict(config), f, indent=2, default=str)
    logger = MetricsLogger(trainer.workdir, resume_from_step=trainer.step_index if resumed else 0)
    if is_main and not resumed and os.path.exists(logger.path):
        open(logger.path, "w").close()

    cfg = config.loop
    eval_tasks = heldout_subset(trainer.test_tasks, cfg.eval_questions)
    summary: dict[str, Any] = {"resumed_from_step": trainer.step_index if resumed else None}
    if eval_tasks and cfg.eval_before and not resumed:
        ev = trainer.evaluate(eval_tasks, "step_0")
        summary["eval_before"] = ev["score"] / 100.0
        logger.write(0, _eval_metrics(ev))

    end = cfg.steps if max_steps is None else min(cfg.steps, trainer.step_index + max_steps)
    bar = tqdm(total=cfg.steps, initial=trainer.step_index, desc="ReMA RL", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    history = []
    try:
        while trainer.step_index < end:
            metrics = trainer.step()
            step = trainer.step_index
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and eval_tasks:
                metrics.update(_eval_metrics(trainer.evaluate(eval_tasks, f"step_{step}")))
            if step == cfg.steps and eval_tasks:
                metrics.update(_eval_metrics(trainer.evaluate(eval_tasks, f"step_{step}")))
            record = logger.write(step, metrics)
            history.append(record)
            if step % config.checkpoint.every == 0 or step == end:
                trainer.save()
            rewards = {r: metrics.get(f"{r}/reward_mean") for r in trainer.roles}
            bar.set_postfix({**{f"R_{r[:4]}": f"{v:+.2f}" for r, v in rewards.items() if v is not None},
                             "acc": f"{metrics['train/accuracy']:.2f}",
                             "s/step": f"{metrics['time/step_s']:.1f}",
                             "train": metrics["phase/trained"][:4]})
            bar.update(1)
    finally:
        bar.close()
        logger.close()
        trainer.checkpoints.close()

    if is_main:
        plot = plot_training_curves(logger.path, os.path.join(trainer.workdir, "curves.png"),
                                    title=f"ReMA {config.rollout.mode} · {config.model.source}")
        summary["plot"] = plot
    summary.update({"steps": trainer.step_index, "wall_s": time.perf_counter() - t_run})
    if history:
        first, last = history[0], history[-1]
        for r in trainer.roles:
            summary[f"{r}/reward_first"] = first.get(f"{r}/reward_mean")
            summary[f"{r}/reward_last"] = last.get(f"{r}/reward_mean")
        summary["train_accuracy_first"] = first.get("train/accuracy")
        summary["train_accuracy_last"] = last.get("train/accuracy")
        if "eval/accuracy" in last:
            summary["eval_after"] = last["eval/accuracy"]
    if is_main:
        with open(os.path.join(trainer.workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        rows = [("workdir", trainer.workdir), ("steps", str(trainer.step_index)),
                ("wall time", f"{summary['wall_s'] / 60:.1f} min")]
        for r in trainer.roles:
            if f"{r}/reward_first" in summary:
                rows.append((f"{r} reward", f"{summary[f'{r}/reward_first']:+.3f} → {summary[f'{r}/reward_last']:+.3f}"))
        if "train_accuracy_first" in summary:
            rows.append(("train accuracy", f"{summary['train_accuracy_first']:.3f} → {summary['train_accuracy_last']:.3f}"))
        if "eval_before" in summary or "eval_after" in summary:
            rows.append(("held-out accuracy", f"{summary.get('eval_before', float('nan')):.3f} → "
                                              f"{summary.get('eval_after', float('nan')):.3f}"))
        if summary.get("plot"):
            rows.append(("curves", summary["plot"]))
        print("\nReMA training summary\n" + _format_summary(rows), flush=True)
    return summary
