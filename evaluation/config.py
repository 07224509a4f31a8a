"""Evaluation settings, typed and checked: ``conf/evaluation/default.yaml`` (and its
``index`` group) fill these dataclasses, Hydra's schema for the ``evaluation`` node, so that
a wrong type fails at composition and a value out of range before anything is encoded."""

from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("ip", "l2")


@dataclass
class IndexSpec:
    """Which FAISS index to search with; ``factory`` is an ``index_factory`` string.

    ``use_gpu``: null uses a GPU when faiss sees one, true requires it. ``nprobe`` (IVF) and
    ``ef_search`` (HNSW) trade recall for speed at search time; ``train_size`` caps the rows
    an index that needs training (IVF, PQ) is trained on.
    """

    factory: str = "Flat"
    metric: str = "ip"
    use_gpu: bool | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric: must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("nprobe", "ef_search", "train_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be positive or null, got {value}")


@dataclass
class EvalConfig:
    """How embeddings are scored, at the end of training, at dev evaluations and in eval.py.

    ``batch_size`` is texts per encoder forward pass when embedding (not the training
    batch); ``ks`` the metric cut-offs; ``matryoshka_dims`` extra truncated dimensions scored
    from the same embeddings; ``ignore_identical_ids`` drops hits whose document id equals
    the query id (Quora, ArguAna); ``precision`` ``bf16`` encodes under bf16 autocast (where
    torch supports bf16 on the device). ``store`` is the folder of embedding stores
    (``retrieval.store``) that retrieval evaluations look up and write, null for the run
    folder's ``embeddings/``; ``shard_rows`` the rows of each shard written there.
    """

    batch_size: int = 64
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 100])
    matryoshka_dims: list[int] = field(default_factory=list)
    ignore_identical_ids: bool = False
    precision: str = "fp32"
    index: IndexSpec = field(default_factory=IndexSpec)
    store: str | None = None
    shard_rows: int = 8192

    def __post_init__(self) -> None:
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows: must be positive, got {self.shard_rows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {self.batch_size}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks: cut-offs must be positive, got {list(self.ks)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: must be fp32 or bf16, got {self.precision!r}")
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims: must be positive, got {list(self.matryoshka_dims)}")


@dataclass
class FunnelConfig:
    """Matryoshka funnel search (``funnel`` in ``conf/eval.yaml``): search the corpus at the
    first ``dim`` dimensions (re-normalised when the model normalises) with
    ``evaluation.index``, keep ``candidates`` documents per query and re-rank them at the
    model's full dimension. ``dim`` null searches at full dimension only (no funnel)."""

    dim: int | None = None
    candidates: int = 100

    def __post_init__(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim: must be positive or null, got {self.dim}")
        if self.candidates < 1:
            raise ValueError(f"candidates: must be positive, got {self.candidates}")


QUANTIZATIONS = ("none", "int8", "binary")


@dataclass
class QuantizationConfig:
    """Quantised document embeddings (``conf/quantization/<kind>.yaml``).

    ``int8``: per-dimension min/max over the corpus mapped to 256 levels (FAISS's
    ``IndexScalarQuantizer`` ``QT_8bit``), searched with float queries. ``binary``: one sign
    bit per dimension for documents and queries, searched by Hamming distance
    (``IndexBinaryFlat``). ``rescore``: re-rank this many candidates per query with the float
    query and document embeddings; null ranks by the quantised scores alone.
    """

    kind: str = "none"
    rescore: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZATIONS:
            raise ValueError(f"kind: must be one of {', '.join(QUANTIZATIONS)}, got {self.kind!r}")
        if self.rescore is not None and self.rescore < 1:
            raise ValueError(f"rescore: must be positive or null, got {self.rescore}")
        if self.rescore is not None and self.kind == "none":
            raise ValueError("rescore: only applies to quantization=int8 or binary")
