"""A BERT encoder in plain PyTorch, numerically equal to ``transformers.BertModel``, and
with RoBERTa's position ids (``EncoderConfig.positions_per_text``) to ``RobertaModel`` and
``XLMRobertaModel``.

Shapes: B = batch, L = padded length, T = tokens, H = hidden size, A = heads, Dh = H / A.
Post-LayerNorm blocks, as in the original BERT:
    x = LN(x + Attn(x));  x = LN(x + MLP(x))

Two execution paths give the same states at real tokens. The padded one runs every block
on [B, L, H]. The unpadded ("varlen") one packs the real tokens into [T, H] and runs the
embeddings, projections, layer norms and MLP on those alone, which is where the FLOPs
are. Attention, which needs each text's tokens side by side, runs on the packed tokens
with the kernel that ``Encoder.attention`` names (see ``model.attention``): a
variable-length one on a GPU, or a scatter into the padded layout and a gather back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from biencoder.model import attention as kernels
from biencoder.model.config import EncoderConfig

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Packing(NamedTuple):
    """Where the packed tokens of an unpadded batch sit in its padded [B, L] layout.

    Everything here depends on the attention mask alone, which is known on the host when
    the text is tokenized: computed there (:meth:`from_mask` on the CPU mask) and sent
    with the tokens, it spares the device the ``nonzero`` calls, each of which would make
    the host wait for the GPU to drain its queue. Row b's tokens are the packed rows
    ``offsets[b]:offsets[b + 1]`` whichever side the batch is padded on.
    """

    real: torch.Tensor  # [T] positions of the real tokens in the flattened [B * L]
    padding: torch.Tensor  # [B * L - T] positions of the padding
    offsets: torch.Tensor  # [B + 1] int32, cumulative token counts: 0, len(row 0), ...
    batch: int
    length: int
    longest: int  # the longest row's token count

    @classmethod
    def from_mask(cls, real: torch.Tensor) -> Packing:
        """From a mask [B, L] that is nonzero at real tokens; each row's real tokens must be
        contiguous (left or right padding). On a device tensor this synchronises: call it
        on the CPU mask and move the result with :meth:`to`."""
        real = real.bool()
        flat = real.flatten()
        lengths = real.sum(1)  # [B]
        offsets = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max()) if lengths.numel() else 0
        return cls(
            flat.nonzero().squeeze(1),
            (~flat).nonzero().squeeze(1),
            offsets,
            *real.shape,
            longest,
        )

    @property
    def has_padding(self) -> bool:
        """Whether any position is padding: read off a shape, so no synchronisation."""
        return self.padding.numel() > 0

    @property
    def tokens(self) -> int:
        return self.real.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        """The same packing with its index tensors on ``device``."""
        return self._replace(
            real=self.real.to(device, non_blocking=non_blocking),
            padding=self.padding.to(device, non_blocking=non_blocking),
            offsets=self.offsets.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Packing:
        """Index tensors in pinned memory, for an asynchronous copy to a GPU."""
        return self._replace(
            real=self.real.pin_memory(),
            padding=self.padding.pin_memory(),
            offsets=self.offsets.pin_memory(),
        )

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]"""
        return padded.flatten(0, 1).index_select(0, self.real)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], zeros at padding. Zeros, not garbage, because attention
        multiplies masked keys by 0 and NaN·0 is NaN; each row is written once, in place on
        a fresh tensor, as a second pass costs as much as the scatter."""
        padded = packed.new_empty(self.batch * self.length, *packed.shape[1:])
        padded.index_fill_(0, self.padding, 0)
        padded.index_copy_(0, self.real, packed)
        return padded.unflatten(0, (self.batch, self.length))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        # RoBERTa's padding has a position row of its own, which transformers keeps at zero
        # and out of the gradient, as for the pad token's word row.
        self.position = nn.Embedding(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            padding_idx=cfg.pad_token_id if cfg.positions_per_text else None,
        )
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Ids and positions [B, L] (or packed [T]) -> [B, L, H] (or [T, H])."""
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        H = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(
        self,
        x: torch.Tensor,
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
    ) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or packed [T, H] -> [T, H] with ``packing``, whose
        attention ``kernel`` computes (one of ``model.attention.CHOICES``)."""
        H = x.shape[-1]
        A = self.num_heads
        projections = (self.query, self.key, self.value)
        if all(type(p) is nn.Linear for p in projections):
            # One GEMM of width 3H instead of three of width H: the checkpoint keeps three
            # matrices, and concatenating them costs 3H² copies against T·3H² multiply-adds.
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = F.linear(x, weight, bias)  # [B, L, 3H] or [T, 3H]
        else:
            # An adapted projection (LoRA) adds its own term in its forward, which reading
            # its base weight would skip.
            qkv = torch.cat([p(x) for p in projections], dim=-1)
        dropout = self.attn_dropout if self.training else 0.0
        if packing is not None:
            y = kernels.attend(kernel, qkv.view(-1, 3, A, H // A), packing, dropout)  # [T, A, Dh]
            return self.out(y.flatten(1))  # [T, H]
        B, L = qkv.shape[:2]
        # Strided views: SDPA's CPU kernel reads them without a copy.
        q, k, v = qkv.view(B, L, 3, A, H // A).permute(2, 0, 3, 1, 4)  # [B, A, L, Dh] each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, L, H))  # [B, L, H]


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        attend: torch.Tensor | None,
        packing: Packing | None,
        kernel: str = "auto",
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attend, packing, kernel)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class TokenEncoder(nn.Module):
    """What every encoder family shares: the execution switches (``unpadded``, True unless
    set, picks the path, see the module docstring; ``attention``, "auto" unless set, see
    ``model.attention``, the kernel of the unpadded one; ``gradient_checkpointing``), the
    dropout rates, and the checks and the choice of path at the top of ``forward``. All
    paths give the same states at real tokens up to rounding, so the switches are
    attributes to flip, not part of the checkpoint. A family sets ``config`` (with
    ``max_tokens`` and ``max_position_embeddings``) and ``layers`` (each with an ``attn``
    whose ``attn_dropout`` is the attention-probability rate)."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.unpadded = True
        self.attention = "auto"

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> None:
        """Change the dropout rates for training; None keeps the checkpoint's. ``hidden`` is
        every dropout on states, ``attention`` the one on attention probabilities: the
        costly one on CPU, as it takes SDPA off its fused kernel."""
        if hidden is not None:
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = hidden
        if attention is not None:
            for layer in self.layers:
                layer.attn.attn_dropout = attention

    def _blocks(self, input_ids: torch.Tensor, num_layers: int | None) -> int:
        """How many blocks ``forward`` runs (all by default), after refusing inputs longer
        than the model takes."""
        if input_ids.shape[1] > self.config.max_tokens:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens is longer than the model's "
                f"{self.config.max_tokens} (max_position_embeddings="
                f"{self.config.max_position_embeddings}); tokenize with truncation"
            )
        num_layers = len(self.layers) if num_layers is None else num_layers
        if not 0 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers={num_layers} outside [0, {len(self.layers)}]")
        return num_layers

    def _path(self, real: torch.Tensor, packing: Packing | None) -> tuple[Packing | None, bool]:
        """(the packing to run on, or None for the padded path; whether any position is
        padding) for the mask ``real`` [B, L]. Both depend on the data, which would break a
        torch.compile graph: compiled, the encoder always masks and never packs."""
        if torch.compiler.is_compiling():
            return None, True
        if packing is None and self.unpadded:
            packing = Packing.from_mask(real)
        padded = packing.has_padding if packing is not None else not bool(real.all())
        return (packing if self.unpadded and padded else None), padded


