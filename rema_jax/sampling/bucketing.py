"""Static-shape bucketing: batch sizes and lengths are rounded up so a run compiles a few times."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` >= n (at least `multiple`, also for n <= 0)."""
    return max(int(multiple), -(-int(n) // multiple) * multiple)


def length_bucket(n: int, minimum: int = 1) -> int:
    """The smallest length >= max(n, minimum) of the form 2^k or 3 * 2^(k-1) (16, 24, 32, 48, 64,
    96, ...): twice as many buckets as powers of two, but at most a third of a bucket is padding
    instead of half (prefill cost and cache size scale with the bucket)."""
    p = next_pow2(n, minimum)
    three_quarters = 3 * p // 4
    return three_quarters if p >= 4 and three_quarters >= max(int(n), int(minimum)) else p


def batch_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (the caller splits batches larger than the largest bucket)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"batch of {n} rows exceeds the largest batch bucket {max(buckets)}")


def left_pad(
    prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts into `tokens_bp [rows, length] int32` and returns `pad_b [rows] int32`
    (the number of pad slots before each row's first real token). Rows past `len(prompts)` are
    filler copies of prompt 0 (the kernel marks them finished from the start)."""
    tokens_bp = np.full((rows, length), pad_id, np.int32)
    pad_b = np.zeros((rows,), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]
        tokens_bp[i, length - len(p) :] = p
        pad_b[i] = length - len(p)
    return tokens_bp, pad_b
