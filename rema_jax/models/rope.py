"""Rotary position embeddings (HF "rotate_half" layout), with Llama-3.1 ("llama3") frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rema_jax.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (float32), scaled as Llama-3.1 does when configured."""
    dim = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
        np.float32
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_bt: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables `[B, T, head_dim]` (float32) for integer rotary positions `[B, T]`."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb_btd = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb_btd), jnp.sin(emb_btd)


def apply_rope_cos_sin(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x [B, T, heads, head_dim]` by precomputed tables; math in float32, result in x's dtype."""
    x = x_bthd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
    return out.astype(x_bthd.dtype)


def apply_rope(x_bthd: jnp.ndarray, positions_bt: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """Applies RoPE to queries or keys `[B, T, heads, head_dim]` at positions `[B, T]`."""
    cos, sin = rope_cos_sin(positions_bt, config)
    return apply_rope_cos_sin(x_bthd, cos, sin)
