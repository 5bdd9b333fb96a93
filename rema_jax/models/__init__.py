"""Foundation models: config, transformer forward, adapters, loaders and export.

Main entry points: `load(source)` → `LoadedModel(config, params, tokenizer, source)` and
`forward(config, params, tokens_bt, adapter=None, ...)` → logits `[B, T, V]`. The layer math that the
forward and the sampler share (norms, rotary, attention, gated MLP, the KV-cache record) is `layers`.
"""

from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter, merge_adapter
from rema_jax.models.config import CheckpointError, Llama3RopeScaling, ModelConfig, ModelConfigError
from rema_jax.models.export import export_hf, load_adapter, save_adapter
from rema_jax.models.hub import LoadedModel, ModelSourceError, load
from rema_jax.models.layers import dot_product_attention, rms_norm
from rema_jax.models.rope import apply_rope, apply_rope_cos_sin, rope_cos_sin
from rema_jax.models.shared_prefix import forward_shared_prefix
from rema_jax.models.transformer import HeadInputs, forward, lora_delta, param_shapes

__all__ = [
    "Adapter",
    "AdapterConfig",
    "init_adapter",
    "merge_adapter",
    "CheckpointError",
    "Llama3RopeScaling",
    "ModelConfig",
    "ModelConfigError",
    "export_hf",
    "load_adapter",
    "save_adapter",
    "LoadedModel",
    "ModelSourceError",
    "load",
    "apply_rope",
    "apply_rope_cos_sin",
    "rope_cos_sin",
    "dot_product_attention",
    "forward",
    "forward_shared_prefix",
    "HeadInputs",
    "lora_delta",
    "param_shapes",
    "rms_norm",
]


def __getattr__(name):
    """`load`, `LoadedModel` and the exporters import transformers: load them on first use."""
    if name in ("load", "LoadedModel", "ModelSourceError", "smollm2_gguf_path"):
        from rema_jax.models import hub

        return getattr(hub, name)
    if name in ("export_hf", "save_adapter", "load_adapter"):
        from rema_jax.models import export

        return getattr(export, name)
    raise AttributeError(f"module 'rema_jax.models' has no attribute {name!r}")
