"""Evaluate an embedding model on a BEIR retrieval set or on STS.

    python eval.py                                    # packaged MiniLM, SciFact test
    python eval.py model.path=outputs/train/.../checkpoints/last
    python eval.py eval_data.path=/beir/nfcorpus eval_data.split=test evaluation/index=hnsw
    python eval.py eval_data=sts evaluation.matryoshka_dims=[64,128]
    python eval.py hydra.run.dir=DIR                  # DIR/metrics.json, DIR/run.trec
    python eval.py funnel.dim=64 funnel.candidates=100  # search at 64 dims, re-rank at full
    python eval.py quantization=binary quantization.rescore=100   # or quantization=int8
    python eval.py evaluation.store=outputs/train/.../embeddings  # reuse a run's embeddings

Writes ``metrics.json`` (``ndcg@10``, ``mrr@10``, ``recall@100``, ...) and, for retrieval,
the TREC run file ``run.trec`` into the run folder, and prints a table. With a funnel or a
quantisation those are the cheaper search's, with ``search_ms_per_query`` (and
``bytes_per_doc``), and the ordinary float search's metrics go under ``flat/``.

Retrieval embeddings are kept in an embedding store (``retrieval.store``), the run folder's
``embeddings/`` unless ``evaluation.store`` names another: a model already encoded on the
same texts with the same settings there is searched without encoding again, so comparing
indexes, a funnel or quantisation of one checkpoint encodes its corpus once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biencoder.evaluation.compressed import check_funnel, check_quantization
from biencoder.evaluation.config import EvalConfig, FunnelConfig, QuantizationConfig
from biencoder.evaluation.scoring import STORE_FOLDER, evaluate
from biencoder.runtime.device import resolve_device
from biencoder.training.hydra_config import (
    CONFIG_DIR,
    SCHEMAS,
    ConfigError,
    build,
    check_dims,
    check_index,
    model_width,
    naming,
    register,
    settings,
)

log = logging.getLogger("eval")


def run(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """What ``python eval.py`` does with ``cfg``, writing into ``out_dir``. Every setting is
    checked, naming its key, before the model or the data is loaded."""
    evaluation = settings(cfg.evaluation, "evaluation", EvalConfig)
    eval_data = build(cfg.eval_data, "eval_data")
    width = model_width(cfg.model)
    check_dims("evaluation.matryoshka_dims", evaluation.matryoshka_dims, width)
    check_index(evaluation, width)
    funnel = settings(cfg.funnel, "funnel", FunnelConfig)
    quantization = settings(cfg.quantization, "quantization", QuantizationConfig)
    check_compressed(funnel, quantization, evaluation, width, cfg.eval_data)
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, "model", _convert_="object").to(device)
    log.info(
        "model %s: %s pooling, dim %d, max %d tokens, on %s",
        cfg.model.path,
        model.config.pooling,
        model.dim,
        model.config.max_length,
        device,
    )
    with naming("eval_data", eval_data):
        dataset = eval_data.load()
    return evaluate(
        model,
        dataset,
        evaluation,
        out_dir,
        funnel=funnel,
        quantization=quantization,
        store=out_dir / STORE_FOLDER,
    )


def check_compressed(
    funnel: FunnelConfig,
    quantization: QuantizationConfig,
    evaluation: EvalConfig,
    width: int,
    eval_data: DictConfig,
) -> None:
    """The funnel and the quantisation must fit the model, the cut-offs and the index, and
    search a corpus; at most one of them at a time."""
    with naming("funnel", FunnelConfig):
        check_funnel(funnel, evaluation.ks, width, evaluation.index)
    with naming("quantization", QuantizationConfig):
        check_quantization(quantization, evaluation.ks, width, evaluation.index)
    if funnel.dim is None and quantization.kind == "none":
        return
    key = "funnel.dim" if funnel.dim is not None else "quantization"
    if funnel.dim is not None and quantization.kind != "none":
        raise ConfigError(f"funnel.dim: cannot be combined with quantization={quantization.kind}")
    if OmegaConf.get_type(eval_data) is SCHEMAS["eval_data/sts"]:
        raise ConfigError(f"{key}: searches a corpus, so it needs BEIR eval_data, not STS")


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


register()

if __name__ == "__main__":
    main()
