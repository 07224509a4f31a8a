"""Every knob does what it says.

The key list is generated from the configs themselves: every leaf key under ``trainer``,
``train_data``, ``eval_data``, ``loss``, ``optim``, ``sched``, ``model`` and ``evaluation``
in the default composition, plus the keys of every option of those groups whose schema
differs from the default's (``loss=triplet`` has a ``margin``, ``train_data=jsonl`` a
``format``). Each key must have an entry in ``PROBES``, or the suite fails: adding a key
means adding the proof that it is wired.

A :class:`Run` probe trains twice in-process through ``train.train`` (tiny model, tiny data),
once with a base configuration and once with the key changed, and asserts that one named
observation differs: a logged series, the checkpoints, the final metrics, the hard
negatives, or what the encoder, the loss or FAISS were handed (recorded by spies around
them). A probe observes the end of the chain, so a knob that is validated but never passed
on (``trainer.max_length`` before this test existed) fails here. A :class:`Proven` entry
names a test elsewhere that already proves the key, for the keys whose effect takes more
than two short runs to show (resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from configs import compose_train, tiny_overrides
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from test_synthesize import SYNTH_PROBES

from biencoder import train as train_cli
from biencoder.losses import infonce as infonce_module
from biencoder.model import bert as bert_module
from biencoder.model.biencoder import BiEncoder, Tower
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import save_random_bert
from biencoder.runtime.device import bf16_supported

NODES = ("trainer", "train_data", "eval_data", "loss", "optim", "sched", "model", "evaluation")
# Group options with a schema of their own: their keys are other parameters.
OPTIONS = {
    "loss": [
        "triplet",
        "contrastive",
        "cosent",
        "cosine",
        "matryoshka",
        "margin_mse",
        "listwise_kl",
    ],
    "train_data": ["beir", "sts", "jsonl", "hf", "multi", "synthetic"],
    "eval_data": ["sts"],
    "trainer": ["gpu"],
    "sched": ["cosine", "constant"],
    "evaluation/index": ["hnsw", "ivf_pq"],
}
# train_data=synthetic's synthesis node: conf/synthesize.yaml's keys but task_name, out
# and resume (which SYNTH_PROBES does not list).
SYNTHESIS_KEYS = sorted(set(SYNTH_PROBES) - {"task_name", "out"})
# Wall-clock values differ between any two runs.
TIMINGS = ("_s", "per_s", "time")


@dataclass(frozen=True)
class Run:
    """Train with ``base`` overrides, then with ``base + change``; ``observe`` must differ.

    Overrides may name the fixture folders ``{beir2}``, ``{sts2}``, ``{model2}``,
    ``{pairs}``, ``{pairs2}``, ``{scored}``, ``{identical_ids}``, ``{unknown_ids}``,
    ``{hf}``, ``{hf2}``, ``{hf_splits}`` and ``{store}``."""

    change: tuple[str, ...]
    observe: str
    base: tuple[str, ...] = ()


@dataclass(frozen=True)
class Proven:
    """The key's effect is proven by the test ``where`` (``module::function``)."""

    where: str


# Bases: short runs that leave out whatever the probe does not need.
TRAIN = ("trainer.eval=false", "train_data.dev_queries=0")  # no dev, no final evaluation
DEV = ("trainer.eval=false",)  # dev evaluation at the end (80 dev queries)
FINAL = ("train_data.dev_queries=0",)  # final evaluation on the tiny test split
STS = ("experiment=sts", "trainer.eval=false")
STS_FINAL = ("experiment=sts", "train_data.dev_split=null")
IVF = (*FINAL, "evaluation.index.factory='IVF4,Flat'")  # an index with lists and training
JSONL = ("trainer.eval=false", "train_data=jsonl", "train_data.path={pairs}")
HARDNESS = ("loss.hardness_mode=all_negatives", "loss.hardness_strength=5.0")
HF = ("trainer.eval=false", "train_data=hf", "train_data.path={hf}")
# Triplets with teacher scores, for the distillation losses.
SCORED_JSONL = (*JSONL[:2], "train_data.path={scored}", "train_data.format=triplets")


def loss_probes(option: str, base: tuple[str, ...], width: int = 32) -> dict[str, Run]:
    """Matryoshka keys exist in every loss: one truncation must change the loss, and the
    weights must change it once there are truncations to weigh."""
    base = (*base, f"loss={option}")
    half = width // 2
    return {
        "loss.matryoshka_dims": Run((f"loss.matryoshka_dims=[{half}]",), "loss", base),
        "loss.matryoshka_weights": Run(
            ("loss.matryoshka_weights=[1.0,3.0]",),
            "loss",
            (*base, f"loss.matryoshka_dims=[{width},{half}]"),
        ),
    }


