"""Llama-style decoders in plain PyTorch, numerically equal to transformers' ``LlamaModel``,
``MistralModel``, ``Qwen2Model`` and ``Qwen3Model``.

Shapes: B = batch, L = padded length, T = tokens, H = hidden size, A = query heads,
K = key/value heads (A / K query heads share each), Dh = head size (``head_dim``, else
H / A), I = intermediate size. Pre-RMSNorm blocks, then a final RMSNorm:
    x = x + Attn(RMS(x));  x = x + MLP(RMS(x));  ...;  out = RMS(x)
Queries and keys are rotated (RoPE, with Llama 3's or linear frequency scaling where the
config asks); Qwen3 first normalises each head of them (RMSNorm over Dh). The MLP is
SwiGLU: ``down(act(gate(x)) * up(x))``. Qwen2 has biases on the query, key and value
projections, Llama ``attention_bias`` / ``mlp_bias`` where set.

Attention is causal, as the checkpoints were trained; ``LlamaEncoder.bidirectional`` drops
the causal mask (LLM2Vec, GritLM), for models fine-tuned to embed that way. Mistral's
``sliding_window`` (and Qwen's on the layers ``layer_types`` names) lets a token see the
``sliding_window`` tokens ending at itself; bidirectional, as many on either side.

The execution paths are ``model.bert``'s: padded [B, L, H], or the real tokens packed
[T, H] with attention through ``model.attention``'s kernels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from biencoder.model import attention as kernels
from biencoder.model.bert import ACTIVATIONS, Packing, TokenEncoder
from biencoder.model.config import read_config_json

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaModel",
    "mistral": "MistralModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
}
# transformers' defaults where a config.json may omit the field and they differ by family.
_TYPE_DEFAULTS = {"qwen3": {"head_dim": 128}}
# transformers' ACT2FN names SiLU both ways.
_ACTIVATIONS = {**ACTIVATIONS, "silu": F.silu, "swish": F.silu}
# Fields a family's config has not: written, transformers would keep them as attributes
# that its model does not read.
_NOT_IN = {
    "llama": set(),
    "mistral": {"attention_bias", "mlp_bias"},
    "qwen2": {"attention_bias", "mlp_bias"},
    "qwen3": {"mlp_bias"},
}
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FULL, _SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of an HF Llama, Mistral, Qwen2 or Qwen3 ``config.json`` that shape the
    network. RoPE's come from transformers 5's ``rope_parameters`` or transformers 4's
    ``rope_theta`` and ``rope_scaling`` (:meth:`from_json` reads both)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # "linear" and "llama3": frequencies divided by this; "llama3" the low ones only.
    rope_factor: float = 1.0
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    # Tokens a query sees, itself included (Mistral's field), on the layers that slide:
    # every layer for Mistral, those ``layer_types`` marks for Qwen.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_window_layers: int | None = None  # Qwen's, kept for transformers 4's readers
    tie_word_embeddings: bool = False
    # The tokenizer's ids; the network uses none of them but pad's embedding row. Kept so
    # that the config.json saved back names the ids the checkpoint came with.
    pad_token_id: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.model_type not in DECODER_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not a decoder ({', '.join(DECODER_TYPES)})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"field 'hidden_act': {self.hidden_act!r} is not supported; "
                f"supported: {', '.join(_ACTIVATIONS)}"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"field 'num_key_value_heads': num_attention_heads {self.num_attention_heads} "
                f"is not a multiple of {self.kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"field 'hidden_size': {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}, and no head_dim is given"
            )
        if self.head_size % 2:
            # RoPE rotates pairs of coordinates.
            raise ValueError(f"field 'head_dim': {self.head_size} is odd; RoPE needs an even one")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"field 'rope_parameters': rope_type {self.rope_type!r} is not supported; "
                f"supported: {', '.join(_ROPE_TYPES)}"
            )
        if self.rope_type == "llama3" and None in self.llama3_parameters:
            raise ValueError(
                f"field 'rope_parameters': rope_type 'llama3' needs {', '.join(_LLAMA3_FIELDS)}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"field 'sliding_window': must be positive, got {self.sliding_window}")
        if self.layer_types is not None and len(self.layer_types) > self.num_hidden_layers:
            # A config cut to its first layers (a tower saved at num_layers) keeps theirs.
            object.__setattr__(self, "layer_types", self.layer_types[: self.num_hidden_layers])
        if self.layer_types is not None and (
            len(self.layer_types) != self.num_hidden_layers
            or not set(self.layer_types) <= {_FULL, _SLIDING}
        ):
            raise ValueError(
                f"field 'layer_types': one of {_FULL!r} or {_SLIDING!r} per layer is "
                f"supported, got {list(self.layer_types)}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """The longest input: RoPE has no table, but the model was trained up to here."""
        return self.max_position_embeddings

    @property
    def llama3_parameters(self) -> tuple[float | None, float | None, int | None]:
        return (
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_position_embeddings,
        )

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always has them, and its config says nothing about it.
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def out_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def window(self, layer: int) -> int | None:
        """How far layer ``layer``'s query sees back (None: all the way), in
        ``model.attention``'s count: the tokens besides itself."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != _SLIDING:
            return None
        return self.sliding_window - 1

    @classmethod
    def from_json(cls, path: str | Path) -> DecoderConfig:
        """Read the fields we use from ``config.json``; HF-only keys are ignored."""
        path = Path(path)
        raw = read_config_json(path)
        model_type = raw.get("model_type")
        raw = _TYPE_DEFAULTS.get(model_type, {}) | raw
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        try:
            values |= _rope_fields(raw) | _window_fields(raw)
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that ``transformers.AutoModel`` reads back: transformers 5
        reads RoPE from ``rope_parameters``, transformers 4 from ``rope_theta`` and
        ``rope_scaling``."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope |= dict(zip(_LLAMA3_FIELDS, self.llama3_parameters, strict=True))
        ours = {"rope_theta", "rope_type", "rope_factor", "layer_types", "sliding_window"}
        ours |= {f"rope_{name}" for name in _LLAMA3_FIELDS} | _NOT_IN[self.model_type]
        hf = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
        hf |= {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
        }
        if self.head_dim is None:
            del hf["head_dim"]
        if self.rope_type != "default":
            hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            if self.layer_types is not None:
                hf["layer_types"] = list(self.layer_types)
        return hf


