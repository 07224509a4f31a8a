"""Embeddings on disk: encode a corpus once, shard by shard, and search it without holding it.

A store entry is a folder of ``.npy`` shards and a manifest, named after what made it:

    <root>/doc-<digest>/manifest.json   # fingerprints, settings, rows, dim, shards, complete
    <root>/doc-<digest>/ids.json        # the text ids, in row order
    <root>/doc-<digest>/shard-00000.npy # rows [0, shard_rows), float32, raw (not normalised)

``<digest>`` hashes the model's weights, the texts and their ids, and the encode settings
(kind, prefix, max length, pooling, projection, precision, dim), so any change to one of
them names another entry and encodes again, while the same model on the same texts finds
what an earlier evaluation wrote: a dev evaluation's corpus serves the final evaluation of
that checkpoint, and ``eval.py evaluation.store=DIR`` reuses another run's.

Each shard is written aside, pushed to disk and renamed into place (``runtime.files``), so
a shard file that exists is whole: an encode killed at any point resumes at the first
missing shard, and ends with the same bytes as one that never stopped, because each shard
is encoded from its own texts alone. With several processes (``Sharding``), rank ``r``
writes shards ``r, r + world_size, ...``; no rank ever holds the corpus.

Search streams the shards (:func:`search_embeddings`): exact search keeps each query's best
``k`` across shards, and a trained FAISS index learns from a sample and is filled shard by
shard, so memory is one shard, the index and the queries' results, whatever the corpus.

    store = encode_to_store(model, ids, texts, "doc", run_dir / "embeddings")
    scores, rows = search_embeddings(store, query_vectors, k=10)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import itertools
import json
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from biencoder.retrieval.search import build_index, search, train_index
from biencoder.runtime import lock
from biencoder.runtime.files import atomic_file, atomic_write

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder, Kind

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
IDS = "ids.json"
SHARD_ROWS = 8192

# A transform of a shard's raw rows before indexing (truncation, normalisation).
Transform = Callable[[np.ndarray], np.ndarray]


def _no_barrier() -> None:
    pass


def _load_malloc_trim() -> Callable[[], object] | None:
    # glibc only (Linux); elsewhere None, and nothing is trimmed.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    return None if trim is None else lambda: trim(0)


# The encoder's packed batches free tensors of a new size every batch, and glibc's malloc
# keeps much of that memory instead of returning it: without a trim after each shard the
# encoding process grows by a few MB a shard (~400 MB over 100 shards of 8,192 texts with
# a 2-layer encoder: bench/results/store_scale.md), though no object stays alive.
_malloc_trim = _load_malloc_trim()


@dataclass(frozen=True)
class Sharding:
    """Which shards this process encodes: rank ``rank`` of ``world_size``, with ``barrier``
    waiting for every rank (a no-op for one process)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not a rank of {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module``: names, dtypes, shapes and bytes.
    ``torch.compile``'s ``_orig_mod.`` is left out of names, so a compiled model and the same
    weights loaded from a checkpoint share a fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        header = f"{name.replace('_orig_mod.', '')}|{value.dtype}|{tuple(value.shape)}"
        digest.update(header.encode())
        # Viewed as bytes so that every dtype (bfloat16 too) hashes without conversion.
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def texts_fingerprint(ids: Sequence[str], texts: Sequence[str]) -> str:
    """SHA-256 of the ids and texts in order; each string is length-prefixed, so no two
    different lists hash alike by moving a boundary. Iterated, not unpacked into a tuple,
    so that a corpus made lazily (a Sequence that makes its texts when asked) is never
    whole in memory."""
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    digest = hashlib.sha256()
    for value in itertools.chain(ids, texts):
        data = value.encode()
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def encode_settings(model: BiEncoder, kind: Kind) -> dict[str, Any]:
    """What besides the weights and the texts decides ``model.encode(texts, kind)``'s raw
    embeddings."""
    config = model.config
    return {
        "kind": kind,
        "prefix": config.query_prefix if kind == "query" else config.doc_prefix,
        "max_length": config.max_length,
        "pooling": config.pooling,
        "num_layers": config.num_layers,
        "shared": config.shared,
        "dim": model.dim,
        "precision": model.precision,
        "normalized": False,
        "dtype": "float32",
    }


class Embeddings:
    """Rows of embeddings with their ids, read shard by shard: what search and the
    evaluators take, whether the rows are in memory or in a store. ``encoded`` is how many
    rows were encoded to make them (0 when a store had them all)."""

    ids: list[str]
    dim: int
    encoded: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` of each shard, in row order."""
        raise NotImplementedError

    def rows(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows at ``index`` (any order, repeats allowed), as float32 ``[len(index), dim]``."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(
                f"rows outside [0, {len(self)}): {index[(index < 0) | (index >= len(self))][:5]}"
            )
        out = np.empty((len(index), self.dim), dtype=np.float32)
        for start, shard in self.shards():
            inside = (index >= start) & (index < start + len(shard))
            if inside.any():
                out[inside] = shard[index[inside] - start]
        return out

    def load(self) -> np.ndarray:
        """Every row in memory, ``[len(self), dim]``: for the searches that need the whole
        matrix (a funnel, quantisation)."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        for start, shard in self.shards():
            out[start : start + len(shard)] = shard
        return out


class InMemoryEmbeddings(Embeddings):
    """An array of embeddings as one shard."""

    def __init__(self, array: np.ndarray, ids: Sequence[str]) -> None:
        if array.ndim != 2 or len(array) != len(ids):
            raise ValueError(f"embeddings of shape {array.shape} for {len(ids)} ids")
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.ids = list(ids)
        self.dim = array.shape[1]
        self.encoded = len(self.ids)

    def shards(self) -> Iterator[tuple[int, np.ndarray]]:
        yield 0, self.array

    def load(self) -> np.ndarray:
        return self.array


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


class EmbeddingStore(Embeddings):
    """A complete store entry (see the module docstring); shards are memory-mapped, so
    opening one reads only its manifest and ids."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None or not manifest.get("complete"):
            raise ValueError(f"{self.path} is not a complete embedding store (no {MANIFEST})")
        self.manifest = manifest
        self.dim = manifest["dim"]
        self.ids = json.loads((self.path / IDS).read_text(encoding="utf-8"))
        if len(self.ids) != manifest["rows"]:
            raise ValueError(
                f"{self.path / IDS}: {len(self.ids)} ids for {manifest['rows']} rows in {MANIFEST}"
            )

    def shards(self) -> Iterator[tuple[int, np.ndarray]]:
        for shard in self.manifest["shards"]:
            yield shard["start"], np.load(self.path / shard["file"], mmap_mode="r")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        # Written atomically, so only a hand edit or another program gets here.
        raise ValueError(f"{file}: not JSON ({err}); delete {path} to encode again") from err


def entry_key(model: BiEncoder, ids: Sequence[str], texts: Sequence[str], kind: Kind) -> dict:
    """What names a store entry: the fingerprints of the weights and of the texts, and the
    encode settings."""
    return {
        "format": FORMAT,
        "model": weights_fingerprint(model),
        "texts": texts_fingerprint(ids, texts),
        "settings": encode_settings(model, kind),
    }


def entry_path(root: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(root) / f"{key['settings']['kind']}-{digest[:24]}"


def find(root: str | Path, key: dict) -> EmbeddingStore | None:
    """The complete entry of ``key`` under ``root``, or None."""
    path = entry_path(root, key)
    manifest = _read_manifest(path)
    if manifest is None or not manifest.get("complete"):
        return None
    _check_key(path, manifest, key)
    return EmbeddingStore(path)


def entries_of(root: str | Path, model: str) -> list[Path]:
    """The entries under ``root``, complete or not, made by the weights whose fingerprint is
    ``model``."""
    found = []
    for path in sorted(Path(root).glob("*-*")):
        manifest = _read_manifest(path) if path.is_dir() else None
        if manifest is not None and manifest.get("model") == model:
            found.append(path)
    return found


def _check_key(path: Path, manifest: dict, key: dict) -> None:
    found = {name: manifest.get(name) for name in key}
    if found != key:
        raise ValueError(
            f"{path / MANIFEST} was written for other weights, texts or settings than its "
            f"folder's name says ({found} instead of {key}); delete {path} to encode again"
        )


def encode_to_store(
    model: BiEncoder,
    ids: Sequence[str],
    texts: Sequence[str],
    kind: Kind,
    root: str | Path,
    *,
    shard_rows: int = SHARD_ROWS,
    batch_size: int = 64,
    show_progress: bool = True,
    sharding: Sharding | None = None,
    setting: str = "evaluation.store",
) -> EmbeddingStore:
    """The store entry of ``model``'s raw embeddings of ``texts`` under ``root``: found
    when complete, otherwise encoded from its first missing shard (see the module
    docstring). Every rank of ``sharding`` calls this with the same arguments and gets the
    complete entry back; rank ``r`` encodes shards ``r, r + world_size, ...``. ``setting``
    is the configuration key that chose ``root``, which an entry locked by another process
    is refused naming."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows: must be positive, got {shard_rows}")
    if not texts:
        raise ValueError("no texts to encode")
    sharding = sharding or Sharding()
    key = entry_key(model, ids, texts, kind)
    path = entry_path(root, key)
    found = find(root, key)
    count = len(texts)
    starts = list(range(0, count, shard_rows))
    if found is None:
        # _begin deletes the shards of an entry begun with another shard size.
        manifest = _read_manifest(path)
        kept = manifest is None or manifest.get("shard_rows") == shard_rows
        missing = sum(
            min(shard_rows, count - start)
            for i, start in enumerate(starts)
            if not (kept and _shard_ok(path / _shard_name(i), start, shard_rows, count))
        )
    # Every rank has looked before rank 0 writes anything.
    sharding.barrier()
    if found is not None:
        log.info("%d %s embeddings found in %s", len(found), kind, path)
        return found
    with contextlib.ExitStack() as stack:
        if sharding.is_main:
            stack.enter_context(lock.hold(lock.beside(path), setting))
            _begin(path, key, ids, shard_rows)
        # The entry's manifest and ids exist before any rank writes a shard.
        sharding.barrier()
        _encode_shards(
            model,
            texts,
            kind,
            path,
            starts,
            shard_rows,
            batch_size,
            show_progress and sharding.is_main,
            sharding,
        )
        sharding.barrier()
        if sharding.is_main:
            _finish(path, key, count, shard_rows, starts)
    # Complete before any rank opens it.
    sharding.barrier()
    store = EmbeddingStore(path)
    store.encoded = missing
    return store


def _begin(path: Path, key: dict, ids: Sequence[str], shard_rows: int) -> None:
    manifest = _read_manifest(path)
    if manifest is not None:
        _check_key(path, manifest, key)
        if manifest.get("shard_rows") == shard_rows:
            return
        # Shards of another size cover other rows: none of them can be kept.
        log.warning(
            "%s: shards of %s rows, not %d: encoding again",
            path,
            manifest.get("shard_rows"),
            shard_rows,
        )
        for shard in path.glob("shard-*.npy"):
            shard.unlink()
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / IDS) as file:
        # json.dump writes as it encodes: no second copy of the ids as one string.
        json.dump(list(ids), file)
    atomic_write(
        path / MANIFEST,
        json.dumps(
            {**key, "rows": len(ids), "shard_rows": shard_rows, "complete": False}, indent=1
        ),
    )


def _encode_shards(
    model: BiEncoder,
    texts: Sequence[str],
    kind: Kind,
    path: Path,
    starts: list[int],
    shard_rows: int,
    batch_size: int,
    show_progress: bool,
    sharding: Sharding,
) -> None:
    mine = [i for i in range(len(starts)) if i % sharding.world_size == sharding.rank]
    missing = [
        i for i in mine if not _shard_ok(path / _shard_name(i), starts[i], shard_rows, len(texts))
    ]
    if len(missing) < len(mine):
        log.info(
            "%s: %d of %d shards already written, encoding the rest",
            path,
            len(mine) - len(missing),
            len(mine),
        )
    for number, i in enumerate(missing, 1):
        chunk = list(texts[starts[i] : starts[i] + shard_rows])
        embeddings = model.encode(
            chunk,
            kind=kind,
            batch_size=batch_size,
            normalize=False,
            show_progress=show_progress and len(chunk) > 10 * batch_size,
        ).numpy()
        with atomic_file(path / _shard_name(i), "wb") as file:
            np.save(file, embeddings)
        if show_progress:
            log.info(
                "%s: shard %d of %d written (%d rows)", path.name, number, len(missing), len(chunk)
            )
        del chunk, embeddings
        if _malloc_trim is not None:
            _malloc_trim()


def _shard_ok(file: Path, start: int, shard_rows: int, count: int) -> bool:
    if not file.exists():
        return False
    try:
        rows = np.load(file, mmap_mode="r").shape[0]
    except (ValueError, OSError):
        return False
    return rows == min(shard_rows, count - start)


def _finish(path: Path, key: dict, count: int, shard_rows: int, starts: list[int]) -> None:
    shards = []
    dim = None
    for i, start in enumerate(starts):
        file = path / _shard_name(i)
        array = np.load(file, mmap_mode="r")
        if array.shape[0] != min(shard_rows, count - start) or dim not in (None, array.shape[1]):
            raise ValueError(f"{file}: shape {array.shape} does not fit rows {start}+ of {count}")
        dim = array.shape[1]
        shards.append({"file": file.name, "start": start, "rows": array.shape[0]})
    manifest = {
        **key,
        "rows": count,
        "shard_rows": shard_rows,
        "dim": dim,
        "shards": shards,
        "complete": True,
    }
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))


def merge_top_k(
    best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two ``(scores, ids)`` results per query, higher scores first; on a
    tie the one from ``best`` (the earlier rows) first."""
    scores = np.concatenate([best[0], new[0]], axis=1)
    ids = np.concatenate([best[1], new[1]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def search_embeddings(
    embeddings: Embeddings,
    queries: np.ndarray,
    k: int,
    *,
    factory: str = "Flat",
    metric: str = "ip",
    use_gpu: bool | None = None,
    train_size: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    transform: Transform | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``embeddings`` for each query, streaming its shards: ``(scores,
    ids)`` as :func:`retrieval.search.search` returns them, with ids the rows of
    ``embeddings``. ``transform`` maps a shard's rows before indexing (and the training
    sample's), e.g. Matryoshka truncation and normalisation; ``queries`` are taken as given.

    Exact search (``factory="Flat"``) indexes one shard at a time and keeps each query's
    best ``k``; any other factory trains on ``train_size`` rows drawn as ``build_index``
    draws them (every row when None) and adds the shards one by one, so an in-memory
    ``build_index`` + ``search`` of the same rows gives the same index and results.
    """
    transform = transform or (lambda x: x)
    k = min(k, len(embeddings))
    if factory == "Flat":
        best = (np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
        for start, shard in embeddings.shards():
            index = build_index(
                transform(np.asarray(shard)), factory, metric=metric, use_gpu=use_gpu
            )
            scores, ids = search(index, queries, k)
            best = merge_top_k(best, (scores, ids + start), k)
        return best
    rows = None
    if train_size is not None and train_size < len(embeddings):
        rows = np.sort(
            np.random.default_rng(seed).choice(len(embeddings), size=train_size, replace=False)
        )
    sample = embeddings.load() if rows is None else embeddings.rows(rows)
    index = train_index(transform(sample), factory, metric=metric, use_gpu=use_gpu)
    del sample
    for _, shard in embeddings.shards():
        index.add(np.ascontiguousarray(transform(np.asarray(shard)), dtype=np.float32))
    return search(index, queries, k, nprobe=nprobe, ef_search=ef_search)
