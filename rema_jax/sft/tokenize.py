"""Conversations → token rows with a loss mask on the agent's own assistant tokens; static batches.

Each assistant message is tokenized on its own (the ids the agent would sample after the
template's assistant header) and spliced in through ``ChatEncoder`` as a generated turn that
"stopped", so the template's end-of-turn EOS after it is labelled too: exactly the rows the RL
trainer builds from rollouts (Contract 4), with ``loss_mask[t] = 1`` when ``tokens[t]`` is a target.

Rows longer than ``max_len`` are cut from the left (the end holds the last answers) and counted
with a warning, never silently. Batches are shuffled per epoch from ``(seed, epoch)``, right-padded
to a power-of-two length bucket (≤ ``max_len``) and, at the end of an epoch, filled with empty
rows (loss mask 0) so every batch has exactly ``batch_size`` rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Sequence

import numpy as np

from rema_jax.rollout.chat import ChatEncoder, GeneratedMessage, TextMessage
from rema_jax.sft.data import Conversation

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """``tokens [L] int32`` and ``loss_mask [L] float32`` (1 on the agent's assistant tokens + EOS)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    source: str
    truncated: bool


def encode_conversation(conv: Conversation, encoder: ChatEncoder, max_len: int | None = None) -> EncodedConversation:
    """Renders ``conv`` with the chat template; masks its assistant tokens and their end-of-turn EOS."""
    messages = []
    for who, text in conv.messages:
        if who == "assistant":
            messages.append(GeneratedMessage(tuple(encoder.encode_text(text)), stopped=True))
        else:
            messages.append(TextMessage(who, text))
    enc = encoder.encode(messages, add_generation_prompt=False)
    tokens = np.asarray(enc.token_ids, np.int32)
    mask = np.zeros(len(tokens), np.float32)
    for (start, end), eos in zip(enc.generated_spans, enc.eos_label_positions):
        mask[start:end] = 1.0
        if eos is not None:
            mask[eos] = 1.0
    truncated = max_len is not None and len(tokens) > max_len
    if truncated:
        tokens, mask = tokens[-max_len:], mask[-max_len:]
    mask[0] = 0.0  # position 0 has no prediction
    return EncodedConversation(tokens, mask, conv.source, bool(truncated))


def encode_all(
    conversations: Sequence[Conversation], encoder: ChatEncoder, max_len: int
) -> tuple[list[EncodedConversation], dict[str, int]]:
    """Encodes every conversation; returns (rows, stats) and warns with the truncation count."""
    rows = [encode_conversation(c, encoder, max_len) for c in conversations]
    dropped = [r for r in rows if r.loss_mask.sum() == 0]
    rows = [r for r in rows if r.loss_mask.sum() > 0]
    stats = {
        "conversations": len(conversations),
        "rows": len(rows),
        "truncated": sum(r.truncated for r in rows),
        "dropped_no_loss_tokens": len(dropped),
        "tokens": int(sum(len(r.tokens) for r in rows)),
        "loss_tokens": int(sum(r.loss_mask.sum() for r in rows)),
    }
    if stats["truncated"]:
        log.warning(
            "SFT: %d of %d conversations are longer than max_seq_len=%d and were cut from the left",
            stats["truncated"],
            len(conversations),
            max_len,
        )
    if dropped:
        log.warning(
            "SFT: %d conversations have no assistant token left after truncation and were dropped (e.g. %s)",
            len(dropped),
            dropped[0].source,
        )
    if not rows:
        raise ValueError("SFT: no conversation has a loss token")
    return rows, stats


def length_bucket(n: int, max_len: int, min_bucket: int = 64) -> int:
    """The smallest power of two ≥ ``n`` (and ≥ ``min_bucket``), capped at ``max_len``."""
    return min(max(min_bucket, 1 << max(n - 1, 1).bit_length()), max_len)


def max_loss_bucket(rows: Sequence[EncodedConversation], max_len: int) -> int:
    """A static K for ``sparse_token_logprobs_and_entropy``: the largest row's loss tokens, rounded up."""
    return length_bucket(int(max(r.loss_mask.sum() for r in rows)), max_len, min_bucket=16)


def num_batches(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


def epoch_batches(
    rows: Sequence[EncodedConversation], batch_size: int, max_len: int, *, seed: int, epoch: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of static-shape batches: ``tokens``/``attention_mask`` ``[B, T] int32``,
    ``loss_mask [B, T] float32``; the order is a pure function of ``(seed, epoch)``."""
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        t = length_bucket(max(len(r.tokens) for r in chunk), max_len)
        tokens = np.full((batch_size, t), pad_id, np.int32)
        attn = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.float32)
        for b, r in enumerate(chunk):
            n = len(r.tokens)
            tokens[b, :n], attn[b, :n], mask[b, :n] = r.tokens, 1, r.loss_mask
        yield {"tokens": tokens, "attention_mask": attn, "loss_mask": mask}
