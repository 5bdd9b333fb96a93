"""`ModelConfig`: the static, validated description of a decoder-only LLM.

Built from a HF `config.json` dict (`from_hf_dict`) or from GGUF metadata (`from_gguf_metadata`).
It is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`. Anything we do not
implement faithfully (another architecture, sliding windows, an unknown RoPE type, ...) is rejected
with a `ModelConfigError` naming the source and the field, rather than producing a wrong model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax.numpy as jnp

from rema_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("reference", "xla", "cudnn")
DECODE_ATTENTION_IMPLS = ("dense", "ragged")
# ModelConfig.remat_policy -> the `checkpoint_name`s a rematerialised layer keeps (models.transformer)
REMAT_POLICIES = {"full": (), "save_mlp": ("mlp_gate", "mlp_up")}


class ModelConfigError(ValueError, UserError):
    """An unsupported or inconsistent model configuration (names the source and the field)."""


class CheckpointError(ValueError, UserError):
    """A missing, corrupt, truncated or mismatching weight file (names the file and the tensor)."""


class Llama3RopeScaling(NamedTuple):
    """Llama-3.1/3.2 ("llama3") RoPE frequency scaling parameters (a hashable tuple)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + dtype policy of a Llama/Qwen2-style decoder.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters.
    `eos_token_ids` is a tuple because Llama-3 style checkpoints list several stop ids.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v (not o)
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    family: str = "llama"
    # Kernel choices (numerics equal within fp32 rounding; see rema_jax.models.layers):
    attention_impl: str = "reference"  # block attention (training, prefill): reference | xla | cudnn
    decode_attention_impl: str = "dense"  # one-token decode attention: dense | ragged
    remat: bool = False  # training forward: recompute each layer in the backward pass (same values)
    # with remat: what each layer keeps for its backward pass besides its inputs (REMAT_POLICIES):
    # "full" recomputes the whole layer; "save_mlp" keeps the MLP's gate and up products (2 x
    # intermediate_size values per token per layer) and recomputes the rest
    remat_policy: str = "full"
    scan_layers: bool = False  # training forward: one lax.scan over stacked layers (compiles once; same ops)
    # training log-prob / loss passes: loss positions per chunk of the vocabulary projection and its
    # fp32 log-softmax (rl.losses.head_logprobs_and_entropy); 0 = one block
    logits_chunk: int = 0
    # the sampler's fused kernels, each cut into this many column blocks (sampling.kernel.fuse_params);
    # 0 = auto: 2 on a one-device CPU for batch buckets >= 4, else 1
    sampler_column_blocks: int = 0
    # the sampler's fused weights (sampling.kernel.fuse_params): None = the compute dtype; "bfloat16"
    # halves the bytes each decode step streams, products still accumulate in the compute dtype
    sampler_weight_dtype: Optional[str] = None
    # the sampler's decode continues its unfinished rows in a batch bucket half as large once they fit
    # one, halving down to this size (sampling.Sampler.compact_target); 0 = never (every row steps until
    # the last one finishes); None = auto: 4 on CPU, where a decode step's cost grows with the batch,
    # 0 elsewhere (an accelerator's decode step is nearly flat in the batch; not measured yet)
    sampler_compact_min_batch: Optional[int] = None
    # a sampler call runs in a prefill layout it ran before (its programs compiled) when that costs at
    # most this many times the prefill slots of the call's own cheapest layout (sampling.Sampler
    # ._known_layout); 0 = never (every call compiles its own layout)
    sampler_layout_reuse: float = 1.5

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ModelConfigError(f"ModelConfig.logits_chunk must be an int >= 0, got {self.logits_chunk!r}")
        if not isinstance(self.sampler_column_blocks, int) or self.sampler_column_blocks < 0:
            raise ModelConfigError(
                f"ModelConfig.sampler_column_blocks must be an int >= 0 (0 = auto), got {self.sampler_column_blocks!r}"
            )
        least = self.sampler_compact_min_batch
        if least is not None and (not isinstance(least, int) or isinstance(least, bool) or least < 0):
            raise ModelConfigError(
                "ModelConfig.sampler_compact_min_batch must be None (auto) or an int >= 0 (0 = no compaction), got "
                f"{self.sampler_compact_min_batch!r}"
            )
        reuse = self.sampler_layout_reuse
        if isinstance(reuse, bool) or not isinstance(reuse, (int, float)) or not (reuse == 0 or reuse >= 1):
            raise ModelConfigError(
                f"ModelConfig.sampler_layout_reuse must be 0 (off) or a number >= 1, got {self.sampler_layout_reuse!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.sampler_weight_dtype is not None and self.sampler_weight_dtype not in _DTYPES:
            raise ModelConfigError(
                f"ModelConfig.sampler_weight_dtype={self.sampler_weight_dtype!r}; expected None or one of "
                f"{sorted(_DTYPES)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ModelConfigError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelConfigError(
                f"ModelConfig.attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ModelConfigError(
                f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}"
            )
        if self.decode_attention_impl not in DECODE_ATTENTION_IMPLS:
            raise ModelConfigError(
                f"ModelConfig.decode_attention_impl={self.decode_attention_impl!r}; expected one of "
                f"{DECODE_ATTENTION_IMPLS}"
            )
        if self.family not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(f"ModelConfig.family={self.family!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ModelConfigError(
                f"ModelConfig.rope_scaling must be a Llama3RopeScaling or None, got {self.rope_scaling!r}"
            )
        if not isinstance(self.eos_token_ids, tuple):
            raise ModelConfigError(f"ModelConfig.eos_token_ids must be a tuple, got {self.eos_token_ids!r}")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def sampler_weights_dtype(self) -> Any:
        """The dtype of the sampler's fused kernels, embedding and LM head (`sampler_weight_dtype`, else
        the compute dtype)."""
        return _DTYPES[self.sampler_weight_dtype] if self.sampler_weight_dtype else self.compute_dtype

    @property
    def eos_token_id(self) -> Optional[int]:
        """The first (primary) EOS id, or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(
        cls,
        d: Mapping[str, Any],
        source: str = "config.json",
        *,
        dtype: str = "float32",
        param_dtype: Optional[str] = None,
    ) -> "ModelConfig":
        """Parses a HF `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). Raises `ModelConfigError` naming `source` and the offending field."""

        def err(field, msg):
            return ModelConfigError(f"{source}: field {field!r}: {msg}")

        def req(field):
            if field not in d or d[field] is None:
                raise err(field, "is required but missing")
            return d[field]

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise err("model_type", f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise err("hidden_act", f"only 'silu' is supported, got {act!r}")
        if d.get("mlp_bias", False):
            raise err("mlp_bias", "MLP biases are not supported")
        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "llama" and attention_bias:
            raise err("attention_bias", "Llama attention biases (incl. o_proj) are not supported")
        if model_type == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases
            if d.get("use_sliding_window", False):
                raise err("use_sliding_window", "sliding-window attention is not supported")
            layer_types = d.get("layer_types")
            if layer_types and any(t != "full_attention" for t in layer_types):
                raise err("layer_types", f"only full_attention layers are supported, got {sorted(set(layer_types))}")

        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise err("hidden_size", f"{hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        head_dim = int(head_dim)
        if heads % kv_heads:
            raise err("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")

        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        field = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "llama3":
            try:
                rope_scaling = Llama3RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise err(field, f"llama3 rope scaling is missing {e.args[0]!r}") from None
            if rope_scaling.high_freq_factor <= rope_scaling.low_freq_factor:
                raise err(field, "llama3 rope scaling needs high_freq_factor > low_freq_factor")
        else:
            raise err(field, f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise err(field, "partial_rotary_factor != 1 is not supported")

        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        bos = d.get("bos_token_id")
        pad = d.get("pad_token_id")
        try:
            return cls(
                vocab_size=int(req("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(req("intermediate_size")),
                num_layers=int(req("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=eos_ids,
                pad_token_id=None if pad is None else int(pad),
                dtype=dtype,
                param_dtype=param_dtype or dtype,
                family=model_type,
            )
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict for this architecture (used by the export)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.family]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling._asdict()}
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.family == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
        return d

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf_metadata(
        cls, reader: Any, source: str = "<gguf>", *, dtype: str = "float32", param_dtype: Optional[str] = None
    ) -> "ModelConfig":
        """Builds the config from a `gguf.GGUFReader`'s key/value metadata."""

        def err(field, msg):
            return ModelConfigError(f"{source}: GGUF metadata {field!r}: {msg}")

        fields = reader.fields

        def get(key, default=dataclasses.MISSING):
            if key not in fields:
                if default is dataclasses.MISSING:
                    raise err(key, "is required but missing")
                return default
            return _gguf_value(fields[key])

        arch = get("general.architecture")
        if arch not in SUPPORTED_MODEL_TYPES:
            raise err("general.architecture", f"unsupported architecture {arch!r}; supported: {SUPPORTED_MODEL_TYPES}")
        hidden = int(get(f"{arch}.embedding_length"))
        heads = int(get(f"{arch}.attention.head_count"))
        kv_heads = int(get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(get(f"{arch}.attention.key_length", hidden // heads))
        if int(get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise err(f"{arch}.attention.value_length", "must equal key_length")
        rope_dims = int(get(f"{arch}.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise err(
                f"{arch}.rope.dimension_count", f"partial rotary ({rope_dims} != head_dim {head_dim}) unsupported"
            )
        scaling = get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise err(f"{arch}.rope.scaling.type", f"unsupported RoPE scaling {scaling!r}")
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            raise err(
                "rope_freqs.weight",
                "Llama-3.1 style RoPE frequency tensors are not supported in GGUF; "
                "load the HF checkpoint directory instead",
            )
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = get(f"{arch}.vocab_size", None)
        if vocab is None:
            if tokens is None:
                raise err(f"{arch}.vocab_size", "is missing and there is no tokenizer.ggml.tokens")
            vocab = len(tokens.data)
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        bos = get("tokenizer.ggml.bos_token_id", None)
        eos = get("tokenizer.ggml.eos_token_id", None)
        pad = get("tokenizer.ggml.padding_token_id", None)
        try:
            return cls(
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(get(f"{arch}.feed_forward_length")),
                num_layers=int(get(f"{arch}.block_count")),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=None,
                rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon")),
                tie_word_embeddings=tied,
                attention_bias=(arch == "qwen2"),
                max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=() if eos is None else (int(eos),),
                pad_token_id=None if pad is None else int(pad),
                dtype=dtype,
                param_dtype=param_dtype or dtype,
                family=arch,
            )
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None


def _gguf_value(field: Any) -> Any:
    """Decodes a scalar/string `gguf.ReaderField` value."""
    import gguf

    types = field.types
    if not types:
        raise ModelConfigError(f"GGUF field {field.name!r} has no type")
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if types[0] == gguf.GGUFValueType.ARRAY:
        return [field.parts[i] for i in field.data]
    value = field.parts[field.data[0]]
    return value.item() if hasattr(value, "item") and value.size == 1 else value
