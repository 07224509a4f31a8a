"""A BERT encoder in plain PyTorch, numerically equal to ``transformers.BertModel``.

Shapes: B = batch, T = tokens, H = hidden size, A = heads, Dh = H / A.
Post-LayerNorm blocks, as in the original BERT:
    x = LN(x + Attn(x));  x = LN(x + MLP(x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import EncoderConfig

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)  # [T]
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(x))  # [B, T, H]


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

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))  # [B, A, T, Dh]
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, H))  # [B, T, H]


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

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attend)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Encoder(nn.Module):
    """Token ids -> contextual token states, optionally stopping at an intermediate layer."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False
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

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> None:
        """Change the dropout rates for training; None keeps the checkpoint's. Attention
        dropout is the costly one on CPU: it takes SDPA off its fused kernel."""
        if hidden is not None:
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = hidden
        if attention is not None:
            for layer in self.layers:
                layer.attn.attn_dropout = attention

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Hidden states after ``num_layers`` blocks (all of them by default): [B, T, H].

        ``num_layers=0`` returns the embedding output; only the blocks needed run.
        """
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; tokenize with truncation"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        num_layers = len(self.layers) if num_layers is None else num_layers
        if not 0 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers={num_layers} outside [0, {len(self.layers)}]")
        # SDPA takes a boolean mask where True means "may attend"; [B, 1, 1, T] broadcasts
        # over heads and query positions.
        attend = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers[:num_layers]:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attend, use_reentrant=False)
            else:
                x = layer(x, attend)
        return x
