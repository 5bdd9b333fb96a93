"""Moved to ``rema_jax.experiments.powered`` (issue 14); this module re-exports its API for old imports.
The stage bodies are re-exported too, but the runner looks them up in
``rema_jax.experiments.powered.bodies``: replace them there."""

from rema_jax.experiments.powered import *  # noqa: F401,F403
from rema_jax.experiments.powered import __all__ as _api
from rema_jax.experiments.powered.bodies import stage_eval, stage_rl, stage_sft  # noqa: F401

__all__ = [*_api, "stage_eval", "stage_rl", "stage_sft"]
