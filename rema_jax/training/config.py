"""The typed training config: every section a frozen dataclass, validated on load.

``configs/*.py`` files return an ``ml_collections.ConfigDict`` with the same nesting;
``load_train_config`` turns it into a ``TrainConfig`` and fails with the dotted field path on a
wrong key, type or value (before any model is loaded), then checks cross-section consistency.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rema_jax.config_utils import from_dict
from rema_jax.models.adapters import AdapterConfig
from rema_jax.rewards.math_grading import GradingConfig
from rema_jax.rewards.shaping import RewardConfig
from rema_jax.rl.advantages import AdvantageConfig
from rema_jax.rl.losses import DEFAULT_AGG_MODE, SUM_NORM, LossConfig
from rema_jax.rl.optimizer import OptimizerConfig
from rema_jax.rl.update import UpdateConfig
from rema_jax.rollout import REASONING, RolloutConfig
from rema_jax.sharding.mesh import MeshConfig
from rema_jax.tasks.builtin import FAMILIES, NUM_LEVELS
from rema_jax.tasks.loaders import resolve_paths
from rema_jax.training.schedules import ScheduleConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """source: ``smollm2-135m``, a local HF dir, a ``.gguf`` file or a hub id.
    random_init: ``None`` for the pretrained weights, or ``ModelConfig`` overrides (e.g.
    ``{"num_layers": 2, "hidden_size": 64}``) for a random model of that shape that keeps the
    tokenizer (and vocabulary) of ``source`` — for tests and smoke runs.
    max_cache_len: the sampler's KV-cache length (prompt bucket + new tokens).
    init_adapters_from: ``<sft workdir>/adapters`` (``launch/sft.py``): start each agent from its
    supervised warm-start instead of a fresh adapter.
    attention_impl: block attention of the training passes and the prefill: ``reference`` (the
    einsum path the tests are recorded with), ``xla`` or ``cudnn`` (``jax.nn.dot_product_attention``;
    cudnn = fused flash attention, NVIDIA GPUs, bf16). decode_attention_impl: ``dense`` (every cache
    slot, masked) or ``ragged`` (only the slots written so far, blocked online softmax).
    remat: the training passes recompute each layer's activations in the backward pass instead of
    keeping them (``ModelConfig.remat``; the same ops, fp32 rounding apart): at the main command's
    shapes the RL update's XLA:CPU scratch falls from 6.8 to 3.6 GB, for ~1/3 more FLOPs.
    remat_policy: with remat, what each layer keeps for the backward pass (``ModelConfig.remat_policy``;
    the same values): ``full`` recomputes the whole layer; ``save_mlp`` keeps the MLP's gate and up
    products (2 x intermediate_size values per token per layer, ~0.5 GB on the default RL update's
    reasoning micro-batch) and recomputes the rest, for fewer FLOPs.
    scan_layers: the training passes run the decoder layers as one ``lax.scan`` over their stacked
    variables (``ModelConfig.scan_layers``; the same ops): the layer is traced and compiled once, not
    once per layer. The main command's RL update (SmolLM2, 2-core AMD EPYC, 2026-12-06): compile 33 →
    16 s, 39.4 → 33.5 s per update, run peak 3067 → 2509 MiB, compiled update program 564 → 272 MiB.
    logits_chunk: loss positions per chunk of the training passes' vocabulary projection and fp32
    log-softmax (``ModelConfig.logits_chunk``; the same values; see
    ``rl.losses.head_logprobs_and_entropy`` for the backward pass); 0 = all K loss positions of a row
    in one ``[B, K, V]`` block.
    sampler_column_blocks: the sampler's fused kernels are cut into this many column blocks, whose
    products XLA:CPU runs on different threads (``ModelConfig.sampler_column_blocks``; the same
    values); 0 = auto (2 on a one-device CPU for batches of 4 rows or more, else 1).
    sampler_weight_dtype: the dtype of the sampler's fused weight matrices (``ModelConfig.sampler_weight_dtype``);
    None = ``dtype``. ``"bfloat16"`` halves the bytes a decode step streams, with fp32 accumulation;
    the rollout then samples from the bf16-rounded policy (the update's π_old stays fp32, and the
    trainer logs ``*/behaviour_logprob_gap``, the mean |sampler − training| log-prob of the drawn tokens).
    sampler_share_prompts: the sampler prefills each distinct prompt of a call once and a prefix that
    groups of prompts share once per group (``Sampler(share_prefix=...)``, ``sampling.plan_prompts``;
    the same tokens and log-probs, to fp32 rounding); False: every row's whole prompt.
    sampler_compact_min_batch: once a decode's unfinished rows fit a batch bucket half as large, the
    sampler continues them in it, halving down to this batch (``ModelConfig.sampler_compact_min_batch``;
    the same tokens, log-probs to fp32 rounding); 0 = every row steps until the last one finishes;
    None = auto (4 on CPU, 0 on accelerators).
    sampler_layout_reuse: a sampler call runs in a prefill layout the run has used before (its prefill
    and decode programs compiled) when that costs at most this factor times the prefill slots of the
    call's own layout (``ModelConfig.sampler_layout_reuse``; the same tokens, log-probs to fp32
    rounding); 0 = every call compiles its own layout."""

    source: str = "smollm2-135m"
    dtype: str = "float32"
    param_dtype: str | None = None
    random_init: dict[str, Any] | None = None
    max_cache_len: int = 1024
    init_adapters_from: str | None = None
    attention_impl: Literal["reference", "xla", "cudnn"] = "reference"
    decode_attention_impl: Literal["dense", "ragged"] = "dense"
    remat: bool = True
    remat_policy: Literal["full", "save_mlp"] = "full"
    scan_layers: bool = True
    logits_chunk: int = 16
    sampler_column_blocks: int = 0
    sampler_share_prompts: bool = True
    sampler_weight_dtype: str | None = None
    sampler_compact_min_batch: int | None = None
    sampler_layout_reuse: float = 1.5

    def __post_init__(self):
        reuse = self.sampler_layout_reuse
        if isinstance(reuse, bool) or not isinstance(reuse, (int, float)) or not (reuse == 0 or reuse >= 1):
            raise ValueError(f"sampler_layout_reuse must be 0 (off) or a number >= 1, got {reuse!r}")
        least = self.sampler_compact_min_batch
        if least is not None and (not isinstance(least, int) or isinstance(least, bool) or least < 0):
            raise ValueError(
                f"sampler_compact_min_batch must be None (auto) or an int >= 0 (0 = no compaction), got {least!r}"
            )
        if self.sampler_weight_dtype is not None and self.sampler_weight_dtype not in DTYPES:
            raise ValueError(f"sampler_weight_dtype={self.sampler_weight_dtype!r}; expected one of {DTYPES} or None")
        if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ValueError(f"logits_chunk must be an int >= 0 (0 = no chunks), got {self.logits_chunk!r}")
        if not isinstance(self.sampler_column_blocks, int) or self.sampler_column_blocks < 0:
            raise ValueError(
                f"sampler_column_blocks must be an int >= 0 (0 = auto), got {self.sampler_column_blocks!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.param_dtype is not None and self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r}; expected one of {DTYPES} or None")
        if self.max_cache_len < 64:
            raise ValueError(f"max_cache_len must be >= 64, got {self.max_cache_len}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """source ``builtin``: the procedural tasks (families × levels, seeded split, no files).
    source ``benchmark``: ``benchmark`` names a loader (``rema_jax.tasks``) reading ``train_path``
    (a file, a glob or a list of them, e.g. the seven MATH train subject files); ``test_path``
    (optional) is the held-out split. A glob is expanded here, so one that matches no file fails
    validation (naming the pattern) before any model is loaded; plain paths are read at load time."""

    source: Literal["builtin", "benchmark"] = "builtin"
    families: tuple[str, ...] = FAMILIES
    levels: tuple[int, ...] = (1, 2)
    train_per_cell: int = 64
    test_per_cell: int = 16
    split_seed: int = 0
    benchmark: str | None = None
    train_path: str | tuple[str, ...] | None = None
    test_path: str | None = None
    skip_bad_records: bool = False

    def __post_init__(self):
        if self.source == "builtin":
            unknown = sorted(set(self.families) - set(FAMILIES))
            if unknown or not self.families:
                raise ValueError(f"families: unknown {unknown}; choose from {FAMILIES}")
            bad = [lv for lv in self.levels if not 1 <= lv <= NUM_LEVELS]
            if bad or not self.levels:
                raise ValueError(f"levels: {bad or '()'} outside 1..{NUM_LEVELS}")
            if self.train_per_cell < 1 or self.test_per_cell < 0:
                raise ValueError("train_per_cell must be >= 1 and test_per_cell >= 0")
        elif not (self.benchmark and self.train_path):
            raise ValueError("source='benchmark' needs benchmark and train_path")
        else:
            paths = (self.train_path,) if isinstance(self.train_path, str) else self.train_path
            if not all(paths):
                raise ValueError(f"train_path: empty path in {self.train_path!r}")
            try:
                resolve_paths(paths)  # expands the globs; plain paths are not checked here
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"train_path: {e}") from None


@dataclasses.dataclass(frozen=True)
class CurriculumSection:
    """Algorithm 1's filter: at the start of each phase, estimate the success rate of up to
    ``pool_size`` training questions with ``num_samples`` samples at T=1 from the phase's agent
    (the other agent greedy) and keep those within [low, high]."""

    enabled: bool = False
    low: float = 0.2
    high: float = 0.8
    num_samples: int = 10
    pool_size: int = 64

    def __post_init__(self):
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")
        if self.num_samples < 1 or self.pool_size < 1:
            raise ValueError("num_samples and pool_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoopSection:
    """steps: RL steps. questions_per_step: questions per rollout batch (each gets
    ``rollout.num_samples`` trajectories; single-turn MAMRP: plans, each answered
    ``solutions_per_plan`` times). max_seq_len: the static padded length of training sequences.
    eval_every: held-out greedy accuracy every k steps (0: only before and after training).
    eval_batch_size: held-out questions per sampler call (0: all ``eval_questions`` in one call);
    smaller calls hold a smaller KV cache and prefill (host RAM on CPU) at some throughput."""

    steps: int = 12
    questions_per_step: int = 4
    solutions_per_plan: int = 1
    seed: int = 0
    max_seq_len: int = 512
    eval_every: int = 0
    eval_questions: int = 32
    eval_before: bool = True
    eval_batch_size: int = 0

    def __post_init__(self):
        for name in ("steps", "questions_per_step", "solutions_per_plan", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_questions < 0 or self.eval_batch_size < 0:
            raise ValueError("eval_every, eval_questions and eval_batch_size must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """``every``: save every k steps (and at the end); ``keep_last``: the newest checkpoints kept;
    ``keep_steps``: steps also kept for good (e.g. a phase boundary another run branches from)."""

    every: int = 1
    keep_last: int = 3
    keep_steps: tuple[int, ...] = ()

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("every and keep_last must be >= 1")
        if any(s < 1 for s in self.keep_steps):
            raise ValueError(f"keep_steps must be steps >= 1, got {self.keep_steps}")


@dataclasses.dataclass(frozen=True)
class MemorySection:
    """The memory plan printed (main process) and checked before anything is compiled.

    check: refuse a run whose planned per-device peak exceeds ``headroom`` × the device memory.
    device_bytes: the per-device memory to check against when the backend reports none (CPU);
    ``None`` = use ``device.memory_stats()`` and skip the check (with a note) where it has no limit.
    release_programs: when compiled programs are dropped. ``"end"``: the learner's (update, log-prob
    passes) before the evaluation after the last step. ``"phase"``: also the learner's at each phase
    start (the previous phase's agent's programs are compiled again if its phase comes back), the
    programs an evaluation compiled once it ends, and the sampler's rollout programs before the
    evaluation after the last step. On XLA:CPU a program holds host memory growing with the decoder
    layers it unrolls (SmolLM2-135M's update: ~370 MiB, a prefill or decode program ~70 MiB), so
    ``"phase"`` trades recompiles (one per phase switch and per evaluation) for memory."""

    check: bool = True
    device_bytes: int | None = None
    headroom: float = 0.9
    release_programs: str = "end"

    def __post_init__(self):
        if self.release_programs not in ("end", "phase"):
            raise ValueError(f"release_programs must be 'end' or 'phase', got {self.release_programs!r}")
        if self.device_bytes is not None and self.device_bytes < 1:
            raise ValueError(f"device_bytes must be a positive byte count or None, got {self.device_bytes}")
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    adapter: AdapterConfig = AdapterConfig()
    rollout: RolloutConfig = RolloutConfig(mode="single_turn", num_samples=2)
    reward: RewardConfig = RewardConfig()
    grading: GradingConfig = GradingConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    update: UpdateConfig = UpdateConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    curriculum: CurriculumSection = CurriculumSection()
    data: DataSection = DataSection()
    loop: LoopSection = LoopSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshConfig = MeshConfig()
    memory: MemorySection = MemorySection()

    def __post_init__(self):
        single_agent = self.rollout.mode in ("vrp", "mrp")
        if self.adapter.kind == "shared" and not single_agent and self.schedule.kind != "simultaneous":
            raise ValueError("adapter.kind='shared' (one model for both roles) needs schedule.kind='simultaneous'")
        if self.reward.kind == "multi_turn" and self.rollout.mode != "multi_turn":
            raise ValueError(f"reward.kind='multi_turn' needs rollout.mode='multi_turn', got {self.rollout.mode!r}")
        if self.reward.kind == "consistency" and self.rollout.mode != "single_turn":
            raise ValueError("reward.kind='consistency' is a single-turn MAMRP reward")
        if self.reward.kind == "consistency" and self.loop.solutions_per_plan < 2:
            raise ValueError(
                "reward.kind='consistency' needs loop.solutions_per_plan >= 2: the reward is the share of "
                "a plan's solutions that agree, and one solution can only agree with itself, so the "
                "meta-thinking agent would get 1 whenever the reasoning agent boxes anything"
            )
        if (self.reward.kind == "judge") != (self.rollout.task == "judge"):
            raise ValueError("reward.kind='judge' and rollout.task='judge' go together")
        if self.loop.solutions_per_plan > 1 and self.rollout.mode != "single_turn":
            raise ValueError("loop.solutions_per_plan > 1 only applies to rollout.mode='single_turn'")
        if self.rollout.mode == "multi_turn" and self.loss.max_turns < self.rollout.max_turns:
            raise ValueError(
                f"loss.max_turns={self.loss.max_turns} < rollout.max_turns="
                f"{self.rollout.max_turns}: every turn needs a segment"
            )
        if self.loss.temperature != (1.0 if self.rollout.greedy else self.rollout.temperature):
            raise ValueError(
                f"loss.temperature={self.loss.temperature} must equal the rollout "
                f"temperature {self.rollout.temperature} (log-probs of the sampled policy)"
            )
        # loss.agg_mode None (not set) pairs with the estimator: Dr.GRPO's std-free advantage goes
        # with its length-free loss, the token sum over a constant C (default: the most loss tokens
        # a row can hold, turns × max_new_tokens); any other estimator gets trajectory_mean.
        loss = self.loss
        if loss.agg_mode is None:
            loss = dataclasses.replace(
                loss, agg_mode=SUM_NORM if self.advantage.estimator == "dr_grpo" else DEFAULT_AGG_MODE
            )
        if loss.agg_mode == SUM_NORM and loss.token_sum_norm is None:
            turns = self.rollout.max_turns if self.rollout.mode == "multi_turn" else 1
            c = min(turns * self.rollout.max_new_tokens, self.loop.max_seq_len - 1)
            loss = dataclasses.replace(loss, token_sum_norm=float(c))
        object.__setattr__(self, "loss", loss)
        need_seq = self.rollout.max_prompt_len + self.rollout.max_new_tokens + 1
        if self.loop.max_seq_len < need_seq:
            raise ValueError(
                f"loop.max_seq_len={self.loop.max_seq_len} < rollout.max_prompt_len + "
                f"rollout.max_new_tokens + 1 = {need_seq}: a training sequence may not fit"
            )
        prompt_bucket = 1 << max(self.rollout.max_prompt_len - 1, 1).bit_length()
        need_cache = prompt_bucket + self.rollout.max_new_tokens
        if self.model.max_cache_len < need_cache:
            raise ValueError(
                f"model.max_cache_len={self.model.max_cache_len} < {need_cache} (the prompt "
                f"bucket {prompt_bucket} of rollout.max_prompt_len + max_new_tokens)"
            )
        chunk = self.update.num_mini_batches * self.update.num_micro_batches
        for name, n in self.rows_per_step.items():
            if n % chunk:
                raise ValueError(
                    f"{n} {name} rows per step (questions_per_step × num_samples"
                    f"{' × solutions_per_plan' if name == REASONING else ''}) are not divisible by "
                    f"num_mini_batches × num_micro_batches = {chunk}"
                )
        if -1 not in (self.mesh.data, self.mesh.fsdp):  # else checked once the device count is known
            self.check_batch_shards(self.mesh.data * self.mesh.fsdp)
        if self.update.old_logprobs == "in_update" and self.advantage.reads_old_logprobs:
            raise ValueError(
                f"update.old_logprobs='in_update' skips the log-prob pass before the update, but "
                f"advantage.kl_coef={self.advantage.kl_coef} puts a KL(π_old ‖ π_ref) term in the reward, "
                "which reads π_old before the update; use update.old_logprobs='auto' or 'recompute'"
            )
        if self.advantage.estimator == "grpo" and self.rollout.num_samples * self.loop.solutions_per_plan < 2:
            raise ValueError("GRPO needs at least 2 samples per question (rollout.num_samples)")

    @property
    def single_agent(self) -> bool:
        return self.rollout.mode in ("vrp", "mrp")

    @property
    def rows_per_step(self) -> dict[str, int]:
        """Training rows per step, by role: questions × samples, and × solutions per plan for the
        reasoning agent (each plan is answered ``solutions_per_plan`` times)."""
        rows = self.loop.questions_per_step * self.rollout.num_samples
        return {r: rows * (self.loop.solutions_per_plan if r == REASONING else 1) for r in self.rollout.agent_roles}

    @property
    def old_logprobs_in_update(self) -> bool:
        """Whether a step skips the old-log-prob pass: the update takes log π_old from its own forward
        (``update.old_from_update``) and no advantage estimator reads π_old before it."""
        return self.update.old_from_update and not self.advantage.reads_old_logprobs

    def check_batch_shards(self, batch_shards: int) -> None:
        """Raises ``ValueError`` unless every micro-batch (rows / (mini × micro)) splits evenly over
        ``batch_shards`` = mesh data × fsdp devices (the batch axis of the update and log-prob steps)."""
        chunk = self.update.num_mini_batches * self.update.num_micro_batches
        for name, n in self.rows_per_step.items():
            if (n // chunk) % batch_shards:
                raise ValueError(
                    f"mesh: {n} {name} rows per step give micro-batches of {n // chunk} rows (÷ num_mini_batches × "
                    f"num_micro_batches = {chunk}), not divisible by mesh data × fsdp = {batch_shards}; change "
                    "loop.questions_per_step / rollout.num_samples or the mesh"
                )


def load_train_config(config: Any) -> TrainConfig:
    """``ml_collections.ConfigDict`` / dict → validated ``TrainConfig`` (raises ``ConfigError``)."""
    return from_dict(TrainConfig, config, "config")  # wraps every ValueError/TypeError with its path