def option_probes(option: str, probes: dict[str, Run | Proven]) -> dict[str, Run | Proven]:
    return {f"{option} {key}": probe for key, probe in probes.items()}


CPU_BF16 = bf16_supported(torch.device("cpu"))

PROBES: dict[str, Run | Proven] = {
    # ---------------------------------------------------------------------- trainer
    "trainer.max_steps": Run(("trainer.max_steps=3",), "steps", TRAIN),
    "trainer.epochs": Run(("trainer.epochs=2",), "steps", (*DEV, "trainer.max_steps=null")),
    "trainer.batch_size": Run(("trainer.batch_size=6",), "batch_rows", TRAIN),
    "trainer.max_length": Run(("trainer.max_length=8",), "seq_len_max", TRAIN),
    "trainer.cache_chunk_size": Run(("trainer.cache_chunk_size=2",), "train_forwards", TRAIN),
    "trainer.cache_chunk_tokens": Run(("trainer.cache_chunk_tokens=48",), "batch_rows", TRAIN),
    "trainer.precision": Run(("trainer.precision=bf16",), "autocast", TRAIN),
    "trainer.tf32": Run(("trainer.tf32=true",), "matmul_precision", TRAIN),
    "trainer.prefetch": Run(("trainer.prefetch=false",), "tokenize_threads", TRAIN),
    "trainer.compile": Run(("trainer.compile=true",), "compiled", TRAIN),
    "trainer.grad_clip": Run(("trainer.grad_clip=1e-4",), "weights", TRAIN),
    "trainer.gradient_checkpointing": Run(
        ("trainer.gradient_checkpointing=true",), "checkpointed_layers", TRAIN
    ),
    "trainer.hidden_dropout": Run(("trainer.hidden_dropout=0.5",), "loss", TRAIN),
    "trainer.attention_dropout": Run(("trainer.attention_dropout=0.5",), "loss", TRAIN),
    "trainer.log_every": Run(("trainer.log_every=2",), "steps", TRAIN),
    "trainer.eval_every": Run(("trainer.eval_every=1",), "dev_steps", DEV),
    "trainer.save_every": Run(("trainer.save_every=2",), "checkpoints", TRAIN),
    "trainer.keep_checkpoints": Run(
        ("trainer.keep_checkpoints=1",), "checkpoints", (*TRAIN, "trainer.max_steps=3")
    ),
    "trainer.resume": Proven("test_train::test_resume_after_sigkill_equals_uninterrupted_run"),
    "trainer.eval": Run(("trainer.eval=true",), "metrics", TRAIN),
    "trainer.deterministic": Run(("trainer.deterministic=true",), "deterministic", TRAIN),
    # Both act on runs these probes do not make: a NaN step, a folder that holds a run.
    "trainer.on_nonfinite": Proven("test_train::test_nonfinite_steps_are_skipped_and_counted"),
    "trainer.overwrite": Proven(
        "test_train::test_a_second_run_into_a_run_folder_is_refused_unless_it_resumes_or_overwrites"
    ),
    # ----------------------------------------------------------- train_data (BEIR)
    "train_data.path": Run(("train_data.path={beir2}",), "batch_texts", TRAIN),
    "train_data.split": Run(("train_data.split=test",), "batch_texts", TRAIN),
    "train_data.dev_queries": Run(("train_data.dev_queries=40",), "eval_sizes", DEV),
    "train_data.dev_corpus_size": Run(("train_data.dev_corpus_size=100",), "eval_sizes", DEV),
    "train_data.hard_negatives": Run(("train_data.hard_negatives=2",), "negatives", TRAIN),
    "train_data.mining": Run(("train_data.mining=dense",), "negatives", TRAIN),
    "train_data.mining_depth": Run(("train_data.mining_depth=3",), "negatives", TRAIN),
    "train_data.seed": Run(("train_data.seed=1",), "negatives", TRAIN),
    # ---------------------------------------------------------- eval_data (BEIR)
    "eval_data.path": Run(("eval_data.path={beir2}",), "eval_sizes", FINAL),
    "eval_data.split": Run(("eval_data.split=train",), "eval_sizes", FINAL),
    "eval_data.strict": Run(
        ("eval_data.strict=true",), "error", (*FINAL, "eval_data.path={unknown_ids}")
    ),
    "eval_data.corpus_size": Run(("eval_data.corpus_size=30",), "eval_sizes", FINAL),
    "eval_data.seed": Run(
        ("eval_data.seed=1",), "eval_corpus", (*FINAL, "eval_data.corpus_size=30")
    ),
    # ------------------------------------------------------------ loss (InfoNCE)
    "loss.temperature": Run(("loss.temperature=0.5",), "loss", TRAIN),
    "loss.learnable_temperature": Run(
        ("loss.learnable_temperature=true",), "temperature", (*TRAIN, "trainer.max_steps=3")
    ),
    "loss.symmetric": Run(("loss.symmetric=true",), "loss", TRAIN),
    "loss.impl": Run(("loss.impl=naive",), "infonce_impl", TRAIN),
    "loss.directions": Run(("loss.directions=[query_to_doc,query_to_query]",), "loss", TRAIN),
    "loss.partition_mode": Run(
        ("loss.partition_mode=per_direction",),
        "loss",
        (*TRAIN, "loss.directions=[query_to_doc,doc_to_query]"),
    ),
    "loss.hardness_mode": Run(("loss.hardness_mode=hard_negatives",), "loss", (*TRAIN, *HARDNESS)),
    "loss.hardness_strength": Run(("loss.hardness_strength=1.0",), "loss", (*TRAIN, *HARDNESS)),
    "loss.guide": Run(("loss.guide={model2}",), "loss", TRAIN),
    "loss.guide_margin": Run(("loss.guide_margin=0.1",), "loss", (*TRAIN, "loss.guide={model2}")),
    "loss.guide_margin_strategy": Run(
        ("loss.guide_margin_strategy=relative",),
        "loss",
        # The real MiniLM as the guide: a random model scores every pair near the same
        # cosine, where an absolute and a relative margin drop the same candidates.
        (*TRAIN, "loss.guide={minilm}", "loss.guide_margin=0.3"),
    ),
    "loss.matryoshka_dims": Run(("loss.matryoshka_dims=[16]",), "loss", TRAIN),
    "loss.matryoshka_weights": Run(
        ("loss.matryoshka_weights=[1.0,3.0]",), "loss", (*TRAIN, "loss.matryoshka_dims=[32,16]")
    ),
    # ------------------------------------------------------------- optim, sched
    "optim.lr": Run(("optim.lr=1e-3",), "weights", TRAIN),
    "optim.betas": Run(("optim.betas=[0.5,0.9]",), "weights", TRAIN),
    "optim.eps": Run(("optim.eps=1e-2",), "weights", TRAIN),
    "optim.weight_decay": Run(("optim.weight_decay=0.5",), "weights", TRAIN),
    # null means fused on CUDA only; on this CPU, true is the observable change.
    "optim.fused": Run(("optim.fused=true",), "optimizer_fused", TRAIN),
    "sched.warmup_ratio": Run(("sched.warmup_ratio=0.5",), "lr", TRAIN),
    "sched.decay": Run(("sched.decay=constant",), "lr", TRAIN),
    # -------------------------------------------------------------------- model
    "model.path": Run(("model.path={model2}",), "weights", TRAIN),
    "model.pooling": Run(("model.pooling=cls",), "loss", TRAIN),
    "model.normalize": Run(("model.normalize=false",), "loss", TRAIN),
    "model.projection_dim": Run(("model.projection_dim=16",), "weight_shapes", TRAIN),
    "model.max_length": Run(("model.max_length=8",), "eval_seq_len_max", FINAL),
    "model.attention": Run(("model.attention=nested",), "attention", TRAIN),
    "model.query_prefix": Run(("model.query_prefix='query: '",), "tokens", TRAIN),
    # Abstracts fill the 32 tokens either way: the prefix shows in the ids, not their count.
    "model.doc_prefix": Run(("model.doc_prefix='passage: '",), "batch_texts", TRAIN),
    "model.shared": Run(("model.shared=false",), "weight_shapes", TRAIN),
    "model.num_layers": Run(("model.num_layers=1",), "loss", TRAIN),
    # The probes' model is a BERT, which refuses it naming the file; tests/test_llama.py
    # shows what it changes in a decoder.
    "model.bidirectional": Run(("model.bidirectional=true",), "error", TRAIN),
    # Refused the same way; test_llama.py's append_eos tests show what it does to a decoder.
    "model.append_eos": Run(("model.append_eos=true",), "error", TRAIN),
    "model.suffix": Run(("model.suffix=x",), "error", TRAIN),
    # The checkpoint is the merged model: adapters of another rank, scale, dropout or
    # placement leave other weights after the same two steps.
    "model.lora.r": Run(("model.lora.r=4",), "weights", TRAIN),
    "model.lora.alpha": Run(("model.lora.alpha=64",), "weights", (*TRAIN, "model.lora.r=4")),
    "model.lora.dropout": Run(("model.lora.dropout=0.5",), "weights", (*TRAIN, "model.lora.r=4")),
    "model.lora.target_modules": Run(
        ("model.lora.target_modules=[query]",), "weights", (*TRAIN, "model.lora.r=4")
    ),
    # --------------------------------------------------------------- evaluation
    "evaluation.batch_size": Run(("evaluation.batch_size=5",), "eval_forwards", FINAL),
    "evaluation.ks": Run(("evaluation.ks=[1,5]",), "metric_keys", FINAL),
    # Without bf16 units (AVX-512-BF16 or AMX) the encoder refuses bf16 with an error naming
    # the precision, which is then what the knob changes.
    "evaluation.precision": Run(
        ("evaluation.precision=bf16",), "eval_autocast" if CPU_BF16 else "error", FINAL
    ),
    "evaluation.matryoshka_dims": Run(("evaluation.matryoshka_dims=[16]",), "metric_keys", FINAL),
    "evaluation.ignore_identical_ids": Run(
        ("evaluation.ignore_identical_ids=true",),
        "run",
        (*FINAL, "eval_data.path={identical_ids}"),
    ),
    "evaluation.index.factory": Run(("evaluation.index.factory=HNSW16",), "index", FINAL),
    "evaluation.index.metric": Run(("evaluation.index.metric=l2",), "index", FINAL),
    "evaluation.index.use_gpu": Run(("evaluation.index.use_gpu=false",), "index", FINAL),
    "evaluation.index.nprobe": Run(("evaluation.index.nprobe=4",), "index", IVF),
    "evaluation.index.ef_search": Run(
        ("evaluation.index.ef_search=16",), "index", (*FINAL, "evaluation/index=hnsw")
    ),
    "evaluation.index.train_size": Run(("evaluation.index.train_size=100",), "index", IVF),
    # Elsewhere, the run folder keeps no embeddings; smaller shards, more of them.
    "evaluation.store": Run(("evaluation.store={store}",), "stores", FINAL),
    "evaluation.shard_rows": Run(("evaluation.shard_rows=7",), "stores", FINAL),
    # ------------------------------------------------ options with their own keys
    **option_probes(
        "loss=triplet",
        {
            "loss.margin": Run(("loss.margin=0.1",), "loss", (*TRAIN, "loss=triplet")),
            "loss.distance": Run(("loss.distance=euclidean",), "loss", (*TRAIN, "loss=triplet")),
            **loss_probes("triplet", TRAIN),
        },
    ),
    **option_probes(
        "loss=contrastive",
        {
            "loss.margin": Run(("loss.margin=0.9",), "loss", (*STS, "loss=contrastive")),
            "loss.distance": Run(("loss.distance=euclidean",), "loss", (*STS, "loss=contrastive")),
            "loss.threshold": Run(("loss.threshold=2.0",), "loss", (*STS, "loss=contrastive")),
            # Its one effect: scores beyond the declared scale are refused (STS-B's reach 5).
            "loss.score_scale": Run(
                ("loss.score_scale=3.0",), "error", (*STS, "loss=contrastive", "loss.threshold=2")
            ),
            **loss_probes("contrastive", STS),
        },
    ),
    **option_probes(
        "loss=cosent",
        {
            "loss.scale": Run(("loss.scale=5.0",), "loss", (*STS, "loss=cosent")),
            **loss_probes("cosent", STS),
        },
    ),
    **option_probes(
        "loss=cosine",
        {
            "loss.score_scale": Run(("loss.score_scale=10.0",), "loss", (*STS, "loss=cosine")),
            **loss_probes("cosine", STS),
        },
    ),
    **option_probes("loss=margin_mse", loss_probes("margin_mse", SCORED_JSONL)),
    **option_probes(
        "loss=listwise_kl",
        {
            "loss.student_temperature": Run(
                ("loss.student_temperature=0.5",), "loss", (*SCORED_JSONL, "loss=listwise_kl")
            ),
            "loss.teacher_temperature": Run(
                ("loss.teacher_temperature=0.1",), "loss", (*SCORED_JSONL, "loss=listwise_kl")
            ),
            **loss_probes("listwise_kl", SCORED_JSONL),
        },
    ),
    **option_probes(
        "train_data=sts",
        {
            "train_data.path": Run(("train_data.path={sts2}",), "batch_texts", STS),
            "train_data.split": Run(("train_data.split=test",), "batch_texts", STS),
            "train_data.dev_split": Run(("train_data.dev_split=null",), "dev_steps", STS),
        },
    ),
    **option_probes(
        "train_data=jsonl",
        {
            "train_data.path": Run(("train_data.path={pairs2}",), "batch_texts", JSONL),
            "train_data.format": Run(("train_data.format=triplets",), "batch_texts", JSONL),
        },
    ),
    **option_probes(
        "train_data=hf",
        {
            "train_data.path": Run(("train_data.path={hf2}",), "batch_texts", HF),
            "train_data.split": Run(
                ("train_data.split=other",),
                "batch_texts",
                (*HF, "train_data.path={hf_splits}", "train_data.split=train"),
            ),
            # Braces doubled: Run overrides go through str.format.
            "train_data.columns": Run(
                ("train_data.columns={{anchor: answer, positive: question}}",), "batch_texts", HF
            ),
        },
    ),
    # Proven in the multi-set tests, which build sets of their own for the probes to differ on.
    **option_probes(
        "train_data=multi",
        {
            "train_data.sets": Proven(
                "test_multiset::test_the_sets_and_sampling_decide_the_batches"
            ),
            "train_data.sampling": Proven(
                "test_multiset::test_the_sets_and_sampling_decide_the_batches"
            ),
        },
    ),
    # synthesize.py and train_data=synthetic share one schema (SynthesisConfig), whose keys
    # test_synthesize probes one by one.
    **option_probes(
        "train_data=synthetic",
        {
            **{
                f"train_data.synthesis.{key}": Proven(
                    "test_synthesize::test_changing_a_synthesize_knob_changes_behaviour"
                )
                for key in SYNTHESIS_KEYS
            },
            "train_data.file": Proven(
                "test_synthesize::test_train_py_synthesises_then_trains_and_reuses_the_file"
            ),
            "train_data.cache_dir": Proven(
                "test_synthesize::test_train_py_synthesises_then_trains_and_reuses_the_file"
            ),
        },
    ),
    **option_probes(
        "eval_data=sts",
        {
            "eval_data.path": Run(("eval_data.path={sts2}",), "metrics", STS_FINAL),
            "eval_data.split": Run(("eval_data.split=dev",), "metrics", STS_FINAL),
        },
    ),
}


