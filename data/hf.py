"""Training examples from a 🤗 ``datasets`` dataset, read lazily from its memory-mapped table.

    train_data=hf train_data.path=DIR                  # a save_to_disk folder
    train_data=hf train_data.path=DIR train_data.split=train   # one split of a DatasetDict
    train_data=hf train_data.path='data/*.parquet'     # parquet, arrow, JSONL or CSV files
    train_data=hf train_data.path=qa.jsonl 'train_data.columns={anchor: question, positive: answer}'

Columns follow sentence-transformers' convention. Roles are ``anchor``, ``positive``,
``negative`` or ``negative_1`` .. ``negative_k`` (hard negatives), and ``score`` or ``label``
(a number per pair). By default a column plays the role of its own name; a dataset without
an ``anchor`` column is read by position, as sentence-transformers does: the ``score`` or
``label`` column aside, the first column is the anchor, the second the positive and any
others negatives. ``columns`` maps roles to column names instead, and then only the columns
it names are read. The roles give the example type:

    anchor, positive                      -> Pair
    anchor, positive, negative(s)         -> Triplet
    anchor, positive, score (or label)    -> ScoredPair (text1, text2, score)

Loading memory-maps the Arrow data (a parquet or JSONL file is converted once into the
``datasets`` cache, ``HF_DATASETS_CACHE``) and checks each column with Arrow kernels: no row
becomes a Python object until a batch asks for it. Errors name the file (or the folder of a
saved dataset), the row (counted from 1) and the column; a file without rows is an error.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import itertools
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DataError
from .fields import describe
from .sts import ScoredPair
from .training import Example, Pair, Triplet
from .training_sets import TrainingSet

if TYPE_CHECKING:
    import datasets

    from biencoder.model.biencoder import BiEncoder

log = logging.getLogger(__name__)

# datasets' packaged builders, by file name ending.
FILE_FORMATS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv": "csv",
}
ROLES = ("anchor", "positive", "negative", "score", "label")
_NUMBERED_NEGATIVE = re.compile(r"negative_([1-9][0-9]*)")
# A JSON number, as the JSON text of a value that datasets stores as JSON.
_JSON_NUMBER = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$"
# Rows converted to Python objects at a time when iterating over a whole set.
_ITER_ROWS = 1024


@dataclass(frozen=True)
class Roles:
    """Which column plays each role; ``label`` is the score column, if any."""

    anchor: str
    positive: str
    negatives: tuple[str, ...] = ()
    label: str | None = None

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.anchor, self.positive, *self.negatives)

    @property
    def example_type(self) -> type:
        if self.label is not None:
            return ScoredPair
        return Triplet if self.negatives else Pair

    def describe(self) -> str:
        parts = [f"anchor={self.anchor}", f"positive={self.positive}"]
        if self.negatives:
            parts.append(f"negatives={','.join(self.negatives)}")
        if self.label is not None:
            parts.append(f"score={self.label}")
        return " ".join(parts)


def _check_role_names(columns: Mapping[str, str]) -> None:
    for role, column in columns.items():
        if role not in ROLES and not _NUMBERED_NEGATIVE.fullmatch(role):
            raise ValueError(
                f"columns: unknown role {role!r}; roles are {', '.join(ROLES)} and "
                "negative_1, negative_2, ..."
            )
        if not isinstance(column, str) or not column:
            raise ValueError(f"columns: {role} must name a column, got {column!r}")
    for role in ("anchor", "positive"):
        if role not in columns:
            raise ValueError(f"columns: needs {role} (the mapping has {', '.join(columns)})")


def _numbered(names: Sequence[str]) -> list[str]:
    """``negative_k`` names ordered by k."""
    found = [(int(m.group(1)), n) for n in names if (m := _NUMBERED_NEGATIVE.fullmatch(n))]
    return [name for _, name in sorted(found)]


def resolve_roles(
    names: Sequence[str], columns: Mapping[str, str] | None, where: str
) -> tuple[Roles, str]:
    """The roles of a dataset with column ``names``, and how they were chosen (for the log):
    from ``columns`` (role -> column), else by name, else by position. Raises DataError
    naming ``where`` and the columns there are when a column is missing."""

    def need(column: str) -> str:
        if column not in names:
            raise DataError(f"no such column (columns: {', '.join(names)})", where, field=column)
        return column

    def one_label(mapping: Mapping[str, str]) -> str | None:
        if "score" in mapping and "label" in mapping:
            raise DataError(
                "give a score or a label column, not both", where, field=mapping["label"]
            )
        label = mapping.get("score", mapping.get("label"))
        return None if label is None else need(label)

    def negatives_of(mapping: Mapping[str, str]) -> tuple[str, ...]:
        numbered = _numbered(list(mapping))
        if "negative" in mapping and numbered:
            raise DataError(
                f"give negative or {', '.join(numbered)}, not both", where, field="negative"
            )
        roles = ["negative"] if "negative" in mapping else numbered
        return tuple(need(mapping[role]) for role in roles)

    if columns:
        mapping = dict(columns)
        how = "as train_data.columns maps them"
    elif "anchor" in names:
        mapping = {n: n for n in names if n in ROLES or _NUMBERED_NEGATIVE.fullmatch(n)}
        mapping.setdefault("positive", "positive")
        how = "by name"
    else:
        labels = [n for n in names if n in ("score", "label")]
        texts = [n for n in names if n not in ("score", "label")]
        if len(texts) < 2:
            raise DataError(
                f"needs two text columns, an anchor and a positive (columns: "
                f"{', '.join(names)}); name them or set train_data.columns",
                where,
            )
        mapping = {"anchor": texts[0], "positive": texts[1]}
        mapping |= {f"negative_{k}": name for k, name in enumerate(texts[2:], start=1)}
        mapping |= {label: label for label in labels}
        how = "by position (no anchor column; set train_data.columns to choose)"
    label = one_label(mapping)
    negatives = negatives_of(mapping)
    if label is not None and negatives:
        raise DataError(
            f"a score column ({label}) with negatives ({', '.join(negatives)}): scored "
            "examples are pairs",
            where,
            field=label,
        )
    return Roles(need(mapping["anchor"]), need(mapping["positive"]), negatives, label), how


@dataclass(frozen=True)
class _Source:
    """Rows ``start`` onwards of the concatenated table came from ``path``."""

    path: str
    start: int


def _first(mask: pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array, None if there is none."""
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


