"""BiEncoder against sentence-transformers, and save -> load through both loaders."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tolerances import assert_close_to_scale

from biencoder.model.biencoder import (
    MAX_CHARS_PER_TOKEN,
    BiEncoder,
    truncate_embeddings,
)
from biencoder.runtime.device import bf16_supported

TEXTS = [
    "What causes antibiotic resistance in bacteria?",
    "0-dimensional biomaterials show inductive properties.",
    "A",
    "Mitochondrial dysfunction " * 150,  # truncated at max_length
    "The 1,000 genomes project sequenced diverse human populations.",
]


def st_encode(folder, texts, **kwargs) -> torch.Tensor:
    model = SentenceTransformer(str(folder), device="cpu")
    return torch.as_tensor(model.encode(texts, convert_to_numpy=True, **kwargs))


def assert_same_embeddings(actual, expected):
    """Equal up to summation order: the same float32 ops through other kernels or other
    padding (measured: 6·eps·max|e| against sentence-transformers with eager attention).
    test_encoder's float64 comparison catches encoder errors too small for this."""
    # MiniLM's MLP down-projection (1536 terms) is the longest sum in the model.
    assert_close_to_scale(actual, expected, terms=1536)


def assert_identical(actual, expected):
    """Bit for bit: the same weights through the same code on the same batches."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_encode_matches_sentence_transformers(minilm, minilm_path):
    ours = minilm.encode(TEXTS, kind="doc", batch_size=2)
    assert_same_embeddings(ours, st_encode(minilm_path, TEXTS))
    assert ours.shape == (len(TEXTS), 384)


def test_encode_keeps_input_order_whatever_the_batching(minilm):
    one_batch = minilm.encode(TEXTS, batch_size=64)
    per_text = torch.cat([minilm.encode([t]) for t in TEXTS])
    assert_same_embeddings(one_batch, per_text)


def test_encode_refuses_a_bare_string(minilm):
    with pytest.raises(TypeError, match="list of texts"):
        minilm.encode("just one")


def test_matryoshka_truncation_renormalises(minilm):
    full = minilm.encode(TEXTS)
    small = minilm.encode(TEXTS, dim=64)
    assert_identical(small, F.normalize(full[:, :64], dim=-1))
    torch.testing.assert_close(small.norm(dim=-1), torch.ones(len(TEXTS)))
    with pytest.raises(ValueError, match="truncation dim 500"):
        truncate_embeddings(full, 500, normalize=True)


@pytest.mark.parametrize(
    "options",
    [
        dict(pooling="cls", normalize=False),
        dict(pooling="max"),
        dict(pooling="weighted_mean", projection_dim=32),
        dict(pooling="last_token", normalize=False, query_prefix="query: ", doc_prefix="passage: "),
    ],
    ids=["cls-raw", "max", "weighted_mean-dense", "last_token-prefixes"],
)
def test_save_load_round_trip_through_both_loaders(minilm_path, tmp_path, options, seed):
    model = BiEncoder.from_pretrained(minilm_path, max_length=64, **options)
    expected_q = model.encode(TEXTS, kind="query")
    expected_d = model.encode(TEXTS, kind="doc")
    model.save_pretrained(tmp_path)

    reloaded = BiEncoder.from_pretrained(tmp_path)
    assert reloaded.config == model.config
    assert_identical(reloaded.encode(TEXTS, kind="query"), expected_q)
    assert_identical(reloaded.encode(TEXTS, kind="doc"), expected_d)

    prompt = {"prompt_name": "query"} if options.get("query_prefix") else {}
    assert_same_embeddings(st_encode(tmp_path, TEXTS, **prompt), expected_q)


def test_tokenize_max_length_overrides_the_config_limit(minilm):
    long_texts = [TEXTS[3], TEXTS[0]]
    assert minilm.tokenize(long_texts, "doc")["input_ids"].shape[1] == 256
    short = minilm.tokenize(long_texts, "doc", max_length=16)
    assert short["input_ids"].shape == (2, 16)
    assert short["input_ids"][0, -1] == minilm.tokenizer.sep_token_id


def test_prefixes_are_prepended(minilm_path):
    prefixed = BiEncoder.from_pretrained(minilm_path, query_prefix="query: ")
    plain = BiEncoder.from_pretrained(minilm_path)
    assert_identical(
        prefixed.encode(TEXTS, kind="query"), plain.encode(["query: " + t for t in TEXTS])
    )
    assert_identical(prefixed.encode(TEXTS, kind="doc"), plain.encode(TEXTS))


def test_attention_pooling_round_trips_through_our_loader(minilm_path, tmp_path, seed):
    model = BiEncoder.from_pretrained(minilm_path, pooling="attention")
    with torch.no_grad():
        model.query_tower.pooling.query.normal_()
    expected = model.encode(TEXTS)
    model.save_pretrained(tmp_path)
    assert_identical(BiEncoder.from_pretrained(tmp_path).encode(TEXTS), expected)


def test_intermediate_layer_model_saves_cut_at_that_layer(minilm_path, tmp_path):
    model = BiEncoder.from_pretrained(minilm_path, num_layers=3)
    expected = model.encode(TEXTS)
    assert not torch.allclose(expected, BiEncoder.from_pretrained(minilm_path).encode(TEXTS))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 3
    assert_identical(BiEncoder.from_pretrained(tmp_path).encode(TEXTS), expected)
    assert_same_embeddings(st_encode(tmp_path, TEXTS), expected)


def test_separate_towers_save_and_load_both(minilm_path, tmp_path):
    model = BiEncoder.from_pretrained(minilm_path, shared=False)
    assert_identical(model.encode(TEXTS, kind="doc"), model.encode(TEXTS, kind="query"))
    with torch.no_grad():
        model.doc_tower.encoder.layers[0].mlp.up.bias.add_(0.1)
    expected_q, expected_d = model.encode(TEXTS, kind="query"), model.encode(TEXTS, kind="doc")
    assert not torch.allclose(expected_q, expected_d, atol=1e-3)
    model.save_pretrained(tmp_path)
    reloaded = BiEncoder.from_pretrained(tmp_path)
    assert reloaded.doc_tower is not None
    assert_identical(reloaded.encode(TEXTS, kind="query"), expected_q)
    assert_identical(reloaded.encode(TEXTS, kind="doc"), expected_d)


def test_missing_folder_and_unknown_config_fields_are_named(tmp_path, minilm):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BiEncoder.from_pretrained(tmp_path / "nope")
    minilm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "biencoder.json").read_text())
    (tmp_path / "biencoder.json").write_text(json.dumps(raw | {"pooler": "cls"}))
    with pytest.raises(ValueError, match=r"biencoder\.json: unknown fields pooler"):
        BiEncoder.from_pretrained(tmp_path)


def test_forward_is_differentiable_and_encode_restores_training_mode(minilm_path):
    model = BiEncoder.from_pretrained(minilm_path).train()
    batch = model.tokenize(TEXTS[:2], "query")
    model(batch, "query").sum().backward()
    assert model.query_tower.encoder.layers[0].attn.query.weight.grad is not None
    model.encode(TEXTS[:1])
    assert model.training


class LengthSpy:
    """Passes calls through to a tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def __call__(self, texts, **kwargs):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_huge_text_is_cut_to_the_character_budget_before_tokenising(minilm, monkeypatch, caplog):
    budget = minilm.config.max_length * MAX_CHARS_PER_TOKEN
    huge = " ".join(TEXTS[:3]) * (5_000_000 // len(" ".join(TEXTS[:3])))  # ~5 MB
    spy = LengthSpy(minilm.tokenizer)
    monkeypatch.setattr(minilm, "tokenizer", spy)
    # The session's model may have cut texts before: the count goes on from there.
    before = minilm.texts_cut
    with caplog.at_level(logging.DEBUG, logger="biencoder.model.biencoder"):
        embedding = minilm.encode([huge], kind="doc")
        features = minilm.tokenize([huge, TEXTS[0], huge], "doc")
    assert spy.longest == budget
    warning = (
        "cut {} of {} texts to their first 16384 characters (256 tokens x 64) before "
        "tokenising; their tokens past max_length are dropped anyway ({} so far)"
    )
    assert caplog.messages == [
        warning.format(1, 1, before + 1),
        warning.format(2, 3, before + 3),
    ]
    assert minilm.texts_cut == before + 3
    # The first cut of a model's life is a warning, later ones are counted at DEBUG.
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING if before == 0 else logging.DEBUG, logging.DEBUG]
    assert_identical(embedding, minilm.encode([huge[:budget]], kind="doc"))
    cut = minilm.tokenize([huge[:budget], TEXTS[0], huge[:budget]], "doc")
    assert_identical(features["input_ids"], cut["input_ids"])