def _rope_fields(raw: dict) -> dict:
    """Our RoPE fields from transformers 5's ``rope_parameters``, else transformers 4's
    ``rope_theta`` and ``rope_scaling``."""
    field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = dict(raw.get(field) or {})
    if not all(isinstance(v, str | int | float | None) for v in params.values()):
        raise ValueError(f"field {field!r}: one set of RoPE parameters is supported, got {params}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"field {field!r}: rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"field {field!r}: partial_rotary_factor {partial} is not supported; RoPE "
            "rotates whole heads here"
        )
    # transformers 4 keeps the base beside rope_scaling, 5 inside rope_parameters.
    fields = {"rope_type": rope_type, "rope_theta": params.get("rope_theta", raw.get("rope_theta"))}
    if fields["rope_theta"] is None:
        fields["rope_theta"] = 10000.0
    if rope_type != "default":
        if "factor" not in params:
            raise ValueError(f"field {field!r}: rope_type {rope_type!r} needs a factor")
        fields["rope_factor"] = params["factor"]
    if rope_type == "llama3":
        fields |= {f"rope_{name}": params.get(name) for name in _LLAMA3_FIELDS}
    return fields


def _window_fields(raw: dict) -> dict:
    """The sliding window as transformers runs it: Llama has none; Mistral's covers every
    layer where set; Qwen's only where ``use_sliding_window``, on the layers of
    ``layer_types`` (transformers 5), else from layer ``max_window_layers`` on."""
    model_type = raw.get("model_type")
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return {"sliding_window": None, "layer_types": None}
    if model_type == "mistral":
        return {"sliding_window": window, "layer_types": None}
    if not raw.get("use_sliding_window", False):
        return {"sliding_window": None, "layer_types": None}
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", 28)
        types = [_SLIDING if i >= first else _FULL for i in range(raw["num_hidden_layers"])]
    return {"sliding_window": window, "layer_types": tuple(types)}


