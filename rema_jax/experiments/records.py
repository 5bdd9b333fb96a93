"""What a stage of an experiment job leaves behind, shared by the bootstrap job and the powered
experiment: ``StageError``, atomic JSON / text writes (a killed run never leaves half a record),
reading a record back, and the RL diagnostics a stage records from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from rema_jax.errors import UserError


class StageError(UserError, RuntimeError):
    """A stage failed on a user-facing error (bad config, data, checkpoint); the message names the
    stage and the directory it was writing. Other exceptions keep their type and traceback and get
    the same words as a note."""


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (temp file + rename), so a killed run never leaves half a record."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Atomic text write (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    """A JSON record, or ``{}`` when the file does not exist yet (nothing finished)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rl_diagnostics(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What shows whether RL had signal: per agent, the share of zero-variance reward groups (mean
    over steps) and the reward first → last; for each trained agent, how many of its update steps
    had a non-zero gradient norm."""
    out: dict[str, Any] = {}
    roles = sorted({k.split("/")[0] for r in records for k in r if k.endswith("/frac_reward_zero_std")})
    for role in roles:
        zs = [r[f"{role}/frac_reward_zero_std"] for r in records if r.get(f"{role}/frac_reward_zero_std") is not None]
        rw = [r[f"{role}/reward_mean"] for r in records if r.get(f"{role}/reward_mean") is not None]
        gn = [r[f"{role}/grad_norm"] for r in records if r.get(f"{role}/grad_norm") is not None]
        out[role] = {
            "frac_zero_variance_groups": sum(zs) / len(zs) if zs else None,
            "reward_first": rw[0] if rw else None,
            "reward_last": rw[-1] if rw else None,
            "reward_mean": sum(rw) / len(rw) if rw else None,
            "update_steps": len(gn),
            "nonzero_grad_steps": sum(g > 0 for g in gn),
        }
    return out