# ------------------------------------------------------------------ the key list


def _leaf_keys(node: DictConfig, prefix: str) -> list[str]:
    keys = []
    for key in node:
        if key in ("_target_", "_partial_"):
            continue
        child = node._get_node(key)
        path = f"{prefix}.{key}"
        keys += _leaf_keys(child, path) if OmegaConf.is_dict(child) else [path]
    return keys


def _node_of(group: str) -> str:
    return group.replace("/", ".")


def config_keys() -> set[str]:
    """Every knob a probe must cover, named as PROBES names them."""
    default = compose_train()
    keys = {key for node in NODES for key in _leaf_keys(default[node], node)}
    for group, options in OPTIONS.items():
        node = _node_of(group)
        for option in options:
            composed = compose_train(f"{group}={option}")
            if OmegaConf.get_type(OmegaConf.select(composed, node)) is OmegaConf.get_type(
                OmegaConf.select(default, node)
            ):
                continue  # the same schema, hence the same code path as the default's keys
            top = node.split(".")[0]
            keys |= {f"{group}={option} {key}" for key in _leaf_keys(composed[top], top)}
    return keys


def test_every_knob_has_a_probe():
    keys = config_keys()
    missing = sorted(keys - PROBES.keys())
    stale = sorted(PROBES.keys() - keys)
    assert not missing, f"config keys without a probe in tests/test_knobs.py: {missing}"
    assert not stale, f"probes for keys the configs no longer have: {stale}"


