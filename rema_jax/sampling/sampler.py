"""`Sampler`: bucketed, compiled-once-per-bucket generation with a static KV cache.

Per call: the distinct prompts (`plan_prompts`: each once, prefixes shared by groups of them once
per group) are left-padded into a (batch bucket, prompt-length bucket) block, the agent's weights
are fused (cached while the same arrays are passed again; each kernel in `column_blocks`
column blocks, see `Sampler.column_blocks`), then two ahead-of-time compiled
executables run: `prefill` (builds the caches) and `decode` (the `lax.while_loop`, caches donated).
Compaction (`Sampler.compact_target`, `ModelConfig.sampler_compact_min_batch`): the decode loop exits
once its unfinished rows fit a batch bucket half as large, and `decode_resume` continues them there
(their caches and loop state gathered), halving again as rows finish; finished rows' results are
read off at each exit. Same tokens (each row samples with its own key); a ReMA rollout's rows end
anywhere between a few and `max_new_tokens` tokens, so the tail steps run at a fraction of the batch.
Executables are cached by everything that fixes their shapes (bucket sizes, static sampling mode,
stop-table shapes, parameter/adapter tree structure), never by values: temperature, top-p, seeds,
max-new-tokens and the adapter's weights are traced inputs, so switching agents does not recompile.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax.models.adapters import Adapter
from rema_jax.models.config import ModelConfig
from rema_jax.sampling import bucketing, kernel, ops, stops
from rema_jax.sampling.types import Generation, SamplerStats, SamplingParams

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
# KV-cache slots are rounded up to a multiple of this (prompt slots + max_new_tokens): the decode
# programs depend on the cache length, not on the prompt bucket (a traced input), so calls whose prompt
# buckets differ a little share their decode and continuation programs (each compile costs ~3 s for
# SmolLM2 on 2 CPU cores).
CACHE_MULTIPLE = 64
MIN_PREFIX_SAVING = 0.2  # share a prefix only when prefill shrinks by at least this fraction
# Auto column blocks (`ModelConfig.sampler_column_blocks = 0`): cut each fused kernel in 2 on a
# one-device CPU from this batch bucket up. On 2 AMD EPYC cores a SmolLM2 decode step took 100 ms
# instead of 123 at batch 32, 63 instead of 67 at 16, about the same at 2 and 4, and 33 instead of
# 25 at batch 1 (one GEMV already streams the weights at full bandwidth there).
AUTO_COLUMN_BLOCKS, AUTO_COLUMN_BLOCKS_MIN_BATCH = 2, 4
# Auto compaction (`ModelConfig.sampler_compact_min_batch = None`): on CPU, halve the decode batch down
# to 4 rows. SmolLM2 on 2 AMD EPYC cores: a decode step took ~43-47 ms at 8 rows and ~55-70 at 16
# (~22 at 1: the weights' streaming); the default RL step's rollout fell 13.3 -> 12.0 s. Off on
# accelerators, whose decode step is nearly flat in the batch (not measured here).
AUTO_COMPACT_MIN_BATCH = 4


def _tree_signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class PromptPlan(NamedTuple):
    """How a call's prompts are prefilled (`plan_prompts`): each distinct prompt once, after its
    group's shared prefix of `prefix_len` tokens (0: no prefix, whole prompts)."""

    prompts: list[list[int]]  # the distinct prompts, in order of first appearance
    prompt_of_row: list[int]  # row i continues prompts[prompt_of_row[i]]
    prefixes: list[list[int]]  # [G] the groups' shared first prefix_len tokens ([] when prefix_len is 0)
    group_of_prompt: list[int]  # prompts[u] starts with prefixes[group_of_prompt[u]]
    prefix_len: int  # S
    remainder_len: int  # Q: the prompt-slot bucket after the prefix (the whole-prompt bucket when S = 0)
    prompt_bucket: int  # U: the batch bucket of the distinct prompts
    group_bucket: int  # G: the batch bucket of the prefixes (0 when S = 0)

    @property
    def prefill_slots(self) -> int:
        """Token passes the prefill computes: G prefixes of S slots and U remainders of Q slots."""
        return self.group_bucket * self.prefix_len + self.prompt_bucket * self.remainder_len


