"""LoRA adapters (``model.lora``, model/lora.py): what trains, what is saved and what loads.

Oracles: the encoder without adapters (LoRA starts as a no-op), the update computed by hand
(``W + alpha / r · B A``), sentence-transformers and transformers loading the merged
checkpoint, the run that was never interrupted (resume), and the step without GradCache.
A distributed step with adapters is checked against one process in tests/test_ddp.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from configs import compose_train
from parity import perturb_adapters
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from tolerances import assert_close
from transformers import AutoModel

from biencoder import train as train_cli
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    LoraSettings,
    load_adapter_state,
    merged,
)

TEXTS = [
    "LoRA trains a low-rank update of each adapted weight.",
    "short",
    "Dense retrieval embeds queries and documents into one space, then searches it.",
]
# Block linears of the tiny BERT (EncoderConfig.tiny: hidden 32, MLP 64, 2 layers).
TINY = EncoderConfig.tiny()
BLOCK_LINEARS = {
    "attn.query": (32, 32),
    "attn.key": (32, 32),
    "attn.value": (32, 32),
    "attn.out": (32, 32),
    "mlp.up": (32, 64),
    "mlp.down": (64, 32),
}


def load(path: str, **lora) -> BiEncoder:
    torch.manual_seed(0)  # the projection's and the adapters' initial values
    settings = LoraSettings(**lora) if lora else LoraSettings()
    return BiEncoder.from_pretrained(path, projection_dim=8, lora=settings)


def embed(model, texts=TEXTS) -> torch.Tensor:
    with torch.no_grad():
        return model(model.tokenize(texts, "query"), "query")


def test_adapters_start_as_a_no_op_and_only_they_and_the_heads_train(tiny_model_path):
    plain, adapted = load(tiny_model_path), load(tiny_model_path, r=4)
    assert_close(embed(adapted), embed(plain), 1e-6)

    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    expected = {"query_tower.projection.weight", "query_tower.projection.bias"}
    for layer in range(TINY.num_hidden_layers):
        for linear in BLOCK_LINEARS:
            for part in ("A", "B"):
                expected.add(
                    f"query_tower.encoder.layers.{layer}.{linear}.lora_{part}.default.weight"
                )
    assert trainable == expected
    count = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    per_layer = sum(4 * (n_in + n_out) for n_in, n_out in BLOCK_LINEARS.values())
    assert count == TINY.num_hidden_layers * per_layer + 32 * 8 + 8


def test_the_update_is_alpha_over_r_times_b_a_on_the_named_layers_only(tiny_model_path):
    model = load(tiny_model_path, r=4, alpha=12.0, target_modules=["query", "down"])
    perturb_adapters(model)
    encoder = model.query_tower.encoder
    adapted = {name for name, m in encoder.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"layers.{i}.{n}" for i in (0, 1) for n in ("attn.query", "mlp.down")}

    query = encoder.layers[1].attn.query
    a, b = query.lora_A.default.weight, query.lora_B.default.weight
    plain = merged(encoder)
    torch.testing.assert_close(
        plain.layers[1].attn.query.weight,
        query.base_layer.weight + 12.0 / 4 * b @ a,
        rtol=0,
        atol=1e-6,
    )
    # The copy is merged, the model is not: it goes on training its adapters.
    assert type(plain.layers[1].attn.query) is torch.nn.Linear
    assert hasattr(query, "lora_A")


def test_the_merged_checkpoint_loads_elsewhere_with_the_same_embeddings(tiny_model_path, tmp_path):
    model = load(tiny_model_path, r=4, dropout=0.1)
    perturb_adapters(model)
    expected = embed(model)
    assert (expected - embed(load(tiny_model_path))).abs().max() > 1e-3  # the adapters act
    model.save_pretrained(tmp_path / "saved")

    ours = BiEncoder.from_pretrained(tmp_path / "saved")
    assert ours.lora is None  # a plain model: evaluation needs no peft
    assert_close(embed(ours), expected, 1e-5)
    theirs = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert_close(torch.as_tensor(theirs.encode(TEXTS)), expected, 1e-5)
    _, info = AutoModel.from_pretrained(
        tmp_path / "saved", add_pooling_layer=False, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]

    adapter = tmp_path / "saved" / ADAPTER_DIR
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16.0, 0.1)
    saved = load_file(adapter / ADAPTER_WEIGHTS)
    assert {n for n in saved if "lora_" not in n} == {
        "query_tower.projection.weight",
        "query_tower.projection.bias",
    }


def test_adapter_state_goes_back_onto_the_base_and_refuses_other_settings(
    tiny_model_path, tmp_path
):
    model = load(tiny_model_path, r=4)
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "saved")
    fresh = load(tiny_model_path, r=4)
    load_adapter_state(fresh, tmp_path / "saved")
    assert_close(embed(fresh), embed(model), 1e-6)

    with pytest.raises(
        ValueError, match=r"lora_A.default.weight has shape \(4, 32\), the model's is \(2, 32\)"
    ):
        load_adapter_state(load(tiny_model_path, r=2), tmp_path / "saved")
    with pytest.raises(ValueError, match=r"missing: none; unexpected: .*lora_A"):
        load_adapter_state(load(tiny_model_path, r=4, target_modules=["up"]), tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match=r"model\.lora\.r > 0"):
        load_adapter_state(fresh, tmp_path / "nothing")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(r=-1), "lora.r: the LoRA rank must be >= 0"),
        (dict(r=4, alpha=0.0), "lora.alpha: .* must be > 0"),
        (dict(r=4, dropout=1.0), r"lora.dropout: must be in \[0, 1\)"),
        (dict(r=4, target_modules=[]), "lora.target_modules: an empty list"),
        (
            dict(r=4, target_modules=["query", "q_proj"]),
            "lora.target_modules: q_proj name no linear layer of this Encoder; its block "
            "layers are down, key, out, query, up, value",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(settings, message, tiny_model_path):
    with pytest.raises(ValueError, match=message):
        load(tiny_model_path, **settings)


def run(tiny_run, run_dir, *extra):
    cfg = compose_train(
        *tiny_run(
            "beir",
            "model.lora.r=4",
            "trainer.eval=false",
            "train_data.dev_queries=0",
            "trainer.deterministic=true",
            *extra,
        )
    )
    torch.manual_seed(0)
    train_cli.train(cfg, run_dir)


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def test_a_resumed_lora_run_equals_the_uninterrupted_one(tiny_run, tmp_path):
    extra = ("trainer.max_steps=4", "trainer.save_every=2", "model.lora.dropout=0.2")
    run(tiny_run, tmp_path / "whole", *extra)
    run(tiny_run, tmp_path / "cut", *extra)
    # As if killed after the step-2 checkpoint: what steps 3 and 4 wrote is gone.
    checkpoints = tmp_path / "cut" / "checkpoints"
    for name in ("last", "step-00000004"):
        shutil.rmtree(checkpoints / name)
    run(tiny_run, tmp_path / "cut", *extra, "trainer.resume=true")

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    for file in ("model.safetensors", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"):
        whole = load_file(tmp_path / "whole" / "checkpoints" / "last" / file)
        cut = load_file(checkpoints / "last" / file)
        assert whole.keys() == cut.keys()
        for name in whole:
            assert torch.equal(whole[name], cut[name]), f"{file}: {name}"
    summary = json.loads((tmp_path / "whole" / "metrics.summary.json").read_text())
    trainable = summary["model/trainable_parameters"]
    assert trainable == TINY.num_hidden_layers * sum(
        4 * (n_in + n_out) for n_in, n_out in BLOCK_LINEARS.values()
    )
    # AdamW keeps two float32 moments per trainable parameter, plus a step count each.
    assert 8 * trainable <= summary["train/optimizer_state_bytes"] <= 8 * trainable + 4 * 64


def test_gradcache_with_adapters_equals_the_plain_step(tiny_run, tmp_path):
    extra = ("trainer.max_steps=2", "trainer.hidden_dropout=0.0", "trainer.attention_dropout=0.0")
    run(tiny_run, tmp_path / "plain", *extra)
    run(tiny_run, tmp_path / "cached", *extra, "trainer.cache_chunk_size=1")
    plain, cached = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert cached == pytest.approx(plain, rel=1e-5)
    file = f"checkpoints/last/{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
    expected, actual = load_file(tmp_path / "plain" / file), load_file(tmp_path / "cached" / file)
    for name in expected:
        assert_close(actual[name], expected[name], 1e-4)
