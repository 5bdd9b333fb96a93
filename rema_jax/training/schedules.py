"""Which agent trains at which step.

Roles are ``"meta_thinking"`` (high level, π_h) and ``"reasoning"`` (low level, π_l).

- ``alternating``: the paper's Algorithm 1. Each iteration trains the reasoning agent for
  ``reasoning_steps`` steps with the meta-thinking agent frozen, then the meta-thinking agent for
  ``meta_thinking_steps`` steps with the reasoning agent frozen. A curriculum filter runs at the start
  of every phase.
- ``switch_every``: the official multi-turn code's variant: the active agent is
  ``(global_step // freq + index(start_agent)) % 2`` with 1-based ``global_step``, so with freq 10
  and start ``meta_thinking`` the MTA trains steps 1–9, the RA 10–19, the MTA 20–29, ...
- ``simultaneous``: both roles every step (shared weights: one model, both roles' sequences in one
  batch — the official multi-turn default).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ROLES = ("meta_thinking", "reasoning")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["alternating", "switch_every", "simultaneous"] = "alternating"
    reasoning_steps: int = 4  # alternating: RA phase length (steps)
    meta_thinking_steps: int = 4  # alternating: MTA phase length (steps)
    switch_freq: int = 10  # switch_every: steps per agent
    start_agent: Literal["meta_thinking", "reasoning"] = "meta_thinking"  # switch_every only

    def __post_init__(self):
        for name in ("reasoning_steps", "meta_thinking_steps", "switch_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Phase:
    """The roles updated at a step, and whether this step opens a new phase."""

    trained: tuple[str, ...]
    index: int  # phase number (0-based); changes when the trained set changes
    starts: bool  # first step of this phase (run the curriculum filter here)

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r not in self.trained)


def phase_at(config: ScheduleConfig, step: int) -> Phase:
    """Phase of 0-based training ``step``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if config.kind == "simultaneous":
        return Phase(trained=ROLES, index=0, starts=step == 0)
    if config.kind == "alternating":
        period = config.reasoning_steps + config.meta_thinking_steps
        iteration, offset = divmod(step, period)
        if offset < config.reasoning_steps:
            return Phase(("reasoning",), 2 * iteration, offset == 0)
        return Phase(("meta_thinking",), 2 * iteration + 1, offset == config.reasoning_steps)
    # switch_every: official code, global_step = step + 1.
    start = ROLES.index(config.start_agent)
    global_step = step + 1
    index = global_step // config.switch_freq
    role = ROLES[(index + start) % 2]
    prev = phase_at(config, step - 1) if step > 0 else None
    return Phase((role,), index, prev is None or prev.trained != (role,))
