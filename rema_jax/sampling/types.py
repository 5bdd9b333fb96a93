"""The sampler's request and result records (Contract 3 in docs/architecture.md)."""

from __future__ import annotations

import dataclasses
from typing import Optional

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one `Sampler.generate` call.

    `temperature`, `top_k` and `top_p` shape the distribution that is sampled from (and whose
    log-probs are returned); they are ignored when `greedy`. `stop_strings` are matched on the
    decoded bytes of the generated tokens, so a string that the tokenizer splits into several
    tokens (e.g. "[FINISH]") stops the row as soon as its last byte is generated.
    `eos_ids=None` means the tokenizer's / model config's EOS id(s).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_strings: tuple[str, ...] = ()
    eos_ids: Optional[tuple[int, ...]] = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(
                f"SamplingParams.temperature must be > 0 (use greedy=True for argmax), got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.stop_strings, str):
            raise ValueError(
                f"SamplingParams.stop_strings must be a tuple of strings, got the string "
                f"{self.stop_strings!r}; write ({self.stop_strings!r},)"
            )
        stops = tuple(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_strings", stops)
        if self.eos_ids is not None:
            eos = tuple(self.eos_ids)
            if any(not isinstance(e, int) or e < 0 for e in eos):
                raise ValueError(f"SamplingParams.eos_ids must be non-negative ints, got {eos!r}")
            object.__setattr__(self, "eos_ids", eos)


@dataclasses.dataclass
class Generation:
    """One prompt row's result.

    `token_ids` are the generated ids, including the EOS id when the row stopped on EOS and the
    stop string's tokens when it stopped on a stop string. `logprobs[i]` is the log-prob of
    `token_ids[i]` under the distribution actually sampled from (tempered, top-k/top-p filtered and
    renormalised; for greedy decoding, the untempered model distribution). `text` is the decoded
    `token_ids` with a final EOS removed (never re-tokenize it: use `token_ids`).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Generation.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


@dataclasses.dataclass
class SamplerStats:
    """Where a `Sampler`'s time went since it was made (or `reset_stats`): seconds inside the
    compiled prefill and decode executables (dispatch to results ready), compiling, and fusing
    agent weights, plus token counts. Rollout code compares its own wall time with these to see
    how much is spent in Python rather than in the kernel."""

    calls: int = 0  # executable pairs run (generate chunks)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    fuse_s: float = 0.0
    compile_s: float = 0.0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens
    prefill_slots: int = 0  # token passes prefill computed: group prefixes + distinct prompts (bucketed) × remainder
    new_tokens: int = 0  # generated tokens returned
    decode_row_steps: int = 0  # rows x steps the decode loops computed (filler and finished rows too)
    compactions: int = 0  # times unfinished rows continued in a smaller batch (`Sampler.compact_target`)

    @property
    def kernel_s(self) -> float:
        """Seconds in compiled code: prefill + decode + weight fusion."""
        return self.prefill_s + self.decode_s + self.fuse_s
