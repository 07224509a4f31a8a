"""The trainer's settings, typed and checked: ``conf/trainer/{cpu,gpu}.yaml`` fill this
dataclass (Hydra's schema for the ``trainer`` group), so a value of the wrong type fails at
composition and one out of range fails in ``__post_init__`` before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainerConfig:
    """How to train: steps, batch, truncation, precision, checkpoints, evaluation cadence.

    The defaults are the CPU profile (``trainer=cpu``); see the YAML files for what each
    field means.
    """

    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 32
    max_length: int | None = None
    cache_chunk_size: int | None = None
    cache_chunk_tokens: int | None = None
    precision: str = "auto"
    tf32: bool = False
    grad_clip: float | None = 1.0
    gradient_checkpointing: bool = False
    hidden_dropout: float | None = None
    attention_dropout: float | None = 0.0
    log_every: int = 1
    eval_every: int = 13
    save_every: int = 50
    keep_checkpoints: int = 2
    # true, false or a checkpoint path: OmegaConf has no union types, so checked below.
    resume: Any = False
    eval: bool = True
    deterministic: bool = False
    prefetch: bool = True
    compile: bool = False
    on_nonfinite: str = "stop"
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive_or_null = (
            "max_steps",
            "max_length",
            "cache_chunk_size",
            "cache_chunk_tokens",
            "grad_clip",
        )
        for name in positive_or_null:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive or null, got {value}")
        for name in ("epochs", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.cache_chunk_size is not None and self.cache_chunk_tokens is not None:
            raise ValueError(
                "cache_chunk_tokens: GradCache chunks are cut by texts (cache_chunk_size="
                f"{self.cache_chunk_size}) or by tokens, not both; set cache_chunk_size=null"
            )
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size: must be >= 2 for in-batch negatives, got {self.batch_size}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0 <= rate < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {rate}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}, "
                f"got {self.on_nonfinite!r}"
            )
        if self.overwrite and self.resume is not False:
            raise ValueError("overwrite: cannot both start over and resume (trainer.resume)")
        if not isinstance(self.resume, bool | str) or self.resume == "":
            raise ValueError(
                f"resume: must be true, false or a checkpoint path, got {self.resume!r}"
            )