def test_texts_within_the_character_budget_tokenize_unchanged(minilm, caplog):
    budget = minilm.config.max_length * MAX_CHARS_PER_TOKEN
    filler = " ".join(TEXTS) * (budget // len(" ".join(TEXTS)) + 1)
    texts = [*TEXTS, filler[: budget - 1], filler[:budget]]
    plain = dict(padding=True, truncation=True, return_tensors="pt")
    with caplog.at_level(logging.DEBUG, logger="biencoder.model.biencoder"):
        ours = minilm.tokenize(texts, "doc")["input_ids"]
    assert not caplog.messages
    assert_identical(ours, minilm.tokenizer(texts, max_length=256, **plain)["input_ids"])
    # At 16 tokens the budget is 1024 characters: the long texts are cut, and keep their
    # tokens, which all come from their first 100 characters or so.
    assert len(TEXTS[3]) > 16 * MAX_CHARS_PER_TOKEN
    with caplog.at_level(logging.DEBUG, logger="biencoder.model.biencoder"):
        short = minilm.tokenize(texts, "doc", max_length=16)["input_ids"]
    assert caplog.messages[0].startswith("cut 3 of 7 texts to their first 1024 characters")
    assert_identical(short, minilm.tokenizer(texts, max_length=16, **plain)["input_ids"])


def test_unpadded_and_padded_encode_alike_and_the_switch_reaches_every_tower(minilm_path):
    model = BiEncoder.from_pretrained(minilm_path, shared=False)
    towers = (model.query_tower.encoder, model.doc_tower.encoder)
    assert all(encoder.unpadded for encoder in towers)
    unpadded = model.encode(TEXTS, kind="doc")
    model.set_unpadded(False)
    assert not any(encoder.unpadded for encoder in towers)
    assert_same_embeddings(model.encode(TEXTS, kind="doc"), unpadded)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no bf16 on this CPU")
def test_bf16_encode_is_close_to_fp32_and_fp32_is_the_default(minilm):
    fp32 = minilm.encode(TEXTS)
    assert_identical(minilm.encode(TEXTS, precision="fp32"), fp32)
    bf16 = minilm.encode(TEXTS, precision="bf16")
    # bf16 keeps 8 significant bits (eps 2^-8), so autocast has really run when the
    # embeddings move by more than float32 rounding...
    assert (bf16 - fp32).abs().max() > 1e-4
    # ...and it runs only the matrix products in bf16 with fp32 sums, so the directions
    # hardly move: measured cosine >= 0.99997 on SciFact abstracts. 0.999 leaves 30x that
    # margin in 1 - cos and still fails a wrong computation (a skipped layer norm, bf16
    # residuals), which lands far below.
    assert F.cosine_similarity(bf16, fp32).min() >= 0.999
    minilm.precision = "bf16"
    try:
        assert_identical(minilm.encode(TEXTS), bf16)
    finally:
        minilm.precision = "fp32"


def test_precision_errors(minilm, monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        minilm.encode(TEXTS, precision="fp16")
    monkeypatch.setattr("biencoder.model.biencoder.bf16_supported", lambda device: False)
    with pytest.raises(RuntimeError, match="no bfloat16 support on cpu"):
        minilm.encode(TEXTS, precision="bf16")
    assert minilm.encode(TEXTS[:1], precision="fp32").dtype == torch.float32
