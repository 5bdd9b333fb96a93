"""Foundation models: config, transformer forward, adapters, loaders and export."""
from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter, merge_adapter
from rema_jax.models.config import Llama3RopeScaling, ModelConfig, ModelConfigError
from rema_jax.models.rope import apply_rope, rope_cos_sin
from rema_jax.models.transformer import (dot_product_attention, forward, init_cache, lora_delta, param_shapes,
                                         rms_norm)

__all__ = [
    "Adapter", "AdapterConfig", "init_adapter", "merge_adapter", "Llama3RopeScaling", "ModelConfig",
    "ModelConfigError", "apply_rope", "rope_cos_sin", "dot_product_attention", "forward", "init_cache",
    "lora_delta", "param_shapes", "rms_norm",
]