class HfExamples(Sequence[Example]):
    """The examples of a memory-mapped table, one row each, built when indexed.

    Holds the Arrow table (its buffers are the mapped files) and converts a row to a
    :class:`Pair`, :class:`Triplet` or :class:`ScoredPair` on ``examples[i]``; iterating
    converts a block of rows at a time. ``dataset`` is the ``datasets.Dataset`` read.
    """

    def __init__(self, dataset: datasets.Dataset, roles: Roles, sources: Sequence[_Source]) -> None:
        self.dataset = dataset
        self.roles = roles
        self._sources = list(sources)
        names = [*roles.texts, *([roles.label] if roles.label else [])]
        self._table = dataset.data.table.select(names)
        self._columns = [self._table.column(name) for name in names]
        # Chunk starts per column: ChunkedArray indexing walks the chunks one by one, which a
        # dataset written in thousands of record batches would pay on every row.
        self._starts = [
            list(itertools.accumulate((len(chunk) for chunk in column.chunks[:-1]), initial=0))
            for column in self._columns
        ]

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        values = []
        for column, starts in zip(self._columns, self._starts, strict=True):
            chunk = bisect.bisect_right(starts, index) - 1
            values.append(column.chunk(chunk)[index - starts[chunk]].as_py())
        return self._example(index, values)

    def __iter__(self) -> Iterator[Example]:
        index = 0
        for batch in self._table.to_batches(max_chunksize=_ITER_ROWS):
            for values in zip(*(column.to_pylist() for column in batch.columns), strict=True):
                yield self._example(index, values)
                index += 1

    def source(self, index: int) -> tuple[str, int]:
        """The file (or saved folder) of row ``index`` and its row there, from 1."""
        starts = [s.start for s in self._sources]
        found = self._sources[bisect.bisect_right(starts, index) - 1]
        return found.path, index - found.start + 1

    def _example(self, index: int, values: Sequence) -> Example:
        roles = self.roles
        if roles.label is not None:
            path, row = self.source(index)
            return ScoredPair(values[0], values[1], float(values[2]), source=f"{path}:{row}")
        if roles.negatives:
            path, row = self.source(index)
            return Triplet(values[0], values[1], tuple(values[2:]), source=f"{path}:{row}")
        return Pair(values[0], values[1])

    def check(self) -> None:
        """Raise DataError naming file:row:column for the first null, non-string or blank
        text and the first null, non-numeric or non-finite score, with Arrow kernels."""
        roles = self.roles
        for name in roles.texts:
            column = self._table.column(name)
            text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            self._check_type(column, name, text, "a string", '^"')
            self._check_nulls(column, name)
            blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
            self._fail_at(_first(blank), name, "empty text")
        if roles.label is not None:
            column = self._table.column(roles.label)
            numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            self._check_type(column, roles.label, numeric, "a number", _JSON_NUMBER)
            self._check_nulls(column, roles.label)
            if pa.types.is_floating(column.type):
                self._fail_at(
                    _first(pc.invert(pc.is_finite(column))), roles.label, "expected a finite number"
                )

    def _check_type(
        self, column: pa.ChunkedArray, name: str, ok: bool, expected: str, json_pattern: str
    ) -> None:
        """``ok``: the column has the expected type. A column whose rows mix types (a JSON
        file's) is stored as each row's JSON text: the first row that does not match
        ``json_pattern`` is named with its value; any other type, with the column's."""
        if ok:
            return
        if getattr(column.type, "extension_name", None) == "arrow.json":
            texts = pa.chunked_array([chunk.storage for chunk in column.chunks])
            index = _first(pc.invert(pc.match_substring_regex(texts, json_pattern)))
            if index is not None:
                value = describe(json.loads(texts[index].as_py()))
                self._fail_at(index, name, f"expected {expected}, got {value}")
        first = _first(pc.is_valid(column))
        self._fail_at(
            0 if first is None else first, name, f"expected {expected}, got {column.type}"
        )

    def _check_nulls(self, column: pa.ChunkedArray, name: str) -> None:
        if column.null_count:
            self._fail_at(_first(pc.is_null(column)), name, "expected a value, got null")

    def _fail_at(self, index: int | None, name: str, reason: str) -> None:
        if index is not None:
            path, row = self.source(index)
            raise DataError(reason, path, row, name)


