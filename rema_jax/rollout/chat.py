"""Chat-template encoding that splices sampled token ids in, never re-tokenizing generated text.

A role's conversation mixes text (system prompt, user turns, the *other* agent's messages, which
this role only reads) and its own generated assistant turns, which must appear as the exact ids
that were sampled, so that behaviour log-probs line up and decode/encode round-trips (unicode,
merges across the turn boundary) can never change an action.

How: render the tokenizer's chat template with a unique sentinel string as the content of each
generated turn, split the rendered text at the sentinels, tokenize only the text pieces (with
``add_special_tokens=False``: the template writes BOS and role tags itself), and splice the sampled
ids between them.

End of turn. The template closes an assistant turn with its end-of-turn token (ChatML
``<|im_end|>``, Llama-3 ``<|eot_id|>``), which is usually an EOS id:

* a turn that *sampled* an EOS already contains it, so the template's copy right after the turn is
  dropped (the sampled token stands in for it);
* a turn that stopped on a stop string (``[FINISH]``) has no EOS; the template's end-of-turn token
  follows it, and its position is reported in ``eos_label_positions`` so the caller can train on it
  the way the official code appends the EOS label to every "stop" turn;
* a truncated turn (``length``) is followed by the template's tokens with no label.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

_SENTINEL = "\u2063REMA-GENERATED-TURN-{}\u2063"  # invisible separators: never in real chat text
_SENTINEL_RE = re.compile("\u2063REMA-GENERATED-TURN-(\\d+)\u2063")


@dataclasses.dataclass(frozen=True)
class TextMessage:
    """A message given as text (system, user, or anything this role did not generate)."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class GeneratedMessage:
    """An assistant turn given as the ids this role sampled.

    Attributes:
      token_ids: exactly the sampled ids (incl. a sampled EOS, incl. stop-string tokens).
      stopped: True when the turn stopped normally (EOS or stop string), False when truncated.
    """

    token_ids: tuple[int, ...]
    stopped: bool


Message = TextMessage | GeneratedMessage


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """Token ids of a rendered chat, with where each generated turn sits.

    Attributes:
      token_ids: the whole chat.
      generated_spans: per generated message, ``[start, end)`` of its sampled ids in ``token_ids``.
      eos_label_positions: per generated message, the position of the template's end-of-turn EOS
        that follows a turn stopped on a stop string (not sampled), else None.
    """

    token_ids: list[int]
    generated_spans: list[tuple[int, int]]
    eos_label_positions: list[int | None]


class ChatEncoder:
    """Encodes chats through a HF tokenizer's chat template, splicing in sampled ids."""

    def __init__(self, tokenizer, eos_ids: Sequence[int] | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template; ReMA rollouts "
                "render every agent's view through the chat template"
            )
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos = tokenizer.eos_token_id
            if eos is None:
                raise ValueError("tokenizer has no eos_token_id; pass eos_ids explicitly")
            eos_ids = eos if isinstance(eos, (list, tuple)) else (eos,)
        self.eos_ids = frozenset(int(e) for e in eos_ids)

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        """Tokenizes plain text the way chat pieces are tokenized (no added special tokens)."""
        return self._tokenize(text)

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> EncodedChat:
        """Renders ``messages`` and splices the generated turns' ids in.

        Without a generation prompt and ending on a generated turn, the result stops right after that
        turn's ids (plus its labelled end-of-turn EOS, if any): the template's trailing closing
        tokens are dropped, they are never a target.
        """
        rendered, generated = [], []
        for m in messages:
            if isinstance(m, GeneratedMessage):
                rendered.append({"role": "assistant", "content": _SENTINEL.format(len(generated))})
                generated.append(m)
            elif isinstance(m, TextMessage):
                if "\u2063REMA-GENERATED-TURN-" in m.content:
                    raise ValueError(f"{m.role} message contains the reserved sentinel text")
                rendered.append({"role": m.role, "content": m.content})
            else:
                raise TypeError(f"expected TextMessage or GeneratedMessage, got {type(m).__name__}")
        text = self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt)
        pieces = _SENTINEL_RE.split(text)  # [text0, idx0, text1, idx1, ..., textK]
        order = [int(i) for i in pieces[1::2]]
        if order != list(range(len(generated))):
            raise ValueError(
                f"chat template rendered the generated turns as {order}, expected "
                f"{list(range(len(generated)))} in order, each once (does it drop or "
                "rewrite assistant content?)"
            )
        texts = pieces[0::2]
        ids = self._tokenize(texts[0])
        spans, eos_labels = [], []
        for k, gen in enumerate(generated):
            start = len(ids)
            ids.extend(gen.token_ids)
            spans.append((start, len(ids)))
            after = self._tokenize(texts[k + 1])
            ended_on_eos = bool(gen.token_ids) and gen.token_ids[-1] in self.eos_ids
            eos_pos = None
            if after and after[0] in self.eos_ids:
                if ended_on_eos:
                    after = after[1:]  # the sampled EOS is this turn's end-of-turn token
                elif gen.stopped:
                    eos_pos = len(ids)
            eos_labels.append(eos_pos)
            last_generated = k == len(generated) - 1
            if last_generated and not add_generation_prompt and isinstance(messages[-1], GeneratedMessage):
                if eos_pos is not None:
                    ids.append(after[0])
                break
            ids.extend(after)
        return EncodedChat(ids, spans, eos_labels)