def test_every_option_of_every_group_is_typed():
    # An option whose YAML forgets its /schema/... default would compose to a plain dict:
    # no type checks, no check against the constructor's parameters.
    default = compose_train()
    for node in NODES:
        assert dataclasses.is_dataclass(OmegaConf.get_type(default[node])), node
    for group, options in {**OPTIONS, "logger": ["wandb"], "model": ["minilm"]}.items():
        for option in options:
            composed = OmegaConf.select(compose_train(f"{group}={option}"), _node_of(group))
            assert dataclasses.is_dataclass(OmegaConf.get_type(composed)), f"{group}={option}"


@pytest.mark.parametrize("key", sorted(k for k, p in PROBES.items() if isinstance(p, Proven)))
def test_proofs_elsewhere_exist(key):
    module, function = PROBES[key].where.split("::")
    assert callable(getattr(importlib.import_module(module), function, None)), PROBES[key]


# ------------------------------------------------------------------------ spies


@dataclass
class Spy:
    """What the encoder, the loss and FAISS were handed during one run."""

    forwards: list[dict[str, Any]] = field(default_factory=list)
    checkpointed_layers: int = 0
    infonce_impls: list[str] = field(default_factory=list)
    index_calls: list[dict[str, Any]] = field(default_factory=list)
    evaluated: list[dict[str, Any]] = field(default_factory=list)
    tokenize_threads: set[str] = field(default_factory=set)
    optimizer_fused: set[Any] = field(default_factory=set)


