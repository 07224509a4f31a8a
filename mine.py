"""Mine hard negatives into a training file: `python mine.py [key=value ...]`.

    python mine.py out=mined.jsonl                    # MiniLM on bundled SciFact train
    python mine.py data.path=/beir/nfcorpus num_negatives=8 relative_margin=0.05 out=nf.jsonl
    python mine.py data.path=pairs.jsonl out=mined.jsonl   # {"query", "positive"} lines
    python mine.py retriever=bm25 range_min=5 sampling=random out=bm25.jsonl
    python mine.py index=HNSW32 teacher.path=/models/cross-encoder out=distil.jsonl
    python mine.py out=mined.jsonl resume=true        # continue after a crash

Writes ``{"query", "positive", "negatives": [...]}`` lines (plus ``"scores"`` with a
teacher), which ``python train.py train_data=jsonl train_data.path=FILE
train_data.format=triplets`` trains on; ``resume=true`` continues an interrupted run where
it stopped, with the corpus embeddings it kept beside ``out``. The options are
sentence-transformers' ``mine_hard_negatives`` ones with its meanings (see
``data.mining.selection.MiningOptions``); every setting is checked, naming its key, before
the model or the data is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from biencoder.data.beir import load_beir
from biencoder.data.io import dotted_leaves, naming_errors, progress_path
from biencoder.data.mining.pipeline import MiningReport, mine, resume_state
from biencoder.data.mining.selection import MiningOptions
from biencoder.data.mining.sets import mining_set_from_beir, mining_set_from_pairs
from biencoder.data.mining.teachers import (
    BiEncoderTeacher,
    CrossEncoderTeacher,
    Teacher,
    check_teacher_folder,
    is_cross_encoder,
)
from biencoder.data.training import load_pairs
from biencoder.model.biencoder import BiEncoder, embedding_dim
from biencoder.retrieval.retrievers import BM25Retriever, DenseRetriever
from biencoder.retrieval.search import check_index_dims
from biencoder.runtime import lock
from biencoder.runtime.device import resolve_device
from biencoder.runtime.files import atomic_file, check_can_create, check_free_space
from biencoder.training.hydra_config import CONFIG_DIR, ConfigError, register

log = logging.getLogger("mine")

RETRIEVERS = ("dense", "bm25")
OUT_NAME = "negatives.jsonl"
# Keys that may change between a run and its resumption: they do not change the output.
RESUMABLE_KEYS = ("resume", "out", "device")


@dataclass
class DataNode:
    path: str = MISSING  # a BEIR folder, or a JSONL file of {"query", "positive"} pairs
    split: str = "train"  # the BEIR qrels split


@dataclass
class ModelNode:
    path: str = MISSING
    max_length: int | None = None  # null: the folder's own
    batch_size: int = 64  # texts per encoder pass


@dataclass
class TeacherNode:
    path: str | None = None  # a bi-encoder or cross-encoder folder; null: no scores
    batch_size: int = 32
    max_length: int | None = None


@dataclass
class MineConfig(MiningOptions):
    """conf/mine.yaml's schema: MiningOptions' keys at the top, plus what to read, embed
    and write."""

    data: DataNode = field(default_factory=DataNode)
    model: ModelNode = field(default_factory=ModelNode)
    teacher: TeacherNode = field(default_factory=TeacherNode)
    query_prompt: str | None = None
    corpus_prompt: str | None = None
    retriever: str = "dense"
    index: str = "Flat"
    out: str | None = None
    resume: bool = False
    query_batch_size: int = 1024
    device: str = "auto"
    task_name: str = "mine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever: {self.retriever!r} is not one of {', '.join(RETRIEVERS)}")
        for key, value in [
            ("model.batch_size", self.model.batch_size),
            ("teacher.batch_size", self.teacher.batch_size),
            ("query_batch_size", self.query_batch_size),
        ]:
            if value < 1:
                raise ValueError(f"{key}: must be positive, got {value}")
        for key, value in [
            ("model.max_length", self.model.max_length),
            ("teacher.max_length", self.teacher.max_length),
        ]:
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be positive or null, got {value}")


def checked(cfg: DictConfig) -> MineConfig:
    """``cfg`` as a MineConfig; any value that cannot work raises ConfigError naming it."""
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not Path(config.data.path).exists():
        raise ConfigError(f"data.path: {config.data.path} does not exist")
    if config.retriever == "dense":
        try:
            width = embedding_dim(config.model.path)
            check_index_dims(config.index, [width])
        except FileNotFoundError as err:
            raise ConfigError(f"model.path: {err}") from err
        except ValueError as err:
            raise ConfigError(f"index: {str(err).removeprefix('factory: ')}") from err
    if config.teacher.path is not None:
        if not Path(config.teacher.path).is_dir():
            raise ConfigError(f"teacher.path: {config.teacher.path} is not a folder")
        try:
            check_teacher_folder(config.teacher.path, config.teacher.max_length)
        except ValueError as err:
            raise ConfigError(f"teacher.{err}") from err
    if config.out is not None:
        check_out_folder(Path(config.out))
    return config


def check_out_folder(out: Path) -> None:
    """Raise ConfigError naming ``out`` where its folder cannot be written, so that a run
    fails before embedding the corpus rather than at its first write. Writes nothing: the
    nearest folder that exists is asked (os.access) whether files can be made in it."""
    try:
        check_can_create(out, "out")
    except ValueError as err:
        raise ConfigError(str(err)) from err


def load_teacher(node: TeacherNode, device: torch.device) -> Teacher:
    """A cross-encoder when the folder's config names a sequence classifier, else our
    BiEncoder."""
    if is_cross_encoder(node.path):
        return CrossEncoderTeacher(
            node.path, device=device, batch_size=node.batch_size, max_length=node.max_length
        )
    model = BiEncoder.from_pretrained(node.path, max_length=node.max_length, device=device)
    return BiEncoderTeacher(model, node.batch_size)


def _corpus_cache(out: Path) -> Path:
    return out.with_name(out.name + ".corpus.npy")


def embedded_retriever(
    model: BiEncoder, corpus: list[str], config: MineConfig, out: Path
) -> DenseRetriever:
    """A DenseRetriever whose corpus embeddings are kept beside ``out`` until mining ends,
    so that ``resume=true`` after a crash does not embed a large corpus again. The run's
    settings are checked equal before, so the kept embeddings are this run's."""
    cache = _corpus_cache(out)
    # Only with a progress record: resume_state has then checked that it has this run's
    # settings, and mine() writes one before searching anything.
    continuing = config.resume and progress_path(out).exists() and cache.exists()
    embeddings = _kept_embeddings(cache, len(corpus)) if continuing else None
    retriever = DenseRetriever(
        model,
        corpus,
        factory=config.index,
        batch_size=config.model.batch_size,
        seed=config.seed,
        embeddings=embeddings,
    )
    if embeddings is None:
        with naming_errors(cache, "the corpus embeddings"):
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cache, "wb") as file:
                np.save(file, retriever.embeddings)
    return retriever