class Encoder(TokenEncoder):
    """Token ids -> contextual token states, optionally stopping at an intermediate layer
    (the switches and dropout of :class:`TokenEncoder`)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation, for training from scratch; pretrained weights overwrite it.
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
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
        """Hidden states after ``num_layers`` blocks (all of them by default): [B, L, H].

        ``num_layers=0`` returns the embedding output; only the blocks needed run. States
        at padded positions mean nothing: the padded path computes them from the real
        tokens, the unpadded path leaves zeros. ``packing`` is the mask's
        :class:`Packing`, computed where the tokens were made; without it, the encoder
        derives it from the mask, which on a GPU waits for the device (three times).
        """
        num_layers = self._blocks(input_ids, num_layers)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        B, L = input_ids.shape
        real = attention_mask.bool()
        if self.config.positions_per_text:
            # transformers counts input_ids != pad_token_id along the row; counting the mask
            # is the same for any tokenizer that pads with that id, on either side.
            positions = real.cumsum(1) * real + self.config.pad_token_id  # [B, L]
        else:
            # From the left edge of the padded batch, whatever the padding side, as in
            # transformers.
            positions = torch.arange(L, device=input_ids.device).expand(B, L)  # [B, L]
        # SDPA takes a boolean mask where True means "may attend"; [B, 1, 1, L] broadcasts
        # over heads and query positions. A batch without padding needs none, and takes
        # the unmasked kernel.
        packing, padded = self._path(real, packing)
        attend = real[:, None, None, :] if padded else None
        if packing is not None:
            input_ids, token_type_ids, positions = map(
                packing.pack, (input_ids, token_type_ids, positions)
            )  # [T] each
        x = self.embeddings(input_ids, token_type_ids, positions)  # [B, L, H] or [T, H]
        for layer in self.layers[:num_layers]:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attend, packing, self.attention, use_reentrant=False)
            else:
                x = layer(x, attend, packing, self.attention)
        return packing.unpack(x) if packing is not None else x
