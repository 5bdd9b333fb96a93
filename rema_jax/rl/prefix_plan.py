"""Host-side plan for shared-prefix training passes: which rows share a token prefix, bucketed.

Rows of one role in an RL batch repeat long prefixes: every row of a question starts with the same
system prompt, chat head and question; the reasoning agent's rows that answer the same plan also
share the plan. `plan_prefix` groups the rows of each micro-batch whose prompts (the tokens before
the first loss position) are identical, keeps one copy of each group's prompt (the "prefix"), and
leaves each row its remainder (the "suffix"). `models.forward_shared_prefix` then runs the U unique
prefixes once and the B suffixes against the prefixes' keys and values.

Nested plans add a level above the prefixes: distinct prompts that begin alike (the reasoning
agent's prompts for the plans of one question share the system prompt, chat head and question and
differ in the plan) form G groups; each group's common part (the "outer" prefix, r_g tokens) runs
once, each prompt's rest (the "inner" prefix) attends to it, and the suffixes attend to both. A
micro-batch of one question, 4 plans and 2 solutions each then costs `R + 4·P_inner + 8·S` token
positions instead of `4·P + 8·S`. The plan nests only when that saves `MIN_NEST_SAVING` of the flat
plan's positions.

The prefix of a row ends one token before its first loss token: the logits that score that token
come from the position before it, which must be a suffix position. In multi-turn rows only the
first prompt is shared; later turns stay in the suffix.

Static shapes: a flat prefix length P rounds up to a multiple of `prefix_multiple` (64), a nested
plan's outer length R to a multiple of `nest_multiple` (32) and its inner length P to one of
`inner_multiple` (8), the suffix length S to a multiple of `suffix_multiple` (8), prefixes (groups) per micro-batch U (G) to a power of two (at
most the micro-batch's rows); steps whose rows fall in the same buckets reuse one compilation.
`min_buckets` (`PrefixPlan.buckets`: (U, P, S) flat, (G, R, U, P, S) nested) keeps a later batch in
the structure and at least the buckets of an earlier one, and `min_suffix` raises S: the learner
passes the largest buckets it has used so far (the suffix starting at the rollout's answer length),
so a run compiles each pass a few times instead of once per new bucket combination (one compile of
the real model's update costs more than a step's saving). When sharing would not cut the token
positions computed by `min_saving` (or the rows are not right-padded), the plan is None and the
caller runs the plain path.
"""

from __future__ import annotations

from typing import Optional

import flax
import numpy as np

from rema_jax.sampling.bucketing import round_up

PREFIX_MULTIPLE = 64
NEST_MULTIPLE = 32
SUFFIX_MULTIPLE = 8
MIN_SAVING = 0.1
MIN_NEST_SAVING = 0.1


