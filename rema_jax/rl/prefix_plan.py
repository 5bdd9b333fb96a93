"""Host-side plan for shared-prefix training passes: which rows share a token prefix, bucketed.

Rows of one role in an RL batch repeat long prefixes: every row of a question starts with the same
system prompt, chat head and question; the reasoning agent's rows that answer the same plan also
share the plan. `plan_prefix` groups the rows of each micro-batch whose prompts (the tokens before
the first loss position) are identical, keeps one copy of each group's prompt (the "prefix"), and
leaves each row its remainder (the "suffix"). `models.forward_shared_prefix` then runs the U unique
prefixes once and the B suffixes against the prefixes' keys and values.

The prefix of a row ends one token before its first loss token: the logits that score that token
come from the position before it, which must be a suffix position. In multi-turn rows only the
first prompt is shared; later turns stay in the suffix.

Static shapes: prefix length P rounds up to a multiple of `prefix_multiple` (64), suffix length S
to a multiple of `suffix_multiple` (32), prefixes per micro-batch U to a power of two (at most the
micro-batch's rows); steps whose rows fall in the same buckets reuse one compilation. `min_shape`
(U, P, S) raises the buckets to at least those sizes: the learner passes the largest buckets it has
used so far (the suffix starting at the rollout's answer length), so a run compiles each pass a few
times instead of once per new bucket combination (one compile of the real model's update costs
more than a step's saving). When sharing would not cut the token positions computed by
`min_saving` (or the rows are not right-padded), the plan is None and the caller runs the plain path.
"""

from __future__ import annotations

import flax
import numpy as np

PREFIX_MULTIPLE = 64
SUFFIX_MULTIPLE = 32
MIN_SAVING = 0.1


@flax.struct.dataclass
class PrefixPlan:
    """The arrays a shared-prefix pass reads, for C micro-batches ("chunks") of n rows each (B = C·n).

    prefix_tokens: int32 [C·U, P]  each chunk's U unique prefixes, right-padded (chunk-major)
    prefix_mask:   int32 [C·U, P]  1 on real prefix tokens (filler prefixes are all 0)
    row_prefix:    int32 [B]       the row's prefix, indexed within its chunk (0 .. U-1)
    prefix_len:    int32 [B]       tokens of the row taken from its prefix (its suffix starts there)
    suffix_tokens: int32 [B, S]    tokens[prefix_len : prefix_len + S] of the row, right-padded
    suffix_mask:   int32 [B, S]    1 on the row's real suffix tokens

    Row fields split like the batch's other ``[B, ...]`` fields; the prefix fields split into the same
    C chunks because they are laid out chunk-major, so `jax.tree.map(reshape)` keeps them aligned.
    """

    prefix_tokens: np.ndarray
    prefix_mask: np.ndarray
    row_prefix: np.ndarray
    prefix_len: np.ndarray
    suffix_tokens: np.ndarray
    suffix_mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(U·C, P, S)``: the static bucket of this plan."""
        return (*np.shape(self.prefix_tokens), np.shape(self.suffix_tokens)[1])


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, -(-x // multiple) * multiple)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _right_padded(mask_bt: np.ndarray) -> bool:
    lengths = mask_bt.sum(1)
    return bool((mask_bt == (np.arange(mask_bt.shape[1])[None] < lengths[:, None])).all())


def plan_prefix(
    tokens_bt,
    attention_mask_bt,
    loss_mask_bt,
    num_chunks: int = 1,
    *,
    prefix_multiple: int = PREFIX_MULTIPLE,
    suffix_multiple: int = SUFFIX_MULTIPLE,
    min_saving: float = MIN_SAVING,
    pad_id: int = 0,
    min_shape: tuple[int, int, int] | None = None,
) -> PrefixPlan | None:
    """The shared-prefix plan of a right-padded batch split into `num_chunks` micro-batches, or None
    when sharing saves less than `min_saving` of the token positions (`C·U·P + B·S` vs `B·T`).
    `min_shape` = (U per chunk, P, S): the smallest buckets to use (see the module docstring).

    Rows without loss tokens take no prefix (`prefix_len` 0) and keep their first S tokens; their
    log-probs are 0 on either path.
    """
    tokens_bt, mask_bt = np.asarray(tokens_bt), np.asarray(attention_mask_bt) > 0
    loss_bt = np.asarray(loss_mask_bt) > 0
    b, t = tokens_bt.shape
    if num_chunks < 1 or b % num_chunks:
        raise ValueError(f"plan_prefix: {b} rows are not divisible into {num_chunks} chunks")
    if not _right_padded(mask_bt):
        return None
    n = b // num_chunks
    length_b = mask_bt.sum(1)
    has_loss_b = loss_bt[:, 1:].any(1)
    first_loss_b = np.where(has_loss_b, 1 + np.argmax(loss_bt[:, 1:], axis=1), 0)
    prefix_len_b = np.where(has_loss_b, np.maximum(first_loss_b - 1, 0), 0)

    row_prefix_b = np.zeros(b, np.int32)
    chunk_prefixes = []  # per chunk: [(row index of a representative, prefix length)]
    for c in range(num_chunks):
        groups: dict[bytes, int] = {}
        reps = []
        for i in range(c * n, (c + 1) * n):
            if not has_loss_b[i]:
                continue
            key = tokens_bt[i, : prefix_len_b[i]].tobytes()
            if key not in groups:
                groups[key] = len(reps)
                reps.append((i, int(prefix_len_b[i])))
            row_prefix_b[i] = groups[key]
        chunk_prefixes.append(reps)
    if not any(chunk_prefixes):
        return None
    u = min(_pow2(max(len(r) for r in chunk_prefixes)), n)
    p = _round_up(max(pl for reps in chunk_prefixes for _, pl in reps), prefix_multiple)
    s = _round_up(int(max(length_b[i] - prefix_len_b[i] for i in range(b) if has_loss_b[i])), suffix_multiple)
    if min_shape is not None:
        u, p, s = min(max(u, int(min_shape[0])), n), max(p, int(min_shape[1])), max(s, int(min_shape[2]))
    if num_chunks * u * p + b * s > (1.0 - min_saving) * b * t:
        return None

    prefix_tokens = np.full((num_chunks * u, p), pad_id, np.int32)
    prefix_mask = np.zeros((num_chunks * u, p), np.int32)
    for c, reps in enumerate(chunk_prefixes):
        for j, (i, pl) in enumerate(reps):
            prefix_tokens[c * u + j, :pl] = tokens_bt[i, :pl]
            prefix_mask[c * u + j, :pl] = 1
    padded_bt = np.concatenate([tokens_bt, np.full((b, s), pad_id, tokens_bt.dtype)], axis=1)
    padded_mask_bt = np.concatenate([mask_bt, np.zeros((b, s), bool)], axis=1)
    cols_bs = prefix_len_b[:, None] + np.arange(s)[None]
    suffix_tokens = np.take_along_axis(padded_bt, cols_bs, axis=1).astype(np.int32)
    suffix_mask = np.take_along_axis(padded_mask_bt, cols_bs, axis=1).astype(np.int32)
    return PrefixPlan(
        prefix_tokens=prefix_tokens,
        prefix_mask=prefix_mask,
        row_prefix=row_prefix_b,
        prefix_len=prefix_len_b.astype(np.int32),
        suffix_tokens=suffix_tokens,
        suffix_mask=suffix_mask,
    )
