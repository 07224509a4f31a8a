"""Mine hard negatives into a training file: `python mine.py [key=value ...]`.

    python mine.py out=mined.jsonl                    # MiniLM on bundled SciFact train
    python mine.py data.path=/beir/nfcorpus num_negatives=8 relative_margin=0.05 out=nf.jsonl
    python mine.py data.path=pairs.jsonl out=mined.jsonl   # {"query", "positive"} lines
    python mine.py retriever=bm25 range_min=5 sampling=random out=bm25.jsonl
    python mine.py index=HNSW32 teacher.path=/models/cross-encoder out=distil.jsonl
    python mine.py out=mined.jsonl resume=true        # continue after a crash
    python mine.py model.path=RUN/checkpoints/best store=RUN/embeddings out=m.jsonl  # reuse

Writes ``{"query", "positive", "negatives": [...]}`` lines (plus ``"scores"`` with a
teacher), which ``python train.py train_data=jsonl train_data.path=FILE
train_data.format=triplets`` trains on; ``resume=true`` continues an interrupted run where
it stopped. The options are sentence-transformers' ``mine_hard_negatives`` ones with its
meanings (see ``data.mining.selection.MiningOptions``); every setting is checked, naming
its key, before the model or the data is loaded.

Dense mining keeps the corpus embeddings in an embedding store (``retrieval.store``):
``<out>.embeddings/`` beside ``out`` unless ``store`` names another folder. The corpus is
looked up there by the fingerprints of the model's weights, the texts (with their BEIR
ids, or their row numbers for pairs) and the encode settings, and encoded shard by shard
only where missing, so a run killed while encoding resumes at its first missing shard, and
a rerun with the same model and corpus (other options, a fresh ``out``) encodes nothing.
``store=RUN/embeddings`` reuses the corpus a training or ``eval.py`` run encoded with the
same model and settings. The store stays once mining is done: delete it to free its space.
Exact search (``index=Flat``) streams its shards, so the corpus is never in memory whole.
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

from biencoder.data.beir import BeirDataset, load_beir
from biencoder.data.io import dotted_leaves, naming_errors
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
from biencoder.retrieval.store import entry_key, entry_path, find
from biencoder.runtime import lock
from biencoder.runtime.device import resolve_device
from biencoder.runtime.files import check_can_create, check_free_space
from biencoder.training.hydra_config import CONFIG_DIR, ConfigError, register

log = logging.getLogger("mine")

RETRIEVERS = ("dense", "bm25")
OUT_NAME = "negatives.jsonl"
# Keys that may change between a run and its resumption: they do not change the output.
RESUMABLE_KEYS = ("resume", "out", "device", "store")


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
    store: str | None = None  # folder of embedding stores; null: <out>.embeddings beside out
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
    if config.store is not None:
        try:
            # An entry folder inside it, as encode_to_store makes one.
            check_can_create(Path(config.store) / "doc", "store")
        except ValueError as err:
            raise ConfigError(str(err)) from err
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


def store_root(out: Path, config: MineConfig) -> Path:
    """The folder of embedding stores the corpus is looked up in and written to."""
    return Path(config.store) if config.store else out.with_name(out.name + ".embeddings")


def corpus_ids(dataset: BeirDataset, corpus: list[str]) -> list[str]:
    """The BEIR id of each row of ``corpus`` (``mining_set_from_beir``'s distinct texts):
    its first document's, so that a corpus without duplicate texts has the ids and texts
    an evaluation of the same data stores, and finds its entry. Row numbers where the rows
    are not the distinct texts in corpus order."""
    first: dict[str, str] = {}
    for doc_id, doc in dataset.corpus.items():
        first.setdefault(doc.full_text, doc_id)
    if list(first) != corpus:
        return [str(row) for row in range(len(corpus))]
    return list(first.values())


def check_store_space(
    model: BiEncoder, ids: list[str], corpus: list[str], root: Path, key: str
) -> None:
    """ConfigError naming ``key`` when the disk under ``root`` cannot take the corpus
    embeddings still missing there: none when the store has them, the shards not yet
    written when an encode was interrupted. Before any encoding."""
    entry = entry_key(model, ids, corpus, "doc")
    if find(root, entry) is not None:
        return
    written = sum(file.stat().st_size for file in entry_path(root, entry).glob("shard-*.npy"))
    need = len(corpus) * model.dim * np.dtype(np.float32).itemsize - written
    try:
        check_free_space(root, need, key, "the corpus embeddings")
    except OSError as err:
        raise ConfigError(str(err)) from err


def embedded_retriever(
    model: BiEncoder, corpus: list[str], ids: list[str], config: MineConfig, root: Path
) -> DenseRetriever:
    """A DenseRetriever over the corpus embeddings of the store under ``root``, encoded
    only where missing (see the module docstring)."""
    with naming_errors(root, "the corpus embeddings"):
        return DenseRetriever(
            model,
            corpus,
            factory=config.index,
            batch_size=config.model.batch_size,
            seed=config.seed,
            store=root,
            ids=ids,
        )


def run(cfg: DictConfig, out_dir: Path) -> MiningReport:
    """What ``python mine.py`` does with ``cfg``: writes ``cfg.out`` (default
    ``out_dir/negatives.jsonl``)."""
    config = checked(cfg)
    try:
        device = resolve_device(config.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out = Path(config.out) if config.out else out_dir / OUT_NAME
    # One process writes ``out`` and its progress record at a time (the store's entries
    # have locks of their own: the store may be shared).
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
        dataset = load_beir(path, config.data.split)
        source = mining_set_from_beir(dataset)
        ids = corpus_ids(dataset, source.corpus)
        del dataset
    else:
        source = mining_set_from_pairs(load_pairs(path))
        ids = [str(row) for row in range(len(source.corpus))]
    log.info("%s: %d queries, %d texts", path, len(source.queries), len(source.corpus))
    torch.manual_seed(config.seed)
    if config.retriever == "bm25":
        retriever = BM25Retriever(source.corpus)
    else:
        model = BiEncoder.from_pretrained(
            config.model.path,
            max_length=config.model.max_length,
            query_prefix=config.query_prompt,
            doc_prefix=config.corpus_prompt,
            device=device,
        )
        root = store_root(out, config)
        check_store_space(model, ids, source.corpus, root, "store" if config.store else "out")
        retriever = embedded_retriever(model, source.corpus, ids, config, root)
    return mine(
        source,
        retriever,
        options,
        out,
        teacher=teacher,
        resume=config.resume,
        settings=settings,
        query_batch_size=config.query_batch_size,
    )


@hydra.main(config_path=CONFIG_DIR, config_name="mine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


register()
ConfigStore.instance().store(group="schema", name="mine", node=MineConfig)

if __name__ == "__main__":
    main()
