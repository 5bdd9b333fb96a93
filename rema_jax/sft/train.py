"""Supervised warm-start of the ReMA agents (the paper's SFT bootstrap, spec §5.2).

Each agent (LoRA / full adapter, or one shared model) is fine-tuned with token-level cross-entropy
on its own assistant tokens. One jitted step trains one agent on one static-shape batch; the
vocabulary projection runs at loss positions only (``rl.sparse_token_logprobs_and_entropy``).
The optimizer is the RL trainer's ``rl.MultiAgentOptimizer`` (AdamW, global-norm clipping,
warmup + cosine per agent), so the saved state has the RL checkpoint layout.

Outputs under ``workdir``: ``adapters/<agent>/`` (``models.save_adapter``: what RL starts from),
``checkpoints/`` (orbax, the RL trainer's ``{"params", "opt_state"}`` layout + meta),
``metrics.jsonl``, ``loss.png``, ``config.json``, ``summary.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax import models, rl
from rema_jax.config_utils import from_dict, to_dict
from rema_jax.models.adapters import Adapter, AdapterConfig, trains_head
from rema_jax.rollout import ChatEncoder
from rema_jax.rollout import prompts as prompts_lib
from rema_jax.rollout.prompts import META_THINKING, REASONING, SINGLE
from rema_jax.sft import data as data_lib
from rema_jax.sft import tokenize as tok_lib
from rema_jax.tasks.builtin import FAMILIES, builtin_split
from rema_jax.training.base_model import build_base_model
from rema_jax.training.config import ModelSection
from rema_jax.training.layout import BASE, SHARED, AgentLayout

log = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"


@dataclasses.dataclass(frozen=True)
class SFTDataSection:
    """builtin: worked examples from the built-in train split (families × levels × train_per_cell);
    the held-out ``test_per_cell`` questions feed the before/after evaluation. Use the RL run's
    ``train_per_cell``/``test_per_cell``/``split_seed`` so SFT never trains on RL's held-out questions,
    and ``examples_per_cell`` to fine-tune on only the first k training questions of each cell.
    mode: ``"single_turn"`` (MTA plans + RA solutions) or ``"vrp"`` (one agent, the same solutions:
    the warm-start of the single-agent VRP_RL baseline; train ``loop.roles=("single",)``).
    meta_thinking_file / reasoning_file: alpaca ``.jsonl`` conversation files (official format).
    file_system_prompt: ``"file"`` keeps each record's system prompt, ``"rollout"`` replaces it by
    the multi-turn RL prompt so SFT and RL see the same text. file_limit: records per file."""

    builtin: bool = True
    mode: Literal["single_turn", "vrp"] = "single_turn"
    families: tuple[str, ...] = FAMILIES
    levels: tuple[int, ...] = (1, 2)
    train_per_cell: int = 8
    test_per_cell: int = 4
    examples_per_cell: int | None = None
    split_seed: int = 0
    prompt_variant: str | None = None
    meta_thinking_file: str | None = None
    reasoning_file: str | None = None
    file_system_prompt: Literal["file", "rollout"] = "file"
    file_limit: int | None = None

    def __post_init__(self):
        if not self.builtin and not (self.meta_thinking_file or self.reasoning_file):
            raise ValueError("no SFT data: set builtin=True or a conversation file")
        if self.mode == "vrp" and (self.meta_thinking_file or self.reasoning_file):
            raise ValueError(
                "mode='vrp' trains the single agent on built-in solutions; the two-role "
                "conversation files are for mode='single_turn'"
            )


@dataclasses.dataclass(frozen=True)
class SFTOptimSection:
    """AdamW, linear warmup then cosine decay over each agent's SFT steps (official: lr 1e-5, full FT)."""

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class SFTLoopSection:
    """epochs over each agent's data; batch_size rows per step; max_seq_len: the longest row
    (longer conversations are cut from the left, counted); roles: the agents trained."""

    epochs: int = 3
    batch_size: int = 4
    max_seq_len: int = 512
    seed: int = 0
    roles: tuple[str, ...] = (META_THINKING, REASONING)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = sorted(set(self.roles) - set(data_lib.SFT_ROLES))
        if bad or not self.roles:
            raise ValueError(f"roles: unknown {bad}; choose from {data_lib.SFT_ROLES}")