@dataclass
class HfTrainingSet:
    """A 🤗 ``datasets`` dataset as training examples (see the module docstring).

    ``path`` is a ``save_to_disk`` folder, or a parquet, arrow, JSONL (``.jsonl``, ``.json``,
    ``.gz``) or CSV file, or a glob of them (read in sorted order, one table); ``split``
    picks a split of a saved DatasetDict (null: its only split); ``columns`` maps roles
    (``anchor``, ``positive``, ``negative`` or ``negative_1``.., ``score`` or ``label``) to
    column names, null to take sentence-transformers' names, then positions. No dev set.
    """

    path: str
    split: str | None = None
    columns: Mapping[str, str] | None = None
    # Opened once: example_type() reads the columns before training, load() the same table.
    _examples: HfExamples | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.columns:
            self.columns = dict(self.columns)
            _check_role_names(self.columns)

    def example_type(self) -> type:
        """Pair, Triplet or ScoredPair, from the columns (reads the dataset's schema)."""
        return self._open().roles.example_type

    def load(self, model: BiEncoder | None = None, negatives: None = None) -> TrainingSet:
        """The examples, lazily; every column is checked first (DataError: file:row:column)."""
        examples = self._open()
        examples.check()
        return TrainingSet(examples)

    def _open(self) -> HfExamples:
        if self._examples is None:
            dataset, sources = self._read()
            where = sources[0].path if len(sources) == 1 else self.path
            roles, how = resolve_roles(dataset.column_names, self.columns, where)
            self._examples = HfExamples(dataset, roles, sources)
            log.info(
                "%s: %d %s examples; columns %s, %s",
                where,
                dataset.num_rows,
                roles.example_type.__name__,
                roles.describe(),
                how,
            )
        return self._examples

    def _read(self) -> tuple[datasets.Dataset, list[_Source]]:
        # Imported here: it takes a second or more, which no other reader should pay.
        import datasets

        folder = Path(self.path)
        if folder.is_dir():
            return self._read_saved(folder)
        if self.split is not None:
            raise ValueError(
                f"split: only a save_to_disk DatasetDict folder has splits; {self.path} is "
                "not a folder"
            )
        files = sorted(glob.glob(self.path)) if glob.has_magic(self.path) else [self.path]
        if not files:
            raise FileNotFoundError(f"train_data.path: no file matches {self.path}")
        parts = [_read_file(file) for file in files]
        first = parts[0].features
        for file, part in zip(files, parts, strict=True):
            if part.features != first:
                raise DataError(
                    f"its columns ({_schema(part.features)}) differ from those of {files[0]} "
                    f"({_schema(first)}); files read together need the same columns",
                    file,
                )
        sources, start = [], 0
        for file, part in zip(files, parts, strict=True):
            sources.append(_Source(file, start))
            start += part.num_rows
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return dataset, sources

    def _read_saved(self, folder: Path) -> tuple[datasets.Dataset, list[_Source]]:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(folder))
        except (OSError, IndexError, ValueError, pa.ArrowException) as err:
            # datasets cannot load a saved Dataset of no rows (it has no data file to map),
            # nor a DatasetDict holding one.
            for state in sorted([folder / "state.json", *folder.glob("*/state.json")]):
                if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                    raise DataError("no rows", state.parent) from err
            raise DataError(f"cannot be read as a saved dataset: {err}", folder) from err
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            split = self.split or (splits[0] if len(splits) == 1 else None)
            if split not in loaded:
                wanted = f"has no split {split!r}" if self.split else "holds several splits"
                raise ValueError(f"split: {folder} {wanted}; choose one of {', '.join(splits)}")
            loaded, where = loaded[split], folder / split
        elif self.split is not None:
            raise ValueError(f"split: {folder} holds one Dataset, not a DatasetDict of splits")
        else:
            where = folder
        if loaded.num_rows == 0:
            raise DataError("no rows", where)
        return loaded, [_Source(str(where), 0)]