def _group_by_prefix(prompts: Sequence[Sequence[int]], prefix_len: int) -> tuple[list[list[int]], list[int]]:
    """The distinct `prefix_len`-token prefixes of `prompts`, in order of first appearance, and each
    prompt's index among them."""
    groups: dict[tuple, int] = {}
    group_of_prompt = [groups.setdefault(tuple(p[:prefix_len]), len(groups)) for p in prompts]
    return [list(g) for g in groups], group_of_prompt


def fit_plan(plan: PromptPlan, prefix_len: int, remainder_len: int, group_bucket: int) -> Optional[PromptPlan]:
    """`plan`'s distinct prompts laid out with another program's lengths: a shared prefix of
    `prefix_len` tokens in at most `group_bucket` groups (0 and 0: whole prompts) and remainders in
    `remainder_len` slots; None when they do not fit (a prompt with no own token after the prefix, a
    remainder longer than its slots, more distinct prefixes than groups)."""
    longest, shortest = max(map(len, plan.prompts)), min(map(len, plan.prompts))
    if prefix_len == 0:
        if group_bucket or longest > remainder_len:
            return None
        return plan._replace(
            prefixes=[],
            group_of_prompt=[0] * len(plan.prompts),
            prefix_len=0,
            remainder_len=remainder_len,
            group_bucket=0,
        )
    if shortest <= prefix_len or longest - prefix_len > remainder_len:
        return None
    prefixes, group_of_prompt = _group_by_prefix(plan.prompts, prefix_len)
    if len(prefixes) > group_bucket:
        return None
    return plan._replace(
        prefixes=prefixes,
        group_of_prompt=group_of_prompt,
        prefix_len=prefix_len,
        remainder_len=remainder_len,
        group_bucket=group_bucket,
    )


def plan_prompts(rows: Sequence[Sequence[int]], buckets: Sequence[int], share: bool = True) -> PromptPlan:
    """Each distinct prompt once, and the shared-prefix length S (on the length-bucket ladder, leaving
    every prompt >= 1 own token) with the cheapest prefill `G_bucket * S + U_bucket * Q(S)`, where G is
    the number of distinct S-token prefixes and Q(S) the remainders' bucket. A prefix is used only if it
    saves at least `MIN_PREFIX_SAVING` of the whole-prompt prefill and does not lengthen the prompt slots
    (S + Q <= the whole-prompt bucket, so decode attends over no more slots). `share=False`: every row's
    whole prompt (the plain path)."""
    rows = [list(r) for r in rows]
    if share:
        index: dict[tuple, int] = {}
        prompt_of_row = [index.setdefault(tuple(r), len(index)) for r in rows]
        prompts = [list(p) for p in index]
    else:
        prompts, prompt_of_row = rows, list(range(len(rows)))
    longest, shortest = max(len(p) for p in prompts), min(len(p) for p in prompts)
    plain = bucketing.length_bucket(longest, MIN_PROMPT_BUCKET)
    u_bucket = bucketing.batch_bucket(len(prompts), buckets)
    best = PromptPlan(prompts, prompt_of_row, [], [0] * len(prompts), 0, plain, u_bucket, 0)
    if not share or len(prompts) < 2:  # one distinct prompt: nothing to share beyond running it once
        return best
    best_cost = (1 - MIN_PREFIX_SAVING) * best.prefill_slots
    s = MIN_PROMPT_BUCKET
    while s <= shortest - 1:
        q = bucketing.length_bucket(longest - s, MIN_PROMPT_BUCKET)
        prefixes, group_of_prompt = _group_by_prefix(prompts, s)
        plan = PromptPlan(
            prompts, prompt_of_row, prefixes, group_of_prompt, s, q, u_bucket,
            bucketing.batch_bucket(len(prefixes), buckets),
        )  # fmt: skip
        if s + q <= plain and plan.prefill_slots <= best_cost:
            best, best_cost = plan, plan.prefill_slots
        s = bucketing.length_bucket(s + 1)
    return best