@contextlib.contextmanager
def spying(monkeypatch: pytest.MonkeyPatch):
    spy = Spy()
    tower_forward = Tower.forward

    def forward(self, input_ids, attention_mask, token_type_ids=None, packing=None):
        spy.forwards.append(
            {
                "training": self.training,
                "rows": input_ids.shape[0],
                "seq_len_max": int(attention_mask.sum(1).max()),
                "tokens": int(attention_mask.sum()),
                "ids": hashlib.sha256(input_ids.numpy().tobytes()).hexdigest(),
                "autocast": torch.get_autocast_dtype("cpu")
                if torch.is_autocast_enabled("cpu")
                else None,
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                "matmul_precision": torch.get_float32_matmul_precision(),
                "compiled": self._compiled_call_impl is not None,
                "attention": self.encoder.attention,
            }
        )
        return tower_forward(self, input_ids, attention_mask, token_type_ids, packing)

    checkpoint = bert_module.checkpoint

    def counted_checkpoint(*args, **kwargs):
        spy.checkpointed_layers += 1
        return checkpoint(*args, **kwargs)

    def recording(name, function):
        def call(*args, **kwargs):
            spy.infonce_impls.append(name)
            return function(*args, **kwargs)

        return call

    # Evaluations search through the embedding store, shard by shard.
    store = importlib.import_module("biencoder.retrieval.store")
    build_index, train_index, search = store.build_index, store.train_index, store.search

    def spied_build_index(embeddings, factory, **kwargs):
        spy.index_calls.append({"factory": factory, "rows": len(embeddings), **kwargs})
        return build_index(embeddings, factory, **kwargs)

    def spied_train_index(train, factory, **kwargs):
        spy.index_calls.append({"factory": factory, "train_rows": len(train), **kwargs})
        return train_index(train, factory, **kwargs)

    def spied_search(index, queries, k, **kwargs):
        spy.index_calls.append({"k": k, **kwargs})
        return search(index, queries, k, **kwargs)

    scoring = importlib.import_module("biencoder.evaluation.scoring")
    evaluate_retrieval = scoring.evaluate_retrieval

    def spied_evaluate_retrieval(model, dataset, **kwargs):
        spy.evaluated.append({"queries": len(dataset.queries), "corpus": sorted(dataset.corpus)})
        return evaluate_retrieval(model, dataset, **kwargs)

    tokenize = BiEncoder.tokenize

    def spied_tokenize(self, *args, **kwargs):
        if self.training:
            spy.tokenize_threads.add(threading.current_thread().name.split("_")[0])
        return tokenize(self, *args, **kwargs)

    adamw_step = torch.optim.AdamW.step

    def spied_step(self, *args, **kwargs):
        spy.optimizer_fused.add(self.defaults["fused"])
        return adamw_step(self, *args, **kwargs)

    # Set, then deleted, so that undoing puts back its absence whatever the run set.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(Tower, "forward", forward)
    monkeypatch.setattr(BiEncoder, "tokenize", spied_tokenize)
    monkeypatch.setattr(torch.optim.AdamW, "step", spied_step)
    monkeypatch.setattr(bert_module, "checkpoint", counted_checkpoint)
    for name in ("naive_info_nce", "chunked_info_nce"):
        monkeypatch.setattr(infonce_module, name, recording(name, getattr(infonce_module, name)))
    monkeypatch.setattr(store, "build_index", spied_build_index)
    monkeypatch.setattr(store, "train_index", spied_train_index)
    monkeypatch.setattr(store, "search", spied_search)
    monkeypatch.setattr(scoring, "evaluate_retrieval", spied_evaluate_retrieval)
    try:
        yield spy
    finally:
        monkeypatch.undo()