def _read_file(file: str) -> datasets.Dataset:
    import datasets

    if not Path(file).is_file():
        raise FileNotFoundError(f"train_data.path: {file} does not exist")
    builder = next((b for end, b in FILE_FORMATS.items() if file.endswith(end)), None)
    if builder is None:
        raise ValueError(
            f"path: {file} is not a saved dataset folder, nor a file ending in "
            f"{', '.join(FILE_FORMATS)}"
        )
    _check_has_rows(file, builder)
    try:
        dataset = datasets.load_dataset(builder, data_files=[file], split="train")
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as err:
        # datasets' words for a file it read no row from; the checks above catch the usual
        # empty files first, with a plainer message.
        if "corresponds to no data" in str(err):
            raise DataError("no rows", file) from err
        cause = err.__cause__ or err
        raise DataError(f"cannot be read as {builder}: {cause}", file) from err
    if dataset.num_rows == 0:
        raise DataError("no rows", file)
    return dataset


def _check_has_rows(file: str, builder: str) -> None:
    """Raise DataError for a file without a row, which datasets reports as a failure of its
    own (an empty parquet or CSV file) or as a dataset of no split."""
    if builder == "parquet":
        try:
            rows = pq.read_metadata(file).num_rows
        except pa.ArrowInvalid as err:
            raise DataError(f"not a parquet file: {err}", file) from err
        if rows == 0:
            raise DataError("no rows", file)
    elif builder in ("csv", "json"):
        lines = _nonblank_lines(file, 2)
        if lines == 0:
            raise DataError("no rows: the file is empty", file)
        if builder == "csv" and lines == 1:
            raise DataError("no rows: the file holds a header line only", file)


def _nonblank_lines(file: str, enough: int) -> int:
    """The non-blank lines of a text file (plain or ``.gz``), counted up to ``enough``."""
    count = 0
    with gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb") as f:
        for line in f:
            count += bool(line.strip())
            if count >= enough:
                break
    return count


def _schema(features: datasets.Features) -> str:
    return ", ".join(f"{name}: {feature}" for name, feature in features.items())
