"""Write training queries for an unlabelled corpus with a local language model:
`python synthesize.py [key=value ...]`.

    python synthesize.py out=syn.jsonl                       # 100 bundled SciFact abstracts
    python synthesize.py corpus.path=/beir/fiqa generator.path=/models/qwen num_docs=5000 \\
        num_queries=3 prompt.style=question filters.round_trip=both out=fiqa.jsonl
    python synthesize.py prompt.file=my_prompt.yaml negatives.num=1 out=syn.jsonl
    python synthesize.py out=syn.jsonl resume=true           # continue after a crash
    python train.py train_data=jsonl train_data.path=syn.jsonl train_data.format=pairs

For each sampled document the generator (any local 🤗 causal or seq2seq folder, or a GGUF
file; by default the packaged SmolLM2-135M-Instruct) writes ``num_queries`` texts from a
prompt (``prompt.style`` or a Promptagator-style ``prompt.file``). The query is parsed out
of each, then kept only if it passes the filters: length, duplicates, and the round trip
(its document in the top ``filters.round_trip_k`` under BM25 and/or the bi-encoder
``retriever_model``). Kept pairs, with ``negatives.num`` hard negatives if asked, are
appended to ``out`` with their provenance; ``<out>.progress.json`` records the documents
done and what each filter removed. See data/synthesis/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biencoder.data.errors import DataError
from biencoder.data.synthesis.pipeline import SynthesisReport
from biencoder.data.synthesis.run import SynthesisConfig, check_models, check_out, run_synthesis
from biencoder.training.hydra_config import CONFIG_DIR, ConfigError, naming, register

log = logging.getLogger("synthesize")

OUT_NAME = "synthetic.jsonl"


@dataclass
class SynthesizeConfig(SynthesisConfig):
    """conf/synthesize.yaml's schema: SynthesisConfig plus where to write and the run's
    name."""

    out: str | None = None
    resume: bool = False
    task_name: str = "synthesize"


def checked(cfg: DictConfig, out_dir: Path) -> tuple[SynthesizeConfig, Path]:
    """``cfg`` as a SynthesizeConfig, and the file it writes (``cfg.out``, default
    ``out_dir/synthetic.jsonl``), once every check that loads no model has passed: the
    corpus exists, the prompt file parses and fills in only ``{document}``, the generator's
    and retriever's files look whole, the output can be written. A value that cannot work
    raises ConfigError naming its key and file; nothing has been written then."""
    with naming("", SynthesizeConfig):
        config = OmegaConf.to_object(cfg)
    if not Path(config.corpus.path).exists():
        raise ConfigError(f"corpus.path: {config.corpus.path} does not exist")
    if config.prompt.file is not None and not Path(config.prompt.file).is_file():
        raise ConfigError(f"prompt.file: {config.prompt.file} is not a file")
    out = Path(config.out) if config.out else out_dir / OUT_NAME
    with naming("", SynthesizeConfig):
        config.prompt.load()
        check_models(config)
        check_out(out)
    return config, out


def run(cfg: DictConfig, out_dir: Path) -> SynthesisReport:
    """What ``python synthesize.py`` does with ``cfg``: writes ``cfg.out`` (default
    ``out_dir/synthetic.jsonl``)."""
    config, out = checked(cfg, out_dir)
    try:
        return run_synthesis(config, out, config.resume)
    except DataError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


@hydra.main(config_path=CONFIG_DIR, config_name="synthesize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


register()
ConfigStore.instance().store(group="schema", name="synthesize", node=SynthesizeConfig)

if __name__ == "__main__":
    main()