# ------------------------------------------------------------------ observations


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(TIMINGS)}


def observations(run_dir: Path, spy: Spy, error: Exception | None) -> dict[str, Any]:
    lines = _read_jsonl(run_dir / "metrics.jsonl")
    train = [line for line in lines if "train/loss" in line]
    dev = [line for line in lines if any(k.startswith("dev/") for k in line)]
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    last = run_dir / "checkpoints" / "last"
    weights = {}
    if last.is_dir():
        for file in sorted(last.rglob("*.safetensors")):
            weights |= {f"{file.parent.name}/{k}": v for k, v in load_file(file).items()}
    negatives = run_dir / train_cli.HARD_NEGATIVES
    training = [f for f in spy.forwards if f["training"]]
    evaluating = [f for f in spy.forwards if not f["training"]]
    return {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "steps": [line["step"] for line in train],
        "loss": [round(line["train/loss"], 6) for line in train],
        "lr": [line["train/lr"] for line in train],
        "temperature": [line.get("train/temperature") for line in train],
        "seq_len_max": [line["train/seq_len_max"] for line in train],
        "tokens": [line["train/tokens"] for line in train],
        "dev_steps": [line["step"] for line in dev],
        "metrics": None if metrics is None else _untimed(metrics),
        "metric_keys": None if metrics is None else sorted(_untimed(metrics)),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        if (run_dir / "checkpoints").is_dir()
        else [],
        "weights": hashlib.sha256(
            b"".join(k.encode() + v.numpy().tobytes() for k, v in weights.items())
        ).hexdigest(),
        "weight_shapes": {k: tuple(v.shape) for k, v in weights.items()},
        "negatives": json.loads(negatives.read_text()) if negatives.exists() else None,
        "batch_rows": [f["rows"] for f in training],
        "batch_texts": [f["ids"] for f in training],
        "train_forwards": len(training),
        "autocast": sorted({str(f["autocast"]) for f in training}),
        "deterministic": sorted(
            {(f["deterministic"], f["cublas_workspace"]) for f in training}, key=str
        ),
        "matmul_precision": sorted({f["matmul_precision"] for f in training}),
        "compiled": sorted({f["compiled"] for f in spy.forwards}),
        "attention": sorted({f["attention"] for f in spy.forwards}),
        "tokenize_threads": sorted(spy.tokenize_threads),
        "optimizer_fused": sorted(spy.optimizer_fused, key=str),
        "checkpointed_layers": spy.checkpointed_layers,
        "infonce_impl": sorted(set(spy.infonce_impls)),
        "index": spy.index_calls,
        "run": (run_dir / "run.trec").read_text() if (run_dir / "run.trec").exists() else None,
        "eval_forwards": len(evaluating),
        "eval_seq_len_max": max((f["seq_len_max"] for f in evaluating), default=None),
        "eval_autocast": sorted({str(f["autocast"]) for f in evaluating}),
        "eval_sizes": [(e["queries"], len(e["corpus"])) for e in spy.evaluated],
        "eval_corpus": [e["corpus"] for e in spy.evaluated],
        "stores": _stores(run_dir / "embeddings"),
    }


