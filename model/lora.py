"""LoRA adapters on an encoder's linear layers, through ``peft``.

``peft`` is the field's library (sentence-transformers, FlagEmbedding and Tevatron all train
LoRA through it); its ``inject_adapter_in_model`` works on any ``nn.Module``, so it adapts
our hand-written encoders as they are: each targeted ``nn.Linear`` becomes peft's LoRA
linear, ``W x + (alpha / r) · B A dropout(x)`` with ``A`` random and ``B`` zero, and every
other parameter of the encoder is frozen. The pooling head and projection live outside the
encoder (``Tower``), so they stay trainable, as does a loss's learnable temperature.

A model with adapters is saved twice over (``BiEncoder.save_pretrained``): merged, as a
plain checkpoint that transformers, sentence-transformers and ``BiEncoder.from_pretrained``
load without peft; and as its trainable tensors in ``adapter/`` (peft's file names, our
module's parameter names), which :func:`load_adapter_state` puts back on the same base to
resume a run exactly.

peft is imported where adapters are made or merged, not here: a model without adapters
(every evaluation, the GPU machine's image without peft) never needs it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSettings:
    """``model.lora``: rank ``r`` (0 = no adapters, the whole encoder trains), scale
    ``alpha / r``, dropout on the adapters' input, and the linear layers adapted, by the last
    part of their name in the encoder (``q``, ``up``...); None adapts every linear layer of
    every transformer block, as QLoRA and the LLM embedders (E5-Mistral, RepLLaMA) do."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r: the LoRA rank must be >= 0 (0 turns LoRA off), got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: the LoRA scale numerator must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules: an empty list adapts nothing; null adapts all")

    @property
    def enabled(self) -> bool:
        return self.r > 0


NO_LORA = LoraSettings()


def block_linear_names(encoder: nn.Module) -> list[str]:
    """The distinct last name parts of the linear layers inside ``encoder.layers``: what
    ``target_modules`` may name (BERT: query key value out up down; ModernBERT: qkv out up
    down; the decoders: q k v out gate up down)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in encoder.layers.named_modules()
            if isinstance(module, nn.Linear)
        }
    )


def add_lora(encoder: nn.Module, settings: LoraSettings) -> None:
    """Put LoRA adapters on ``encoder``'s block linear layers in place and freeze the rest of
    it. The adapters start as a no-op (``B = 0``): the encoder computes what it did."""
    from peft import LoraConfig, inject_adapter_in_model

    available = block_linear_names(encoder)
    targets = list(settings.target_modules or available)
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(
            f"lora.target_modules: {', '.join(unknown)} name no linear layer of this "
            f"{type(encoder).__name__}; its block layers are {', '.join(available)}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Matched within the blocks only, so an embedding or a head is never adapted.
        target_modules=rf"layers\.\d+\.(.*\.)?({'|'.join(targets)})",
        bias="none",
    )
    inject_adapter_in_model(config, encoder)


def merged(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every LoRA layer folded into its base linear
    (``W + (alpha / r) · B A``) and replaced by it: plain ``nn.Linear`` layers, the names
    and state dict of the module before :func:`add_lora`."""
    from peft.tuners.lora import LoraLayer

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return module


def adapter_names(model: nn.Module) -> list[str]:
    """What training changes in a bi-encoder with adapters: the adapters and every
    parameter outside the encoders (pooling head, projection), by name."""
    return [
        name
        for name, _ in model.named_parameters()
        if "lora_" in name or ".encoder." not in f".{name}"
    ]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of :func:`adapter_names`, on the CPU."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().contiguous() for name in adapter_names(model)}


def save_adapter_state(model: nn.Module, settings: LoraSettings, path: Path) -> None:
    """Write ``path/adapter/``: the trainable tensors and peft's adapter config."""
    from peft import LoraConfig

    folder = path / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), folder / ADAPTER_WEIGHTS)
    LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else None,
    ).save_pretrained(str(folder))


def load_adapter_state(model: nn.Module, path: Path) -> None:
    """Put the tensors :func:`save_adapter_state` wrote under ``path`` back into ``model``,
    which must carry the same adapters and heads (the run's own base with its settings)."""
    file = path / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: {path} was not saved by a run with model.lora.r > 0"
        )
    saved = load_file(file)
    expected = adapter_names(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(
            f"{file}: its tensors are not this model's adapters and heads (missing: "
            f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})"
            "; resume with the model.lora settings the run was started with"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{file}: {name} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(params[name].shape)}; resume with the run's model.lora.r"
                )
            params[name].copy_(value)