def inverse_frequencies(cfg: DecoderConfig) -> torch.Tensor:
    """RoPE's frequencies [Dh / 2], scaled as ``cfg.rope_type`` says; computed in float32
    with transformers' operations in its order, as the checkpoints were trained with."""
    dim = cfg.head_size
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "default":
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context's / low_freq_factor are
    # stretched by the factor, those shorter than its / high_freq_factor kept, and the
    # ones between interpolated.
    low, high, context = cfg.llama3_parameters
    factor = cfg.rope_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < context / high) * ~(wavelength > context / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin [..., Dh] at ``positions`` [...]: in float32 whatever ``dtype``, as
    transformers computes them, then cast."""
    angles = positions[..., None].float() * inv_freq  # [..., Dh / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [..., Dh], each half's coordinate i paired with the other half's i."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    """x / rms(x) · weight, the mean square taken in float32 at least (as transformers
    does under bf16)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        H, A, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        self.num_heads, self.kv_heads, self.head_dim = A, K, Dh
        self.q = nn.Linear(H, A * Dh, bias=cfg.qkv_bias)
        self.k = nn.Linear(H, K * Dh, bias=cfg.qkv_bias)
        self.v = nn.Linear(H, K * Dh, bias=cfg.qkv_bias)
        self.out = nn.Linear(A * Dh, H, bias=cfg.out_bias)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn_dropout = cfg.attention_dropout
        self.window = cfg.window(layer)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
        causal: bool = True,
    ) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or packed [T, H] -> [T, H] with ``packing``, whose
        attention ``kernel`` computes (one of ``model.attention.CHOICES``). ``rope`` is
        (cos, sin) [B, L, Dh] or [T, Dh]; ``attend`` the padded path's mask."""
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))  # [..., A, Dh]
        k = self.k(x).unflatten(-1, (self.kv_heads, self.head_dim))  # [..., K, Dh]
        v = self.v(x).unflatten(-1, (self.kv_heads, self.head_dim))  # [..., K, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.unsqueeze(-2) for t in rope)  # [..., 1, Dh]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Query head h reads key/value head h // (A / K), as transformers' repeat_kv.
        groups = self.num_heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)
        dropout = self.attn_dropout if self.training else 0.0
        if packing is not None:
            qkv = torch.stack((q, k, v), dim=1)  # [T, 3, A, Dh]
            y = kernels.attend(kernel, qkv, packing, dropout, self.window, causal)  # [T, A, Dh]
            return self.out(y.flatten(1))  # [T, H]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, A, L, Dh] each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out(y.transpose(1, 2).flatten(2))  # [B, L, H]


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        H, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(H, inner, bias=cfg.mlp_bias)
        self.up = nn.Linear(H, inner, bias=cfg.mlp_bias)
        self.down = nn.Linear(inner, H, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = SelfAttention(cfg, index)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # The checkpoints have no dropout on states; set_dropout can add some.
        self.dropout = nn.Dropout(0.0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
        causal: bool = True,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, attend, packing, kernel, causal))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class LlamaEncoder(TokenEncoder):
    """Token ids -> contextual token states of a Llama, Mistral, Qwen2 or Qwen3 decoder,
    optionally stopping at an intermediate layer.

    The interface of ``model.bert.Encoder`` (``forward``, ``unpadded``, ``attention``,
    ``gradient_checkpointing``, ``set_dropout``), and ``bidirectional`` (False unless set):
    whether tokens also attend to later ones. Unlike the other attributes it changes the
    states, so ``BiEncoder`` saves it with the model (``biencoder.json``).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Not a buffer: casting the module to float64 or bf16 would round the frequencies
        # (RoPE's tables stay float32 whatever the states' dtype). Copied once per device,
        # as a copy from the host each forward would wait for the GPU's queue.
        self._inv_freq = {torch.device("cpu"): inverse_frequencies(cfg)}  # [Dh / 2] float32
        self.bidirectional = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' initialisation, for training from scratch; pretrained weights
        # overwrite it. RMSNorm weights start at one.
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Hidden states after ``num_layers`` blocks (all of them by default) and the final
        norm: [B, L, H].

        The final norm follows any number of blocks: what a decoder cut at ``num_layers``
        blocks computes, which is how a tower pooled from an intermediate layer is saved.
        Decoders have no token types: ``token_type_ids`` is accepted for
        ``model.bert.Encoder``'s interface and ignored. States at padded positions mean
        nothing; ``packing`` is as for ``model.bert.Encoder``.
        """
        num_layers = self._blocks(input_ids, num_layers)
        B, L = input_ids.shape
        real = attention_mask.bool()
        causal = not self.bidirectional
        # From the left edge of the padded batch, whatever the padding side, as transformers
        # counts them when given no position ids; RoPE sees only differences of positions,
        # so the side does not change the states at real tokens beyond rounding.
        positions = torch.arange(L, device=input_ids.device).expand(B, L)  # [B, L]
        # As in model.bert: masks only where needed, packing unless compiled.
        packing, padded = self._path(real, packing)
        if packing is not None:
            input_ids, positions = packing.pack(input_ids), packing.pack(positions)  # [T] each
        x = self.embeddings(input_ids)  # [B, L, H] or [T, H]
        device = input_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        rope = rotary_tables(positions, self._inv_freq[device], x.dtype)
        # Per window (None: none); the packed path's kernels build their masks themselves.
        masks = {}
        for window in {layer.attn.window for layer in self.layers[:num_layers]}:
            if packing is not None or not (padded or causal or window is not None):
                masks[window] = None
            else:
                masks[window] = kernels.band_mask(real[:, None, None, :], window, causal)
        for layer in self.layers[:num_layers]:
            attend = masks[layer.attn.window]
            args = (x, rope, attend, packing, self.attention, causal)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        x = self.norm(x)
        return packing.unpack(x) if packing is not None else x
