"""Evaluate an embedding model on a BEIR retrieval set or on STS.

    python eval.py                                    # packaged MiniLM, SciFact test
    python eval.py model.path=outputs/train/.../checkpoints/last
    python eval.py data.path=/beir/nfcorpus data.split=test index=hnsw
    python eval.py data=sts matryoshka_dims=[64,128]
    python eval.py hydra.run.dir=DIR                  # DIR/metrics.json, DIR/run.trec

Writes ``metrics.json`` (``ndcg@10``, ``mrr@10``, ``recall@100``, ...) and, for retrieval,
the TREC run file ``run.trec`` into the run folder, and prints a table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data import BUNDLED_DIR, BeirDataset
from evaluation import evaluate_retrieval, evaluate_sts, format_table, write_trec_run
from model import POOLING_HEADS, BiEncoder, packaged_model_path

log = logging.getLogger("eval")


def register_resolvers() -> None:
    """``${packaged_model:}`` and ``${bundled:name}`` in configs; safe to call twice."""
    if not OmegaConf.has_resolver("packaged_model"):
        OmegaConf.register_new_resolver("packaged_model", packaged_model_path)
    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", lambda name: str(BUNDLED_DIR / name))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    return device


def check_eval_config(cfg: DictConfig) -> None:
    """Fail before loading anything, naming the offending key."""
    if cfg.model.pooling is not None and cfg.model.pooling not in POOLING_HEADS:
        raise ValueError(
            f"model.pooling: unknown pooling {cfg.model.pooling!r}; "
            f"choose one of {', '.join(POOLING_HEADS)}"
        )
    if not cfg.ks or any(k <= 0 for k in cfg.ks):
        raise ValueError(f"ks: cut-offs must be positive, got {list(cfg.ks)}")
    if any(d <= 0 for d in cfg.matryoshka_dims):
        raise ValueError(f"matryoshka_dims: must be positive, got {list(cfg.matryoshka_dims)}")
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {cfg.batch_size}")


def score(model: BiEncoder, dataset, cfg: DictConfig, matryoshka_dims: Sequence[int] = ()):
    """Metrics, timings and (for retrieval) the run of ``model`` on a BEIR or STS dataset.

    Full-dimension metrics are always there, so a Matryoshka dim equal to the model's is
    not scored twice."""
    matryoshka_dims = [d for d in matryoshka_dims if d != model.dim]
    if isinstance(dataset, BeirDataset):
        result = evaluate_retrieval(
            model,
            dataset,
            ks=list(cfg.ks),
            index=instantiate(cfg.index),
            matryoshka_dims=matryoshka_dims,
            batch_size=cfg.batch_size,
            ignore_identical_ids=cfg.ignore_identical_ids,
        )
        return result.metrics, result.timings, result.run
    metrics = evaluate_sts(
        model, dataset, matryoshka_dims=matryoshka_dims, batch_size=cfg.batch_size
    )
    return metrics, {}, None


def evaluate(
    model: BiEncoder,
    dataset,
    cfg: DictConfig,
    out_dir: Path,
    matryoshka_dims: Sequence[int] | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``dataset`` as ``cfg`` says; write metrics.json (and run.trec).

    ``matryoshka_dims`` replaces ``cfg.matryoshka_dims`` (train.py passes its loss's dims).
    """
    dims = list(cfg.matryoshka_dims if matryoshka_dims is None else matryoshka_dims)
    if any(d > model.dim for d in dims):
        raise ValueError(f"matryoshka_dims {dims} exceed the model's dimension {model.dim}")
    start = time.perf_counter()
    metrics, timings, run = score(model, dataset, cfg, dims)
    metrics |= timings
    if run is not None:
        write_trec_run(run, out_dir / "run.trec")
        log.info(
            "%d queries over %d documents (%s split)",
            len(dataset.queries),
            len(dataset.corpus),
            dataset.split,
        )
    else:
        log.info("%d sentence pairs", len(dataset))
    metrics["eval_wall_s"] = time.perf_counter() - start
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    log.info("wrote %s", out_dir / "metrics.json")
    return metrics


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    check_eval_config(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    model = instantiate(cfg.model).to(device)
    log.info(
        "model %s: %s pooling, dim %d, max %d tokens, on %s",
        cfg.model.path,
        model.config.pooling,
        model.dim,
        model.config.max_length,
        device,
    )
    dataset = instantiate(cfg.data)
    return evaluate(model, dataset, cfg, out_dir)


register_resolvers()

if __name__ == "__main__":
    main()