def _stores(root: Path) -> list[tuple[str, int]]:
    """Each embedding store entry's kind and shard count."""
    if not root.is_dir():
        return []
    return sorted(
        (entry.name.split("-")[0], len(list(entry.glob("shard-*.npy"))))
        for entry in root.iterdir()
        if entry.is_dir()
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path, tiny_beir_path) -> dict[str, str]:
    """Data and model folders that differ from the defaults in one respect each."""
    from biencoder.data.beir import load_beir
    from biencoder.data.paths import STSB_DIR, TINY_DIR

    root = tmp_path_factory.mktemp("knobs")
    torch.manual_seed(1)
    model2 = save_random_bert(root / "model2", minilm_path, EncoderConfig.tiny())

    sts2 = root / "sts2"
    sts2.mkdir()
    import gzip

    for split in ("train", "dev", "test"):
        with gzip.open(STSB_DIR / f"sts-{split}.csv.gz", "rt", encoding="utf-8") as f:
            rows = f.read().splitlines()[40:80]
        (sts2 / f"sts-{split}.csv").write_text("\n".join(rows) + "\n")

    # A query whose id is also a document id (as in Quora or ArguAna), and qrels naming a
    # document the corpus lacks: copies of tiny_beir_path (8 test queries, ~60 documents,
    # so that the top 100 holds every document).
    identical = Path(shutil.copytree(tiny_beir_path, root / "identical_ids"))
    test = load_beir(tiny_beir_path, "test")
    query = sorted(test.qrels)[0]
    doc = sorted(test.corpus)[0]
    for name in ("queries.jsonl", "qrels/test.tsv"):
        text = (identical / name).read_text()
        text = text.replace(f'"_id": "{query}"', f'"_id": "{doc}"')
        text = "\n".join(
            f"{doc}\t{line.split(chr(9), 1)[1]}" if line.startswith(f"{query}\t") else line
            for line in text.splitlines()
        )
        (identical / name).write_text(text + "\n")
    unknown = Path(shutil.copytree(tiny_beir_path, root / "unknown_ids"))
    with open(unknown / "qrels" / "test.tsv", "a") as f:
        f.write(f"{query}\tno-such-document\t1\n")

    pairs, pairs2 = root / "pairs.jsonl", root / "pairs2.jsonl"
    train = load_beir(TINY_DIR, "train")
    records = [
        {"query": train.queries[q], "positive": train.corpus[d].full_text}
        for q in sorted(train.qrels)
        for d in sorted(train.qrels[q])[:1]
    ]
    others = sorted(train.corpus)
    for i, record in enumerate(records):
        record["negatives"] = [train.corpus[others[i % len(others)]].full_text]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records[:40]))
    pairs2.write_text("".join(json.dumps(r) + "\n" for r in records[40:80]))
    scored = root / "scored.jsonl"
    for i, record in enumerate(records):
        record["scores"] = [2.0, 0.5 + 0.1 * (i % 7)]
    scored.write_text("".join(json.dumps(r) + "\n" for r in records[:40]))
    # Saved 🤗 datasets of the same pairs, columns named otherwise: read by position.
    import datasets

    def qa(rows: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"question": [r["query"] for r in rows], "answer": [r["positive"] for r in rows]}
        )

    qa(records[:40]).save_to_disk(str(root / "hf"))
    qa(records[40:80]).save_to_disk(str(root / "hf2"))
    splits = datasets.DatasetDict({"train": qa(records[:40]), "other": qa(records[40:80])})
    splits.save_to_disk(str(root / "hf_splits"))
    return {
        "beir2": tiny_beir_path,
        "sts2": str(sts2),
        "model2": str(model2),
        "pairs": str(pairs),
        "pairs2": str(pairs2),
        "scored": str(scored),
        "minilm": minilm_path,
        "identical_ids": str(identical),
        "unknown_ids": str(unknown),
        "hf": str(root / "hf"),
        "hf2": str(root / "hf2"),
        "hf_splits": str(root / "hf_splits"),
        "store": str(root / "store"),
    }