class Sampler:
    """Generates continuations of chat-templated token-id prompts (see `generate`).

    Args:
      config: the model config.
      tokenizer: a HF tokenizer (decoding, EOS ids, stop-string byte tables).
      max_cache_len: the longest prompt bucket + generation the KV cache may hold.
      batch_buckets: allowed batch sizes; bigger calls are split into chunks of the largest.
      fused_cache_size: how many agents' fused weights to keep between calls (2 = both ReMA agents).
      share_prefix: prefill each distinct prompt of a call once, and a prefix that groups of its
        prompts share (the agent's system prompt and chat-template head, and the question) once per
        group, when that saves at least `MIN_PREFIX_SAVING` of the prefill (`plan_prompts`; the same
        tokens and log-probs either way, to fp32 rounding; tested). False: every row's whole prompt.
    """

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Any,
        *,
        max_cache_len: int = 2048,
        batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128),
        fused_cache_size: int = 2,
        share_prefix: bool = True,
    ):
        if not batch_buckets or any(int(b) <= 0 for b in batch_buckets):
            raise ValueError(f"Sampler batch_buckets must be positive ints, got {batch_buckets!r}")
        if max_cache_len < MIN_PROMPT_BUCKET + 1:
            raise ValueError(f"Sampler max_cache_len={max_cache_len} is too small (>= {MIN_PROMPT_BUCKET + 1})")
        self.config = config
        self.tokenizer = tokenizer
        self.max_cache_len = int(max_cache_len)
        self.batch_buckets = tuple(sorted(int(b) for b in batch_buckets))
        self._fused_cache_size = int(fused_cache_size)
        self.share_prefix = bool(share_prefix)
        self._fused: list[tuple[list, int, Any]] = []  # [(leaves of (params, adapter), column blocks, FusedParams)]
        self._executables: dict[tuple, Any] = {}
        self._layouts: set[tuple[int, ...]] = set()  # prefill layouts run: (b, u, g, S, Q, cache) (`_known_layout`)
        self._compile_seconds = 0.0
        self._compile_count = 0
        self._token_table: Optional[tuple[jnp.ndarray, jnp.ndarray]] = None
        self._stop_tables: dict[tuple[str, ...], stops.StopTables] = {}
        self.stats = SamplerStats()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def compile_count(self) -> int:
        """Number of compilations so far (fuse, prefill and decode executables; a dropped program
        compiled again counts again)."""
        return self._compile_count

    def program_keys(self) -> frozenset:
        """The keys of the compiled programs held now (for `drop_programs(keep=...)`)."""
        return frozenset(self._executables)

    def drop_programs(self, keep=frozenset()) -> int:
        """Forgets the compiled programs whose keys are not in `keep` (the next call that needs one
        compiles it again): on XLA:CPU each holds host memory growing with the layers it unrolls.
        Returns how many were dropped."""
        dropped = [k for k in self._executables if k not in keep]
        for k in dropped:
            del self._executables[k]
        return len(dropped)

    def reset_stats(self) -> SamplerStats:
        """Returns the timing/token counters so far and starts new ones (compiled programs are kept)."""
        old, self.stats = self.stats, SamplerStats()
        return old

    @property
    def fused_cache_size(self) -> int:
        """How many agents' fused weights are kept between calls."""
        return self._fused_cache_size

    def release_fused(self) -> int:
        """Drops the cached fused weights (one base-sized copy per agent); the next `generate` fuses
        again. Compiled executables are kept. Returns how many copies were dropped."""
        n, self._fused = len(self._fused), []
        return n

    @property
    def compile_seconds(self) -> float:
        """Total wall time spent compiling."""
        return self._compile_seconds

    def _compiled(self, key: tuple, fn, donate: tuple[int, ...], *args):
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            dt = time.perf_counter() - t0
            self._compile_seconds += dt  # lifetime total; stats.compile_s restarts at reset_stats()
            self.stats.compile_s += dt
            self._executables[key] = exe
            self._compile_count += 1
        return exe

    # ------------------------------------------------------------------ inputs
    def _eos_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        if sampling.ignore_eos:
            return ()
        if sampling.eos_ids is not None:
            return sampling.eos_ids
        ids = list(self.config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(int(tok_eos))
        return tuple(ids)

    def _stop_tables_for(self, stop_strings: tuple[str, ...]) -> Optional[stops.StopTables]:
        if not stop_strings:
            return None
        if stop_strings not in self._stop_tables:
            if self._token_table is None:
                table, lengths = stops.build_token_table(stops.token_bytes(self.tokenizer, self.config.vocab_size))
                self._token_table = (jnp.asarray(table), jnp.asarray(lengths))
            s, sl = stops.build_stop_arrays(stop_strings)
            self._stop_tables[stop_strings] = stops.StopTables(*self._token_table, jnp.asarray(s), jnp.asarray(sl))
        return self._stop_tables[stop_strings]

    def _check_adapter(self, adapter: Optional[Adapter]) -> None:
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(
                f"Sampler.generate: adapter must be a rema_jax.models.adapters.Adapter or None, "
                f"got {type(adapter).__name__}"
            )

    def column_blocks(self, batch: int) -> tuple[int, bool]:
        """(column blocks of the fused kernels for a call of `batch` rows (its bucket), whether a
        cached copy with another block count will do): `ModelConfig.sampler_column_blocks`, or when
        it is 0 (auto) `AUTO_COLUMN_BLOCKS` on a one-device CPU for buckets from
        `AUTO_COLUMN_BLOCKS_MIN_BATCH` up, else 1. Auto calls below that size reuse whatever copy is
        cached: re-fusing would cost more than the small call gains."""
        fixed = self.config.sampler_column_blocks
        if fixed:
            return fixed, False
        if jax.default_backend() != "cpu" or jax.device_count() != 1:
            return 1, False
        if bucketing.batch_bucket(batch, self.batch_buckets) >= AUTO_COLUMN_BLOCKS_MIN_BATCH:
            return AUTO_COLUMN_BLOCKS, False
        return 1, True

    def compact_target(self, batch: int) -> int:
        """The batch a decode of `batch` rows continues in once at most that many rows are unfinished:
        the largest batch bucket <= batch // 2 and >= `ModelConfig.sampler_compact_min_batch` (None:
        `AUTO_COMPACT_MIN_BATCH` on CPU, else off); 0 (never compact) when there is none or compaction
        is off (min batch 0)."""
        least = self.config.sampler_compact_min_batch
        if least is None:
            least = AUTO_COMPACT_MIN_BATCH if jax.default_backend() == "cpu" else 0
        fits = [k for k in self.batch_buckets if least and least <= k <= batch // 2]
        return max(fits) if fits else 0

    @staticmethod
    def _record_rows(out: kernel.DecodeState, res: kernel.DecodeState, slot_row: np.ndarray, last: bool) -> None:
        """Copies the non-filler slots of a decode's state `res` that have finished (`last`: all of
        them) into `out` (one row per chunk row)."""
        slots = np.flatnonzero((slot_row >= 0) & (res.done_b | last))
        rows = slot_row[slots]
        for name in ("tokens_bn", "logprobs_bn", "lengths_b", "stopped_b"):
            getattr(out, name)[rows] = getattr(res, name)[slots]

    def _fused_params(self, params: dict, adapter: Optional[Adapter], batch: int) -> kernel.FusedParams:
        """Fused weights of this agent, reused while the very same arrays are passed again."""
        blocks, any_blocks = self.column_blocks(batch)
        leaves = jax.tree.leaves((params, adapter))

        def same_weights(cached_leaves):
            return len(cached_leaves) == len(leaves) and all(a is b for a, b in zip(cached_leaves, leaves))

        for cached_leaves, cached_blocks, fused in self._fused:
            if same_weights(cached_leaves) and (any_blocks or cached_blocks == blocks):
                return fused
        # A copy of these weights with other column blocks is stale from now on: drop it first.
        self._fused = [entry for entry in self._fused if not same_weights(entry[0])]
        key = (
            "fuse",
            _tree_signature((params, adapter)),
            None if adapter is None else (adapter.kind, adapter.scale),
            blocks,
        )
        exe = self._compiled(key, lambda p, a: kernel.fuse_params(self.config, p, a, blocks), (), params, adapter)
        # Evict before fusing: with a full cache the new copy would otherwise coexist with the one it
        # replaces (one base-sized copy more at the peak of every agent switch).
        del self._fused[max(self._fused_cache_size - 1, 0) :]
        t0 = time.perf_counter()
        fused = jax.block_until_ready(exe(params, adapter))
        self.stats.fuse_s += time.perf_counter() - t0
        self._fused = ([(leaves, blocks, fused)] + self._fused)[: self._fused_cache_size]
        return fused

    def _validate_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if len(prompts) == 0:
            raise ValueError("Sampler.generate: prompts is empty")
        out = []
        v = self.config.vocab_size
        for i, p in enumerate(prompts):
            try:
                ids = [int(t) for t in p]
            except (TypeError, ValueError):
                raise TypeError(
                    f"Sampler.generate: prompt {i} must be a sequence of int token ids, got "
                    f"{type(p).__name__} {str(p)[:60]!r}"
                ) from None
            if not ids:
                raise ValueError(f"Sampler.generate: prompt {i} is empty (need at least one token id)")
            bad = [t for t in ids if not 0 <= t < v]
            if bad:
                raise ValueError(f"Sampler.generate: prompt {i} has token ids outside [0, {v}): {bad[:5]}")
            out.append(ids)
        return out

    def _row_seeds(self, seed, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(base seeds [n] uint32, row ids [n] int32): an int seed s gives row i the key
        fold_in(key(s), i); per-row seeds [n] give row i fold_in(key(seeds[i]), 0)."""
        if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            raise TypeError("Sampler.generate: seed must be an int or per-row int seeds, not a PRNG key")
        arr = np.asarray(seed)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"Sampler.generate: seed must be an int or an int array, got dtype {arr.dtype}")
        if arr.ndim == 0:
            return np.full((n,), int(arr) & 0xFFFFFFFF, np.uint32), np.arange(n, dtype=np.int32)
        if arr.shape != (n,):
            raise ValueError(f"Sampler.generate: per-row seeds must have shape ({n},), got {arr.shape}")
        return (arr.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32), np.zeros((n,), np.int32)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        params: dict,
        adapter: Optional[Adapter],
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        seed: int | jax.Array = 0,
    ) -> list[Generation]:
        """Samples a continuation for every prompt (lists of token ids, already chat-templated).

        Rows are independent: a row's tokens do not depend on the other rows of the batch (for a
        fixed row seed). `seed`: an int (row i uses key fold_in(key(seed), i)) or per-row ints.
        """
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"Sampler.generate: sampling must be SamplingParams, got {type(sampling).__name__}")
        self._check_adapter(adapter)
        rows = self._validate_prompts(prompts)
        seeds, row_ids = self._row_seeds(seed, len(rows))
        chunk = self.batch_buckets[-1]
        fused = self._fused_params(params, adapter, min(len(rows), chunk))
        out: list[Generation] = []
        for start in range(0, len(rows), chunk):
            sl = slice(start, start + chunk)
            out.extend(self._generate_chunk(fused, rows[sl], sampling, seeds[sl], row_ids[sl]))
        return out

    def _decode(self, mode, n_out, static, n, fused, caches, logits, inp, host_inp, stop_tables) -> kernel.DecodeState:
        """Runs `kernel.decode` on the prefilled `caches` (`static`: the rest of its programs' key),
        then, while it exits with at most `compact_target(batch)` rows unfinished, continues those rows
        in that smaller batch (`kernel.decode_resume`). Returns every chunk row's outputs (numpy, row i
        of the chunk in row i; `host_inp`: the per-row inputs, gathered on the host)."""
        cfg, b = self.config, len(host_inp["pad_b"])
        exit_at = self.compact_target(b)
        decode_exe = self._compiled(
            ("decode", b, exit_at) + static,
            lambda f, c, lg, i, st: kernel.decode(cfg, mode, f, c, lg, i, st, n_out=n_out, exit_at=exit_at),
            (1,),
            fused,
            caches,
            logits,
            inp,
            stop_tables,
        )
        t0 = time.perf_counter()
        state, caches = decode_exe(fused, caches, logits, inp, stop_tables)
        res = jax.device_get(state)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_row_steps += b * (int(res.t) - 1)
        out = kernel.DecodeState(*(np.array(x) for x in res))  # per chunk row (slot i = row i at first)
        slot_row = np.where(np.arange(b) < n, np.arange(b), -1)  # the chunk row in each slot (-1: filler)
        while exit_at and not res.done_b.all():
            self._record_rows(out, res, slot_row, last=False)
            # Always the next size down (never a jump to a smaller bucket that would also hold them):
            # a call compiles at most one continuation program per halving, whichever rows survive.
            alive, k = np.flatnonzero(~res.done_b), exit_at
            keep = np.concatenate([alive, np.full(k - len(alive), np.flatnonzero(res.done_b)[0])])
            slot_row = np.where(np.arange(k) < len(alive), slot_row[keep], -1)
            host_inp = {name: a[keep] for name, a in host_inp.items()}
            inp = inp._replace(**{name: jnp.asarray(a) for name, a in host_inp.items()})
            keep_k = jnp.asarray(keep, jnp.int32)
            cur_b, exit_at = len(res.done_b), self.compact_target(k)
            resume_exe = self._compiled(
                ("decode_resume", cur_b, k, exit_at) + static,
                lambda f, c, st_, kp, i, st: kernel.decode_resume(cfg, mode, f, c, st_, kp, i, st, exit_at=exit_at),
                (),
                fused,
                caches,
                state,
                keep_k,
                inp,
                stop_tables,
            )
            t0, t_before = time.perf_counter(), int(res.t)
            state, caches = resume_exe(fused, caches, state, keep_k, inp, stop_tables)
            res = jax.device_get(state)
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_row_steps += k * (int(res.t) - t_before)
            self.stats.compactions += 1
        self._record_rows(out, res, slot_row, last=True)
        return out

    def _cache_len(self, prompt_slots: int, max_new_tokens: int) -> int:
        """KV-cache slots for a prompt layout of `prompt_slots` and a generation of `max_new_tokens`."""
        return min(bucketing.round_up(prompt_slots + max_new_tokens, CACHE_MULTIPLE), self.max_cache_len)

    def _known_layout(self, batch: int, plan: PromptPlan, max_new_tokens: int) -> PromptPlan:
        """`plan` (a call's own cheapest prefill layout), or the cheapest prefill layout this sampler
        has run before that fits the call's prompts (`fit_plan`: same batch and prompt buckets, the
        cache length its lengths give) with at most `ModelConfig.sampler_layout_reuse` times `plan`'s
        prefill slots: that layout's prefill and decode programs are compiled already. Rollout prompts
        change length from step to step, and a new prefill program (with decode programs for a new
        cache length) costs 4-8 s of compiling for SmolLM2 on 2 CPU cores, where ~100 more prefill
        slots cost ~0.2 s. Depends only on the layouts run so far (`layout_record`), never on timings,
        so a resumed run that loads the record chooses what the uninterrupted run would."""
        if not self.config.sampler_layout_reuse:
            return plan
        limit = self.config.sampler_layout_reuse * plan.prefill_slots
        best = None
        for b, u, g, s_len, q_len, cache_len in sorted(self._layouts):
            if b != batch or u != plan.prompt_bucket or (s_len and not self.share_prefix):
                continue
            if cache_len != self._cache_len(s_len + q_len, max_new_tokens):
                continue
            fitted = fit_plan(plan, s_len, q_len, g)
            if fitted is not None and fitted.prefill_slots <= limit:
                if best is None or fitted.prefill_slots < best.prefill_slots:
                    best = fitted
        return plan if best is None else best

    def layout_record(self) -> list:
        """The prefill layouts run so far, as JSON (for a checkpoint: `_known_layout` chooses among
        them, and a layout decides the prefill's matmul shapes, hence its fp32 rounding)."""
        return [list(layout) for layout in sorted(self._layouts)]

    def load_layout_record(self, record: Sequence[Sequence[int]]) -> None:
        """Adds a `layout_record` (their programs compile when first used)."""
        self._layouts.update(tuple(int(x) for x in layout) for layout in record)

    def _generate_chunk(
        self,
        fused: kernel.FusedParams,
        rows: list[list[int]],
        sampling: SamplingParams,
        seeds: np.ndarray,
        row_ids: np.ndarray,
    ) -> list[Generation]:
        n = len(rows)
        b = bucketing.batch_bucket(n, self.batch_buckets)
        plan = self._known_layout(b, plan_prompts(rows, self.batch_buckets, self.share_prefix), sampling.max_new_tokens)
        u, g = plan.prompt_bucket, plan.group_bucket
        s_len, q_len = plan.prefix_len, plan.remainder_len
        p = s_len + q_len  # prompt slots
        n_out = bucketing.next_pow2(sampling.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
        cache_len = self._cache_len(p, sampling.max_new_tokens)
        if p + sampling.max_new_tokens - 1 > cache_len:
            raise ValueError(
                f"Sampler.generate: prompt bucket {p} (longest prompt {max(len(r) for r in rows)}) + "
                f"max_new_tokens {sampling.max_new_tokens} exceeds max_cache_len={self.max_cache_len}"
            )
        self._layouts.add((b, u, g, s_len, q_len, cache_len))
        tokens_up, pad_u = bucketing.left_pad([r[s_len:] for r in plan.prompts], u, q_len)
        prompt_b = np.zeros((b,), np.int32)  # filler rows continue prompt 0
        prompt_b[:n] = plan.prompt_of_row
        pad_b = pad_u[prompt_b]
        active = np.arange(b) < n
        seeds_b = np.zeros((b,), np.uint32)
        seeds_b[:n] = seeds
        row_ids_b = np.zeros((b,), np.int32)
        row_ids_b[:n] = row_ids
        eos = self._eos_ids(sampling)
        mode = ops.SamplingMode(
            greedy=sampling.greedy,
            top_k=0 if sampling.greedy else sampling.top_k,
            use_top_p=(not sampling.greedy) and sampling.top_p < 1.0,
        )
        stop_tables = self._stop_tables_for(sampling.stop_strings)
        inp = kernel.DecodeInputs(
            pad_b=jnp.asarray(pad_b),
            prefix_len=jnp.int32(s_len),
            prompt_len=jnp.int32(p),
            active_b=jnp.asarray(active),
            seeds_b=jnp.asarray(seeds_b),
            row_ids_b=jnp.asarray(row_ids_b),
            max_new_tokens=jnp.int32(sampling.max_new_tokens),
            temperature=jnp.float32(sampling.temperature),
            top_p=jnp.float32(sampling.top_p),
            eos_ids=jnp.asarray(np.asarray(eos, np.int32).reshape(-1)),
        )
        fsig = _tree_signature(fused)

        cfg = self.config
        prefix_gs = group_u = None
        if s_len:
            prefixes = plan.prefixes + [plan.prefixes[0]] * (g - len(plan.prefixes))  # filler groups
            prefix_gs = jnp.asarray(np.asarray(prefixes, np.int32))
            if g > 1:  # one group: its prefix is broadcast to every row, no gather
                group_u = np.zeros((u,), np.int32)
                group_u[: len(plan.prompts)] = plan.group_of_prompt
                group_u = jnp.asarray(group_u)
        prompt_dev = None if u == b and plan.prompt_of_row == list(range(n)) else jnp.asarray(prompt_b)
        args = (fused, jnp.asarray(tokens_up), jnp.asarray(pad_u), prefix_gs, group_u, prompt_dev)
        prefill_exe = self._compiled(
            ("prefill", b, u, g, s_len, q_len, cache_len, prompt_dev is None, fsig),
            lambda f, t, pd, pre, grp, rows_: kernel.prefill(cfg, f, t, pd, cache_len, pre, grp, rows_),
            (),
            *args,
        )
        t0 = time.perf_counter()
        caches, logits = jax.block_until_ready(prefill_exe(*args))
        self.stats.prefill_s += time.perf_counter() - t0
        stop_sig = None if stop_tables is None else _tree_signature(stop_tables)
        static = (cache_len, n_out, mode, len(eos), stop_sig, fsig)
        host_inp = dict(pad_b=pad_b, active_b=active, seeds_b=seeds_b, row_ids_b=row_ids_b)
        res = self._decode(mode, n_out, static, n, fused, caches, logits, inp, host_inp, stop_tables)
        st = self.stats
        st.calls += 1
        st.prompt_tokens += sum(len(r) for r in rows)
        st.prefill_slots += plan.prefill_slots
        st.new_tokens += int(res.lengths_b[:n].sum())
        gens = []
        eos_set = set(eos)
        for i in range(n):
            k = int(res.lengths_b[i])
            ids = res.tokens_bn[i, :k].tolist()
            stopped = bool(res.stopped_b[i])
            text_ids = ids[:-1] if stopped and ids and ids[-1] in eos_set else ids
            gens.append(
                Generation(
                    token_ids=ids,
                    logprobs=res.logprobs_bn[i, :k].astype(float).tolist(),
                    finish_reason="stop" if stopped else "length",
                    text=self.tokenizer.decode(text_ids),
                )
            )
        return gens
