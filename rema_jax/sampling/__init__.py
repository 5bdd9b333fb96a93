"""Jitted prefill + decode sampler with a static, donated KV cache (see `Sampler`)."""

from rema_jax.sampling.sampler import Sampler
from rema_jax.sampling.types import Generation, SamplerStats, SamplingParams

__all__ = ["Generation", "Sampler", "SamplerStats", "SamplingParams"]