@dataclasses.dataclass(frozen=True)
class SFTEvalSection:
    """Greedy held-out evaluation before and after SFT, in ``data.mode`` (single-turn ReMA or VRP)."""

    questions: int = 16
    before: bool = True
    after: bool = True
    max_new_tokens: int = 128
    max_prompt_len: int = 512


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: ModelSection = ModelSection()
    adapter: AdapterConfig = AdapterConfig()
    data: SFTDataSection = SFTDataSection()
    optimizer: SFTOptimSection = SFTOptimSection()
    loop: SFTLoopSection = SFTLoopSection()
    eval: SFTEvalSection = SFTEvalSection()

    def __post_init__(self):
        single = SINGLE in self.loop.roles
        if self.data.mode == "vrp" and tuple(self.loop.roles) != (SINGLE,):
            raise ValueError(
                f"loop.roles: data.mode='vrp' trains the single agent only; set "
                f"loop.roles=('single',), got {tuple(self.loop.roles)}"
            )
        if self.data.mode != "vrp" and single:
            raise ValueError("loop.roles: 'single' needs data.mode='vrp'")
        if single and self.adapter.kind == SHARED:
            raise ValueError("adapter.kind='shared' is for the two ReMA roles; the single agent uses lora/full")


def load_sft_config(config: Any) -> SFTConfig:
    """``ml_collections.ConfigDict`` / dict → validated ``SFTConfig`` (raises ``ConfigError``)."""
    return from_dict(SFTConfig, config, "config")  # wraps every ValueError/TypeError with its path


# ------------------------------------------------------------------------------------ model
def load_model(section: ModelSection):
    """(model_config, params, tokenizer): the pretrained model, or a random one of
    ``section.random_init``'s shape with the tokenizer of ``section.source`` (tests, notebook).
    The RL trainer's builder (``training.base_model``), so RL adapters start on this very base."""
    return build_base_model(section)


# ------------------------------------------------------------------------------------ data
def _first_per_cell(tasks: Sequence, k: int) -> list:
    """The first ``k`` tasks of every (subject, level) cell, in order."""
    taken: collections.Counter = collections.Counter()
    out = []
    for t in tasks:
        if taken[(t.subject, t.level)] < k:
            taken[(t.subject, t.level)] += 1
            out.append(t)
    return out


def build_conversations(cfg: SFTConfig) -> tuple[dict[str, list[data_lib.Conversation]], list]:
    """({role: conversations}, held-out built-in tasks for evaluation)."""
    convs: dict[str, list[data_lib.Conversation]] = {r: [] for r in data_lib.SFT_ROLES}
    test: list = []
    d = cfg.data
    if d.builtin or cfg.eval.questions:
        train, test = builtin_split(
            d.train_per_cell, d.test_per_cell, seed=d.split_seed, families=d.families, levels=d.levels
        )
        if d.builtin:
            if d.examples_per_cell is not None:
                train = _first_per_cell(train, d.examples_per_cell)
            built = data_lib.builtin_conversations(train, mode=d.mode, prompt_variant=d.prompt_variant)
            for role, rows in built.items():
                convs[role].extend(rows)
    rl_prompts = prompts_lib.get_prompts("multi_turn")
    for role, path in ((META_THINKING, d.meta_thinking_file), (REASONING, d.reasoning_file)):
        if path:
            system = rl_prompts[role].system if d.file_system_prompt == "rollout" else None
            convs[role].extend(data_lib.load_alpaca_file(path, role, system_prompt=system, limit=d.file_limit))
    return convs, test


# ------------------------------------------------------------------------------------ step
def masked_nll(
    logprobs_fn,
    tokens_bt,
    attention_mask_bt,
    loss_mask_bt,
    max_loss_tokens: int,
    chunk_size: int = 0,
    trained_head: bool = True,
):
    """Mean negative log-likelihood over the loss tokens of the batch, and their count (`logprobs_fn`,
    `chunk_size` and `trained_head` as in `rl.sparse_token_logprobs_and_entropy`; no entropy gradient)."""
    logp_bt, _ = rl.sparse_token_logprobs_and_entropy(
        logprobs_fn,
        tokens_bt,
        loss_mask_bt,
        max_loss_tokens,
        1.0,
        chunk_size=chunk_size,
        trained_head=trained_head,
        entropy_grad=False,
    )
    mask = loss_mask_bt.at[:, 0].set(0.0)
    count = mask.sum()
    return -(logp_bt * mask).sum() / jnp.maximum(count, 1.0), count


