"""train.py's config as tests compose it, and the overrides that shrink a run to seconds."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_train(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config ``python train.py OVERRIDES`` composes; ``hydra_config`` keeps the
    ``hydra`` node (launcher, sweeper, run folder)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def tiny_overrides(
    model_path: str, beir_path: str, sts_path: str, data: str = "beir", *extra: str
) -> list[str]:
    """Overrides that point train.py at the tiny model and data (``data``: beir or sts),
    2 steps of 4 examples, then ``extra``."""
    common = [
        f"model.path={model_path}",
        "model.max_length=32",
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "batch_size=32",
        "trainer.save_every=1",
    ]
    if data == "beir":
        common += [
            "train_data=beir",
            f"train_data.path={beir_path}",
            "train_data.dev_queries=4",
            "train_data.dev_corpus_size=30",
            f"data.path={beir_path}",
        ]
    else:
        common += [
            "experiment=sts",
            f"train_data.path={sts_path}",
            f"data.path={sts_path}",
        ]
    return [*common, *extra]