def _kept_embeddings(cache: Path, texts: int) -> np.ndarray:
    advice = f"delete {cache} to embed the corpus again"
    try:
        embeddings = np.load(cache)
    except (ValueError, EOFError) as err:
        raise ConfigError(f"resume: {cache} cannot be read ({err}); {advice}") from err
    # The settings name data.path, not what it holds: the file may have changed since.
    if embeddings.ndim != 2 or len(embeddings) != texts:
        raise ConfigError(
            f"resume: {cache} holds embeddings of shape {embeddings.shape} for the {texts} "
            f"texts of data.path; {advice}"
        )
    return embeddings


def run(cfg: DictConfig, out_dir: Path) -> MiningReport:
    """What ``python mine.py`` does with ``cfg``: writes ``cfg.out`` (default
    ``out_dir/negatives.jsonl``)."""
    config = checked(cfg)
    try:
        device = resolve_device(config.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out = Path(config.out) if config.out else out_dir / OUT_NAME
    # One process writes ``out``, its progress record and corpus cache at a time.
    with lock.hold(lock.beside(out), "out"):
        return mine_into(out, cfg, config, device)


def mine_into(out: Path, cfg: DictConfig, config: MineConfig, device: torch.device) -> MiningReport:
    """run()'s work once ``out`` is this process's alone."""
    settings = {
        key: value
        for key, value in dotted_leaves(OmegaConf.to_container(cfg, resolve=True)).items()
        if key not in RESUMABLE_KEYS
    }
    try:
        progress = resume_state(out, config.resume, settings)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if progress["complete"]:
        log.info("%s is complete: %d lines", out, progress["lines"])
        return MiningReport()
    options = MiningOptions(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(MiningOptions)}
    )
    # Before the corpus is embedded, so that a teacher that does not load fails the run in
    # seconds rather than after all the embedding.
    teacher = load_teacher(config.teacher, device) if config.teacher.path else None
    path = Path(config.data.path)
    if path.is_dir():
        source = mining_set_from_beir(load_beir(path, config.data.split))
    else:
        source = mining_set_from_pairs(load_pairs(path))
    log.info("%s: %d queries, %d texts", path, len(source.queries), len(source.corpus))
    torch.manual_seed(config.seed)
    if config.retriever == "bm25":
        retriever = BM25Retriever(source.corpus)
    else:
        width = embedding_dim(config.model.path)
        cache_bytes = len(source.corpus) * width * np.dtype(np.float32).itemsize
        try:
            check_free_space(out.parent, cache_bytes, "out", "the corpus embeddings")
        except OSError as err:
            raise ConfigError(str(err)) from err
        model = BiEncoder.from_pretrained(
            config.model.path,
            max_length=config.model.max_length,
            query_prefix=config.query_prompt,
            doc_prefix=config.corpus_prompt,
            device=device,
        )
        retriever = embedded_retriever(model, source.corpus, config, out)
    report = mine(
        source,
        retriever,
        options,
        out,
        teacher=teacher,
        resume=config.resume,
        settings=settings,
        query_batch_size=config.query_batch_size,
    )
    _corpus_cache(out).unlink(missing_ok=True)
    return report


@hydra.main(config_path=CONFIG_DIR, config_name="mine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


register()
ConfigStore.instance().store(group="schema", name="mine", node=MineConfig)

if __name__ == "__main__":
    main()