def make_sft_step(model_config, optimizer: rl.MultiAgentOptimizer, layout: AgentLayout):
    """``step(params, opt_state, base, batch, *, agent, k) -> (params, opt_state, metrics)``, jitted.

    ``params`` = ``{agent: tree}``; ``agent`` (static) is trained, the others pass through untouched;
    ``base`` is the frozen base tree (unused by a ``shared`` layout, whose agent is the model itself);
    ``k`` (static) is the number of loss positions gathered per row.
    """

    @functools.partial(jax.jit, static_argnames=("agent", "k"))
    def step(params, opt_state, base, batch, *, agent: str, k: int):
        def loss_fn(weights):
            model, adapter = layout.agent_view({BASE: base, agent: weights}, agent)

            def logits_at(pos_bk):
                return models.forward(
                    model_config,
                    model,
                    batch["tokens"],
                    adapter=adapter,
                    attention_mask=batch["attention_mask"],
                    logits_at_bk=pos_bk,
                    head_inputs=True,
                )

            return masked_nll(
                logits_at,
                batch["tokens"],
                batch["attention_mask"],
                batch["loss_mask"],
                k,
                model_config.logits_chunk,
                trained_head=trains_head(adapter),
            )

        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params[agent])
        new_params, new_opt, m = optimizer.step({agent: grads}, opt_state, params, (agent,))
        return new_params, new_opt, {"loss": loss, "loss_tokens": count, **m}

    return step


# ------------------------------------------------------------------------------------ run
@dataclasses.dataclass
class SFTRun:
    """What ``run_sft`` leaves in memory (the notebook and tests use it)."""

    model_config: Any
    base: Any
    tokenizer: Any
    params: dict[str, Any]
    adapters: dict[str, Adapter | None]
    summary: dict[str, Any]