@flax.struct.dataclass
class PrefixPlan:
    """The arrays a shared-prefix pass reads, for C micro-batches ("chunks") of n rows each (B = C·n).

    prefix_tokens: int32 [C·U, P]  each chunk's U unique prefixes (nested: from their group's
                                   outer prefix on), right-padded (chunk-major)
    prefix_mask:   int32 [C·U, P]  1 on real prefix tokens (filler prefixes are all 0)
    row_prefix:    int32 [B]       the row's prefix, indexed within its chunk (0 .. U-1)
    prefix_len:    int32 [B]       tokens of the row taken from its prefix (outer + inner when
                                   nested; its suffix starts there)
    suffix_tokens: int32 [B, S]    tokens[prefix_len : prefix_len + S] of the row, right-padded
    suffix_mask:   int32 [B, S]    1 on the row's real suffix tokens
    Nested plans only (None when flat):
    outer_tokens:  int32 [C·G, R]  each chunk's G outer prefixes, right-padded
    outer_len:     int32 [C·G]     r_g, the real tokens of outer prefix g (0 for filler groups)
    prefix_outer:  int32 [C·U]     the outer prefix of each prefix, indexed within its chunk

    Row fields split like the batch's other ``[B, ...]`` fields; the prefix and outer fields split
    into the same C chunks because they are laid out chunk-major, so `jax.tree.map(reshape)` keeps
    them aligned.
    """

    prefix_tokens: np.ndarray
    prefix_mask: np.ndarray
    row_prefix: np.ndarray
    prefix_len: np.ndarray
    suffix_tokens: np.ndarray
    suffix_mask: np.ndarray
    outer_tokens: Optional[np.ndarray] = None
    outer_len: Optional[np.ndarray] = None
    prefix_outer: Optional[np.ndarray] = None

    @property
    def nested(self) -> bool:
        return self.outer_tokens is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The static bucket of this plan: ``(C·U, P, S)``, nested ``(C·G, R, C·U, P, S)``."""
        flat = (*np.shape(self.prefix_tokens), np.shape(self.suffix_tokens)[1])
        return (*np.shape(self.outer_tokens), *flat) if self.nested else flat

    def buckets(self, num_chunks: int) -> tuple[int, ...]:
        """Per-chunk buckets, as `plan_prefix(min_buckets=...)` takes them: ``(U, P, S)`` or ``(G, R, U, P, S)``."""
        shape = list(self.shape)
        shape[0] //= num_chunks
        if self.nested:
            shape[2] //= num_chunks
        return tuple(shape)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _right_padded(mask_bt: np.ndarray) -> bool:
    lengths = mask_bt.sum(1)
    return bool((mask_bt == (np.arange(mask_bt.shape[1])[None] < lengths[:, None])).all())


def _common_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _sorted_commons(prompts: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """`prompts` in sorted order (indices) and the tokens each shares with the one before it."""
    order = sorted(range(len(prompts)), key=lambda j: prompts[j].tolist())
    return order, [_common_len(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]


def _outer_groups(prompts: list[np.ndarray], order: list[int], adjacent: list[int], threshold: int):
    """Groups of `prompts` for outer prefixes: in sorted `order`, adjacent prompts with >= `threshold`
    tokens in common (`adjacent`, from `_sorted_commons`) join a group. Returns the group of each
    prompt, and per group the tokens all its prompts share (a single prompt: all of it) and its
    longest prompt."""
    group_of = [0] * len(prompts)
    common: list[int] = []
    longest: list[int] = []
    for pos, j in enumerate(order):
        if pos and adjacent[pos - 1] >= threshold:
            common[-1] = min(common[-1], adjacent[pos - 1])
            longest[-1] = max(longest[-1], len(prompts[j]))
        else:
            common.append(len(prompts[j]))
            longest.append(len(prompts[j]))
        group_of[j] = len(common) - 1
    return group_of, common, longest


def plan_prefix(
    tokens_bt,
    attention_mask_bt,
    loss_mask_bt,
    num_chunks: int = 1,
    *,
    prefix_multiple: int = PREFIX_MULTIPLE,
    suffix_multiple: int = SUFFIX_MULTIPLE,
    nest_multiple: int = NEST_MULTIPLE,
    inner_multiple: int = SUFFIX_MULTIPLE,
    min_saving: float = MIN_SAVING,
    min_nest_saving: float = MIN_NEST_SAVING,
    pad_id: int = 0,
    min_buckets: tuple[int, ...] | None = None,
    min_suffix: int = 0,
    min_inner: int = 0,
    min_prompt: int = 0,
    nest: Optional[bool] = None,
) -> PrefixPlan | None:
    """The shared-prefix plan of a right-padded batch split into `num_chunks` micro-batches, or None
    when sharing saves less than `min_saving` of the token positions (`C·U·P + B·S`, nested
    `C·(G·R + U·P) + B·S`, vs `B·T`).

    Structure: nested when that saves `min_nest_saving` of the flat plan's positions (`nest` forces
    one). `min_buckets` (a plan's `buckets`) forces its structure and raises the buckets to at least
    its sizes; `min_suffix` raises S, `min_inner` a nested plan's P, and `min_prompt` its R so that
    R + P holds prompts of that length (see the module docstring).

    Rows without loss tokens take no prefix (`prefix_len` 0) and keep their first S tokens; their
    log-probs are 0 on either path.
    """
    tokens_bt, mask_bt = np.asarray(tokens_bt), np.asarray(attention_mask_bt) > 0
    loss_bt = np.asarray(loss_mask_bt) > 0
    b, t = tokens_bt.shape
    if num_chunks < 1 or b % num_chunks:
        raise ValueError(f"plan_prefix: {b} rows are not divisible into {num_chunks} chunks")
    if min_buckets is not None:
        if len(min_buckets) not in (3, 5) or (nest is not None and nest != (len(min_buckets) == 5)):
            raise ValueError(
                f"plan_prefix: min_buckets {min_buckets} is not (U, P, S) or (G, R, U, P, S) as nest={nest}"
            )
        nest = len(min_buckets) == 5
    if not _right_padded(mask_bt):
        return None
    n = b // num_chunks
    length_b = mask_bt.sum(1)
    has_loss_b = loss_bt[:, 1:].any(1)
    first_loss_b = np.where(has_loss_b, 1 + np.argmax(loss_bt[:, 1:], axis=1), 0)
    prefix_len_b = np.where(has_loss_b, np.maximum(first_loss_b - 1, 0), 0)

    row_prefix_b = np.zeros(b, np.int32)
    chunk_prefixes = []  # per chunk: the distinct prompts, as token arrays
    for c in range(num_chunks):
        groups: dict[bytes, int] = {}
        reps = []
        for i in range(c * n, (c + 1) * n):
            if not has_loss_b[i]:
                continue
            prompt = tokens_bt[i, : prefix_len_b[i]]
            key = prompt.tobytes()
            if key not in groups:
                groups[key] = len(reps)
                reps.append(prompt)
            row_prefix_b[i] = groups[key]
        chunk_prefixes.append(reps)
    if not any(chunk_prefixes):
        return None
    floor = tuple(min_buckets) if min_buckets is not None else None
    u = min(_pow2(max(len(r) for r in chunk_prefixes)), n)
    s = round_up(int(max(length_b[i] - prefix_len_b[i] for i in range(b) if has_loss_b[i])), suffix_multiple)
    s = max(s, int(min_suffix), floor[-1] if floor else 0)
    u = min(max(u, floor[-3] if floor else 0), n)

    flat_p = round_up(max(len(p) for reps in chunk_prefixes for p in reps), prefix_multiple)
    if floor and not nest:
        flat_p = max(flat_p, floor[1])
    best = (num_chunks * u * flat_p, None)  # (prefix positions, nested layout or None = flat)
    if nest is not False:
        nested = _best_nesting(
            chunk_prefixes, n, u, nest_multiple, inner_multiple, floor if nest else None, min_inner, min_prompt
        )
        if nested is not None and (nest or nested[0] <= (1.0 - min_nest_saving) * best[0]):
            best = nested
        elif nest:
            return None
    prefix_positions, layout = best
    if prefix_positions + b * s > (1.0 - min_saving) * b * t:
        return None

    padded_bt = np.concatenate([tokens_bt, np.full((b, s), pad_id, tokens_bt.dtype)], axis=1)
    padded_mask_bt = np.concatenate([mask_bt, np.zeros((b, s), bool)], axis=1)
    cols_bs = prefix_len_b[:, None] + np.arange(s)[None]
    suffix = dict(
        row_prefix=row_prefix_b,
        prefix_len=prefix_len_b.astype(np.int32),
        suffix_tokens=np.take_along_axis(padded_bt, cols_bs, axis=1).astype(np.int32),
        suffix_mask=np.take_along_axis(padded_mask_bt, cols_bs, axis=1).astype(np.int32),
    )
    if layout is None:
        prefix_tokens, prefix_mask = _pack(chunk_prefixes, u, flat_p, pad_id)
        return PrefixPlan(prefix_tokens=prefix_tokens, prefix_mask=prefix_mask, **suffix)
    g, r, p, group_of, outer_len = layout
    outer = [
        [reps[j][:k] for j, k in _first_of_each(group_of[c], outer_len[c])] for c, reps in enumerate(chunk_prefixes)
    ]
    outer_tokens, outer_mask = _pack(outer, g, r, pad_id)
    inner = [
        [p_j[outer_len[c][group_of[c][j]] :] for j, p_j in enumerate(reps)] for c, reps in enumerate(chunk_prefixes)
    ]
    prefix_tokens, prefix_mask = _pack(inner, u, p, pad_id)
    prefix_outer = np.zeros((num_chunks * u,), np.int32)
    for c, groups_c in enumerate(group_of):
        prefix_outer[c * u : c * u + len(groups_c)] = groups_c
    return PrefixPlan(
        prefix_tokens=prefix_tokens,
        prefix_mask=prefix_mask,
        outer_tokens=outer_tokens,
        outer_len=outer_mask.sum(1).astype(np.int32),
        prefix_outer=prefix_outer,
        **suffix,
    )


def _first_of_each(group_of: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """(a prompt of group g, r_g) for each group g in order."""
    first = {}
    for j, gj in enumerate(group_of):
        first.setdefault(gj, j)
    return [(first[gj], lengths[gj]) for gj in range(len(lengths))]


def _pack(seqs_per_chunk: list[list[np.ndarray]], rows: int, width: int, pad_id: int):
    """Chunk-major right-padded `[C·rows, width]` tokens and their 0/1 mask."""
    tokens = np.full((len(seqs_per_chunk) * rows, width), pad_id, np.int32)
    mask = np.zeros((len(seqs_per_chunk) * rows, width), np.int32)
    for c, seqs in enumerate(seqs_per_chunk):
        for j, seq in enumerate(seqs):
            tokens[c * rows + j, : len(seq)] = seq
            mask[c * rows + j, : len(seq)] = 1
    return tokens, mask


def _best_nesting(
    chunk_prefixes, n: int, u: int, multiple: int, inner_multiple: int, floor, min_inner: int, min_prompt: int
):
    """The cheapest nesting of every chunk's prompts: (prefix positions `C·(G·R + U·P)`, (G, R, P,
    group of each prompt per chunk, outer length r_g per group per chunk)), over the thresholds that
    the prompts' common lengths suggest; None when no two prompts of a chunk have a token in common
    (and no `floor` asks to nest anyway).

    For given groups, the inner bucket P is the least that holds every prompt's part beyond what its
    group shares (at least `min_inner` and the floor's), the outer bucket R the least that holds the
    rest (at least the floor's, and R + P >= `min_prompt`), and group g's outer prefix is
    r_g = min(shared_g, R) tokens: any
    split with r_g <= shared_g is exact, so a later batch whose prompts share more or less than the
    first one's still fits the same buckets while `longest_g - P <= R` and `longest_g - shared_g <= P`."""
    sorted_commons = [_sorted_commons(reps) for reps in chunk_prefixes]
    common = {k for _, adjacent in sorted_commons for k in adjacent}
    common.discard(0)
    if not common and floor is not None:  # e.g. one prompt per chunk: keep the floor's structure
        common = {max(len(p) for reps in chunk_prefixes for p in reps) + 1}
    if not common:
        return None
    best = None
    for threshold in sorted(common):
        nesting = [_outer_groups(reps, *sc, threshold) for reps, sc in zip(chunk_prefixes, sorted_commons)]
        groups = [(sh, lo) for _, shared, longest in nesting for sh, lo in zip(shared, longest)]
        g = min(_pow2(max(len(shared) for _, shared, _ in nesting)), n)
        p = round_up(max(min_inner, max(lo - sh for sh, lo in groups)), inner_multiple)
        if floor is not None:
            g, p = min(max(g, floor[0]), n), max(p, floor[3])
        r = round_up(max(min_prompt - p, max(lo - p for sh, lo in groups)), multiple)
        if floor is not None:
            r = max(r, floor[1])
        cost = len(chunk_prefixes) * (g * r + u * p)
        if best is None or cost < best[0]:
            outer_len = [[min(sh, r) for sh in shared] for _, shared, _ in nesting]
            best = (cost, (g, r, p, [grp for grp, _, _ in nesting], outer_len))
    return best