@pytest.fixture(scope="module")
def run_probe(tiny_model_path, folders, tmp_path_factory):
    """``run_probe(overrides)``: observations of an in-process train.py run, cached by
    overrides so that probes sharing a base train it once."""
    cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def run(overrides: tuple[str, ...]) -> dict[str, Any]:
        overrides = tuple(o.format(**folders) for o in overrides)
        if overrides not in cache:
            run_dir = tmp_path_factory.mktemp("run")
            cfg = compose_train(*tiny_overrides(tiny_model_path, "beir", *overrides))
            error = None
            with pytest.MonkeyPatch.context() as monkeypatch, spying(monkeypatch) as spy:
                torch.manual_seed(0)
                try:
                    train_cli.train(cfg, run_dir)
                except Exception as err:  # the observation of an erroring knob is its error
                    error = err
            cache[overrides] = observations(run_dir, spy, error)
        return cache[overrides]

    return run


# torch.compile of both towers takes over half a minute on 2 cores.
SLOW_PROBES = frozenset({"trainer.compile"})


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(key, marks=pytest.mark.slow) if key in SLOW_PROBES else key
        for key in sorted(k for k, p in PROBES.items() if isinstance(p, Run))
    ],
)
def test_changing_the_knob_changes_behaviour(key, run_probe):
    probe = PROBES[key]
    before = run_probe(probe.base)
    after = run_probe((*probe.base, *probe.change))
    assert before["error"] is None, before["error"]
    if probe.observe != "error":
        assert after["error"] is None, after["error"]
    assert after[probe.observe] != before[probe.observe], (
        f"{key}: {' '.join(probe.change)} left {probe.observe!r} at {before[probe.observe]!r}"
    )