def run_sft(config: SFTConfig, workdir: str, *, progress: bool = True) -> SFTRun:
    """Fine-tunes the agents on ``config``'s data; writes adapters, checkpoint, metrics, plot, summary."""
    from tqdm import tqdm

    from rema_jax.sampling import Sampler
    from rema_jax.sft.evaluate import evaluate_agents
    from rema_jax.training.checkpoint import CheckpointManager
    from rema_jax.training.metrics import MetricsLogger
    from rema_jax.training.plots import plot_training_curves

    t_run = time.perf_counter()
    cfg, loop = config, config.loop
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(to_dict(cfg), f, indent=2, default=str)

    model_config, base, tokenizer = load_model(cfg.model)
    encoder = ChatEncoder(tokenizer)
    pad_id = int(model_config.pad_token_id if model_config.pad_token_id is not None else 0)

    convs, test_tasks = build_conversations(cfg)
    roles = tuple(r for r in loop.roles if convs[r])
    if not roles:
        raise ValueError(f"no SFT conversations for the trained roles {loop.roles}")
    layout = AgentLayout.for_roles(roles, cfg.adapter)
    # Agent → its rows. The shared model learns both roles' conversations (the official ps_7b_full).
    rows_by_agent: dict[str, list] = {}
    stats: dict[str, Any] = {}
    for role in roles:
        rows, stats[role] = tok_lib.encode_all(convs[role], encoder, loop.max_seq_len)
        rows_by_agent.setdefault(layout.agent_of(role), []).extend(rows)
    steps_per_agent = {a: loop.epochs * tok_lib.num_batches(len(r), loop.batch_size) for a, r in rows_by_agent.items()}
    k = tok_lib.max_loss_bucket([r for rows in rows_by_agent.values() for r in rows], loop.max_seq_len)

    params = layout.init_trainable(model_config, base, cfg.adapter, jax.random.key(loop.seed))
    o = cfg.optimizer
    total = max(steps_per_agent.values())
    optimizer = rl.MultiAgentOptimizer(
        rl.OptimizerConfig(
            learning_rate=o.learning_rate,
            schedule="cosine",
            warmup_steps=min(o.warmup_steps, total - 1),
            decay_steps=total,
            end_lr_ratio=o.end_lr_ratio,
            weight_decay=o.weight_decay,
            max_grad_norm=o.max_grad_norm,
        )
    )
    state = rl.init_rl_state(params, optimizer)
    step_fn = make_sft_step(model_config, optimizer, layout)

    summary: dict[str, Any] = {"data": stats, "steps_per_agent": steps_per_agent, "max_loss_tokens": k}
    eval_tasks = test_tasks[: cfg.eval.questions]
    sampler = Sampler(model_config, tokenizer, max_cache_len=cfg.model.max_cache_len) if eval_tasks else None

    def evaluate(tag: str) -> dict[str, Any]:
        eval_roles = (SINGLE,) if cfg.data.mode == "vrp" else (META_THINKING, REASONING)
        # an agent not trained here samples with the base model
        b, adapters = AgentLayout.for_roles(eval_roles, cfg.adapter).sampling_view({**state.params, BASE: base})
        res = evaluate_agents(
            sampler,
            encoder,
            b,
            adapters,
            eval_tasks,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_prompt_len=cfg.eval.max_prompt_len,
            prompt_variant=cfg.data.prompt_variant,
            mode=cfg.data.mode,
        )
        with open(os.path.join(workdir, f"eval_{tag}.jsonl"), "w", encoding="utf-8") as f:
            for s in res["samples"]:
                f.write(json.dumps(s) + "\n")
        summary[f"eval_{tag}"] = {
            "accuracy": res["accuracy"],
            "boxed_rate": res["boxed_rate"],
            "questions": len(eval_tasks),
        }
        return res

    if eval_tasks and cfg.eval.before:
        evaluate("before")

    logger = MetricsLogger(workdir, tensorboard=False)
    open(logger.path, "w").close()
    # The step order: each epoch, every agent's shuffled batches, interleaved by a seeded shuffle.
    bar = tqdm(
        total=sum(steps_per_agent.values()),
        desc=f"SFT ({', '.join(rows_by_agent)})",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    history = []
    step = 0
    try:
        for epoch in range(loop.epochs):
            queue = []
            for i, (agent, rows) in enumerate(sorted(rows_by_agent.items())):
                batches = tok_lib.epoch_batches(
                    rows, loop.batch_size, loop.max_seq_len, seed=loop.seed * 1000 + i, epoch=epoch, pad_id=pad_id
                )
                queue.extend((agent, b) for b in batches)
            order = np.random.default_rng([loop.seed, epoch, 7]).permutation(len(queue))
            for j in order:
                agent, batch = queue[j]
                t0 = time.perf_counter()
                p, o_state, m = step_fn(
                    state.params, state.opt_state, base, batch, agent=agent, k=min(k, batch["tokens"].shape[1])
                )
                m = jax.device_get(m)
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"SFT step {step} ({agent}): loss is {m['loss']}")
                state = rl.RLState(params=p, opt_state=o_state)
                step += 1
                record = logger.write(
                    step,
                    {
                        f"{agent}/loss": m["loss"],
                        f"{agent}/grad_norm": m["grad_norm"],
                        f"{agent}/lr": m["lr"],
                        f"{agent}/loss_tokens": m["loss_tokens"],
                        "epoch": epoch,
                        "time/step_s": time.perf_counter() - t0,
                    },
                )
                history.append(record)
                bar.set_postfix({"agent": agent[:4], "loss": f"{float(m['loss']):.3f}"})
                bar.update(1)
    finally:
        bar.close()
        logger.close()

    # Save: per-agent adapters (what RL starts from) and the RL checkpoint layout.
    for agent, weights in state.params.items():
        models.save_adapter(
            os.path.join(workdir, ADAPTERS_DIR, agent),
            Adapter(weights=weights, kind=layout.saved_kind, scale=layout.saved_scale),
        )
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), keep_last=1)
    manager.save(
        step,
        {"params": state.params, "opt_state": state.opt_state},
        {"step": step, "stage": "sft", "agents": sorted(state.params)},
        force=True,
    )
    manager.close()

    summary["plot"] = plot_training_curves(
        logger.path,
        os.path.join(workdir, "loss.png"),
        panels=(
            ("SFT loss (masked token NLL)", tuple(f"{a}/loss" for a in rows_by_agent)),
            ("learning rate", tuple(f"{a}/lr" for a in rows_by_agent)),
            ("grad norm", tuple(f"{a}/grad_norm" for a in rows_by_agent)),
        ),
        title=f"SFT ({cfg.data.mode}: {', '.join(rows_by_agent)}) · {cfg.model.source}",
    )
    for agent in rows_by_agent:
        losses = [r[f"{agent}/loss"] for r in history if f"{agent}/loss" in r]
        summary[f"{agent}/loss_first"], summary[f"{agent}/loss_last"] = losses[0], losses[-1]
    if eval_tasks and cfg.eval.after:
        evaluate("after")
    summary.update(
        {"steps": step, "wall_s": time.perf_counter() - t_run, "adapters": os.path.join(workdir, ADAPTERS_DIR)}
    )
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    b, adapters = layout.sampling_view({**state.params, BASE: base})
    return SFTRun(model_config, base, tokenizer, dict(state.params), adapters, summary)
