"""A ModernBERT encoder in plain PyTorch, numerically equal to ``transformers.ModernBertModel``.

Shapes: B = batch, L = padded length, T = tokens, H = hidden size, A = heads, Dh = H / A,
I = intermediate size. Pre-LayerNorm blocks, then a final LayerNorm:
    x = x + Attn(LN(x));  x = x + MLP(LN(x));  ...;  out = LN(x)
(layer 0's attention reads the embeddings' normalised output without a second norm).

Where BERT adds a position table to the embeddings, ModernBERT rotates queries and keys
(RoPE). Every ``global_attn_every_n_layers``-th layer, from the first, is global: each token
attends to its whole text, with RoPE base ``global_rope_theta``. The others are local: a
token attends to the tokens at most ``local_attention // 2`` positions away, with base
``local_rope_theta``. The MLP is a gated linear unit: ``Wo(act(input) * gate)``, input and
gate being the two halves of one projection.

The execution paths are ``model.bert``'s: padded [B, L, H], or the real tokens packed
[T, H] with attention through ``model.attention``'s kernels, which take the local layers'
window.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from biencoder.model import attention as kernels
from biencoder.model.bert import ACTIVATIONS, Packing, TokenEncoder
from biencoder.model.config import SUPPORTED_ACTIVATIONS, read_config_json

_GLOBAL, _LOCAL = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModernBertEncoderConfig:
    """The fields of an HF ModernBERT ``config.json`` that shape the network, under the
    names of transformers < 5 (:meth:`from_json` also reads the ``layer_types`` and
    ``rope_parameters`` that transformers 5 writes)."""

    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    # The tokenizer's ids; the network uses none of them but pad's embedding row. Kept so
    # that the config.json saved back names the ids the checkpoint came with.
    pad_token_id: int = 50283
    bos_token_id: int | None = 50281
    eos_token_id: int | None = 50282
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    model_type: str = "modernbert"

    def __post_init__(self) -> None:
        if self.model_type != "modernbert":
            raise ValueError(f"model_type {self.model_type!r} is not 'modernbert'")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_activation {self.hidden_activation!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            # RoPE rotates pairs of coordinates.
            raise ValueError(
                f"hidden_size / num_attention_heads = {self.head_dim} is odd; RoPE needs an "
                "even head size"
            )
        if self.global_attn_every_n_layers < 1:
            every = self.global_attn_every_n_layers
            raise ValueError(f"global_attn_every_n_layers must be positive, got {every}")
        if self.local_attention < 2:
            raise ValueError(f"local_attention must be at least 2, got {self.local_attention}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """The longest input: RoPE has no table, but the model was trained up to here."""
        return self.max_position_embeddings

    @property
    def window(self) -> int:
        """How far a local layer's token sees on each side."""
        return self.local_attention // 2

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    @property
    def layer_types(self) -> list[str]:
        return [_GLOBAL if self.is_global(i) else _LOCAL for i in range(self.num_hidden_layers)]

    @classmethod
    def from_json(cls, path: str | Path) -> ModernBertEncoderConfig:
        """Read the fields we use from ``config.json``; HF-only keys are ignored."""
        path = Path(path)
        raw = read_config_json(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        try:
            values |= _rope_thetas(raw) | _global_every(raw)
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that ``transformers.AutoModel`` reads back: transformers < 5
        reads the layer pattern and RoPE bases from the dataclass's fields, transformers 5
        from ``layer_types`` and ``rope_parameters``."""
        rope = {
            _GLOBAL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
            _LOCAL: {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        return {
            "architectures": ["ModernBertModel"],
            **dataclasses.asdict(self),
            "layer_types": self.layer_types,
            "rope_parameters": rope,
        }


def _rope_thetas(raw: dict) -> dict:
    """The RoPE bases of transformers 5's ``rope_parameters``, where the file has them."""
    if raw.get("rope_scaling"):
        raise ValueError(
            f"field 'rope_scaling': only plain RoPE is supported, got {raw['rope_scaling']!r}"
        )
    params = raw.get("rope_parameters")
    if params is None:
        return {}
    thetas = {}
    for kind, field in ((_GLOBAL, "global_rope_theta"), (_LOCAL, "local_rope_theta")):
        kind_params = params.get(kind) or {}
        if kind_params.get("rope_type", "default") != "default":
            raise ValueError(
                f"field 'rope_parameters': only rope_type 'default' is supported, got "
                f"{kind_params['rope_type']!r} for {kind}"
            )
        if "rope_theta" in kind_params:
            thetas[field] = kind_params["rope_theta"]
    return thetas


def _global_every(raw: dict) -> dict:
    """``global_attn_every_n_layers`` of transformers 5's ``layer_types``, which must be a
    global layer every n layers from the first: the only pattern this encoder runs."""
    types = raw.get("layer_types")
    if types is None:
        return {}
    # transformers 5 also writes global_attn_every_n_layers, but runs layer_types.
    later = [i for i, kind in enumerate(types) if kind == _GLOBAL and i > 0]
    every = later[0] if later else max(len(types), 1)
    pattern = [_LOCAL if i % every else _GLOBAL for i in range(len(types))]
    if list(types) != pattern or len(types) != raw.get("num_hidden_layers", len(types)):
        raise ValueError(
            "field 'layer_types': only a global layer every n layers, from the first, one "
            f"entry per layer, is supported; got {types}"
        )
    return {"global_attn_every_n_layers": every}


def rotary_tables(positions: torch.Tensor, theta: float, head_dim: int, dtype: torch.dtype):
    """cos and sin [..., Dh] of RoPE with base ``theta`` at ``positions`` [...]: computed in
    float32 whatever ``dtype``, as transformers computes them (and the checkpoints were
    trained with), then cast."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / theta ** (exponents / head_dim)  # [Dh / 2]
    angles = positions[..., None].float() * inv_freq  # [..., Dh / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` [..., Dh], each half's coordinate i paired with the other half's i;
    in float32 at least, as transformers rotates bf16 queries."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated * sin).to(dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertEncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids [B, L] (or packed [T]) -> [B, L, H] (or [T, H])."""
        return self.dropout(self.norm(self.word(input_ids)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModernBertEncoderConfig, layer: int):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(H, 3 * H, bias=cfg.attention_bias)
        self.out = nn.Linear(H, H, bias=cfg.attention_bias)
        self.attn_dropout = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.attention_dropout)
        self.window = None if cfg.is_global(layer) else cfg.window

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
    ) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or packed [T, H] -> [T, H] with ``packing``, whose
        attention ``kernel`` computes (one of ``model.attention.CHOICES``). ``rope`` is
        this layer's (cos, sin) [B, L, Dh] or [T, Dh]; ``attend`` the padded path's mask."""
        H = x.shape[-1]
        A = self.num_heads
        qkv = self.qkv(x).unflatten(-1, (3, A, H // A))  # [B, L, 3, A, Dh] or [T, 3, A, Dh]
        cos, sin = (t.unsqueeze(-2).unsqueeze(-2) for t in rope)  # [..., 1, 1, Dh]
        qk = rotate(qkv[..., :2, :, :], cos, sin)
        qkv = torch.cat((qk, qkv[..., 2:, :, :]), dim=-3)
        dropout = self.attn_dropout if self.training else 0.0
        if packing is not None:
            y = kernels.attend(kernel, qkv, packing, dropout, self.window)  # [T, A, Dh]
            return self.dropout(self.out(y.flatten(1)))  # [T, H]
        B, L = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, A, L, Dh] each
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.dropout(self.out(y.transpose(1, 2).reshape(B, L, H)))  # [B, L, H]


class MLP(nn.Module):
    def __init__(self, cfg: ModernBertEncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_activation]
        self.dropout = nn.Dropout(cfg.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.up(x).chunk(2, dim=-1)  # [..., I] each
        return self.down(self.dropout(self.act(inputs) * gate))


class Layer(nn.Module):
    def __init__(self, cfg: ModernBertEncoderConfig, index: int):
        super().__init__()
        H = cfg.hidden_size
        # The embeddings end in a LayerNorm, which the first block does not repeat.
        self.attn_norm = (
            nn.LayerNorm(H, eps=cfg.norm_eps, bias=cfg.norm_bias) if index else nn.Identity()
        )
        self.attn = SelfAttention(cfg, index)
        self.mlp_norm = nn.LayerNorm(H, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attend, packing, kernel)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertEncoder(TokenEncoder):
    """Token ids -> contextual token states, optionally stopping at an intermediate layer.

    The interface of ``model.bert.Encoder``: the same ``forward`` arguments and result,
    ``unpadded``, ``attention`` and ``gradient_checkpointing`` attributes, and
    ``set_dropout``.
    """

    def __init__(self, cfg: ModernBertEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # ModernBERT's initialisation, for training from scratch; pretrained weights
        # overwrite it. Output projections are scaled down with depth, as the residual
        # stream sums one per block.
        std = 0.02
        out_std = std / math.sqrt(2 * len(self.layers))
        if isinstance(module, SelfAttention):
            pairs = ((module.qkv, std), (module.out, out_std))
        elif isinstance(module, MLP):
            pairs = ((module.up, std), (module.down, out_std))
        elif isinstance(module, nn.Embedding):
            pairs = ((module, std),)
        else:
            return
        for weights, scale in pairs:
            nn.init.trunc_normal_(weights.weight, std=scale, a=-2 * scale, b=2 * scale)
            if getattr(weights, "bias", None) is not None:
                nn.init.zeros_(weights.bias)

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

        The final norm follows any number of blocks: what a ModernBERT cut at
        ``num_layers`` blocks computes, which is how a tower pooled from an intermediate
        layer is saved. ModernBERT has no token types: ``token_type_ids`` is accepted for
        ``model.bert.Encoder``'s interface and ignored. States at padded positions mean
        nothing; ``packing`` is as for ``model.bert.Encoder``.
        """
        num_layers = self._blocks(input_ids, num_layers)
        B, L = input_ids.shape
        real = attention_mask.bool()
        # From the left edge of the padded batch, whatever the padding side, as in
        # transformers; RoPE sees only differences of positions, so the side does not
        # change the states beyond rounding.
        positions = torch.arange(L, device=input_ids.device).expand(B, L)  # [B, L]
        # As in model.bert: masks only where there is padding, packing unless compiled.
        packing, padded = self._path(real, packing)
        keys = real[:, None, None, :] if padded else None  # [B, 1, 1, L]
        if packing is not None:
            input_ids, positions = packing.pack(input_ids), packing.pack(positions)  # [T] each
        x = self.embeddings(input_ids)  # [B, L, H] or [T, H]
        # Per layer kind, keyed by the layer's window (None: global).
        window = self.config.window
        head_dim = self.config.head_dim
        ropes = {
            None: rotary_tables(positions, self.config.global_rope_theta, head_dim, x.dtype),
            window: rotary_tables(positions, self.config.local_rope_theta, head_dim, x.dtype),
        }
        # The packed path's kernels build their masks themselves.
        local = None if packing is not None else kernels.band_mask(real[:, None, None, :], window)
        masks = {None: keys, window: local}
        for layer in self.layers[:num_layers]:
            rope, attend = ropes[layer.attn.window], masks[layer.attn.window]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, attend, packing, self.attention, use_reentrant=False)
            else:
                x = layer(x, rope, attend, packing, self.attention)
        x = self.final_norm(x)
        return packing.unpack(x) if packing is not None else x
