"""RoBERTa and XLM-RoBERTa checkpoints in our encoder against transformers' RobertaModel and
XLMRobertaModel: every layer's states, the pooled embedding and the parameter gradients, on
both execution paths and both padding sides; and a saved bi-encoder's folder in
transformers.AutoModel and sentence-transformers.

The checkpoints are random and tiny, with a byte-level BPE tokenizer (tests/parity.py; no
merges: one token per byte), so that the tokenizer pads with the config's pad_token_id
wherever that is, as a real RoBERTa tokenizer does with id 1.
"""

import copy
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from parity import (
    DTYPES,
    PATHS,
    SIDES,
    assert_equal_states,
    assert_sentence_transformers_round_trip,
    encoder_of,
    roberta_byte_tokenizer,
    save_random_checkpoint,
)
from safetensors.torch import load_file
from tolerances import assert_close
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    RobertaConfig,
    XLMRobertaConfig,
)

from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import ours_to_hf
from biencoder.train import train_length

# Odd shapes (head widths 12 and 6), one or two token types, a pad id other than 1, a
# short position table, and a masked-LM checkpoint (weights under "roberta.", an lm_head
# beside them) next to a bare one.
CASES = {
    "roberta": (
        RobertaConfig,
        AutoModelForMaskedLM,
        dict(
            hidden_size=36,
            num_attention_heads=3,
            intermediate_size=72,
            num_hidden_layers=2,
            type_vocab_size=1,
            pad_token_id=1,
            max_position_embeddings=40,
            layer_norm_eps=1e-5,
        ),
    ),
    "xlm-roberta": (
        XLMRobertaConfig,
        AutoModel,
        dict(
            hidden_size=30,
            num_attention_heads=5,
            intermediate_size=44,
            num_hidden_layers=3,
            type_vocab_size=2,
            pad_token_id=4,
            max_position_embeddings=36,
            hidden_act="gelu_new",
            layer_norm_eps=1e-5,
        ),
    ),
}
# Of different lengths; the last is cut at the model's position limit, so its last token
# takes the table's last row.
TEXTS = [
    "hi",
    "Grüße aus Köln.",
    "A longer passage, which is cut where the positions end. " * 2,
]


def save_checkpoint(case: str, folder: Path) -> Path:
    """An HF folder as transformers writes it: config.json, weights, tokenizer."""
    config_class, model_class, fields = CASES[case]
    tokenizer = roberta_byte_tokenizer(fields["pad_token_id"])
    config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    # BERT's norms are called LayerNorm (lm_head's layer_norm stays at mean 0).
    return save_random_checkpoint(model_class, config, tokenizer, folder, "LayerNorm.weight")


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory) -> Path:
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(checkpoint) -> BiEncoder:
    return BiEncoder.from_pretrained(checkpoint)


def reference(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModel.from_pretrained(folder).eval().to(dtype)


def tokenize(folder: Path, side: str) -> dict[str, torch.Tensor]:
    """TEXTS as a RoBERTa tokenizer gives them: padded on ``side``, no token_type_ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=side)
    config = json.loads((folder / "config.json").read_text())
    limit = config["max_position_embeddings"] - config["pad_token_id"] - 1
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS) and max(lengths) == limit
    return dict(batch)


def compared(states: torch.Tensor, mask: torch.Tensor, unpadded: bool) -> torch.Tensor:
    """The positions two encoders must agree at: the real tokens, and on the padded path
    the padding too, where transformers gives the pad token position pad_token_id."""
    return states[mask.bool()] if unpadded else states


@DTYPES
@PATHS
@SIDES
def test_every_layer_matches_transformers(checkpoint, loaded, dtype, tolerance, unpadded, side):
    batch = tokenize(checkpoint, side)
    mask = batch["attention_mask"]
    encoder = encoder_of(loaded, dtype, unpadded)
    with torch.no_grad():
        theirs = reference(checkpoint, dtype)(**batch, output_hidden_states=True).hidden_states
        assert len(theirs) == encoder.config.num_hidden_layers + 1
        for k, expected in enumerate(theirs):
            actual = encoder(batch["input_ids"], mask, num_layers=k)
            assert_close(
                compared(actual, mask, unpadded),
                compared(expected, mask, unpadded),
                tolerance,
                f"layer {k}",
            )


def assert_same_gradients(ours: torch.nn.Module, theirs: torch.nn.Module, tolerance: float):
    """Every parameter's gradient equal to that of transformers' parameter of the same HF
    name."""
    hf = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        expected = hf[ours_to_hf(name)].grad
        if name.endswith("attn.key.bias"):
            # Zero up to rounding: softmax cancels a score added to every key of a query.
            # Its terms are the size of the key weight's gradient.
            scale = hf[ours_to_hf(name.replace("bias", "weight"))].grad.abs().max().item()
            atol = tolerance * scale
            for g in (p.grad, expected):
                torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=atol, msg=name)
            continue
        assert_close(p.grad, expected, tolerance, name)


@DTYPES
@PATHS
@SIDES
def test_pooled_embedding_and_gradients_match_transformers(
    checkpoint, loaded, seed, dtype, tolerance, unpadded, side
):
    batch = tokenize(checkpoint, side)
    mask = batch["attention_mask"]
    tower = copy.deepcopy(loaded.query_tower).to(dtype)
    tower.encoder.unpadded = unpadded
    assert loaded.config.pooling == "mean"
    theirs = reference(checkpoint, dtype)
    upstream = torch.randn(len(TEXTS), tower.dim, dtype=dtype)  # non-unit, per coordinate

    pooled = tower(batch["input_ids"], mask)  # [B, H]
    (pooled * upstream).sum().backward()
    states = theirs(**batch).last_hidden_state
    m = mask.unsqueeze(-1).to(dtype)
    expected = (states * m).sum(1) / m.sum(1)
    (expected * upstream).sum().backward()

    assert_close(pooled.detach(), expected.detach(), tolerance)
    assert_same_gradients(tower.encoder, theirs, tolerance)


@DTYPES
@SIDES
def test_padded_path_matches_transformers_at_padding_too(
    checkpoint, loaded, seed, dtype, tolerance, side
):
    """Transformers gives padding position pad_token_id, whose row it keeps out of the
    gradient: the padded path's states and gradients equal its at every position, with an
    upstream gradient on padding too."""
    batch = tokenize(checkpoint, side)
    encoder = encoder_of(loaded, dtype, unpadded=False)
    theirs = reference(checkpoint, dtype)
    ours = encoder(batch["input_ids"], batch["attention_mask"])  # [B, L, H]
    expected = theirs(**batch).last_hidden_state
    upstream = torch.randn_like(expected)
    (ours * upstream).sum().backward()
    (expected * upstream).sum().backward()

    assert_close(ours.detach(), expected.detach(), tolerance)
    assert_same_gradients(encoder, theirs, tolerance)
    pad = encoder.config.pad_token_id
    assert not encoder.embeddings.position.weight.grad[pad].any()


def test_config_reads_the_roberta_fields(checkpoint):
    ours = EncoderConfig.from_json(checkpoint / "config.json")
    theirs = json.loads((checkpoint / "config.json").read_text())
    assert ours.model_type == theirs["model_type"] in ("roberta", "xlm-roberta")
    assert ours.positions_per_text
    for field in ("pad_token_id", "type_vocab_size", "max_position_embeddings", "vocab_size"):
        assert getattr(ours, field) == theirs[field], field


def test_the_task_model_checkpoint_is_prefixed_and_loads(checkpoint, loaded):
    names = load_file(checkpoint / "model.safetensors").keys()
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    if architecture.endswith("ForMaskedLM"):
        assert all(n.startswith(("roberta.", "lm_head.")) for n in names)
    hf = reference(checkpoint, torch.float32).state_dict()
    for name, tensor in loaded.query_tower.encoder.state_dict().items():
        assert torch.equal(tensor, hf[ours_to_hf(name)]), name


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_missing_fields_take_transformers_defaults(tmp_path, model_type):
    # A RoBERTa read with BERT's pad id 0 would count its positions from the wrong row.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type}))
    config_class = RobertaConfig if model_type == "roberta" else XLMRobertaConfig
    ours, theirs = EncoderConfig.from_json(path), config_class()
    for field in ("pad_token_id", "vocab_size", "type_vocab_size", "max_position_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_unsupported_model_type_names_the_file_and_the_supported_ones(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "deberta-v2"}))
    with pytest.raises(ValueError) as err:
        EncoderConfig.from_json(path)
    assert str(err.value) == (
        f"{path}: model_type 'deberta-v2' is not supported; "
        "supported: bert, roberta, xlm-roberta, modernbert, llama, mistral, qwen2, qwen3"
    )
    path.write_text(json.dumps({"model_type": ["roberta"]}))
    with pytest.raises(ValueError) as err:
        EncoderConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: model_type ['roberta'] is not supported;")


def test_inputs_up_to_the_position_limit_load_and_longer_ones_are_refused(checkpoint, loaded):
    # The table less the pad_token_id + 1 rows before the first token's.
    config = json.loads((checkpoint / "config.json").read_text())
    limit = config["max_position_embeddings"] - config["pad_token_id"] - 1
    # A folder without sentence-transformers' files: the limit is its max_length.
    assert loaded.config.max_length == limit
    assert loaded.tokenize(TEXTS, "doc")["input_ids"].shape[1] == limit
    ids = torch.full((1, limit + 1), 7)
    with pytest.raises(ValueError, match=f"{limit + 1} tokens is longer than the model's {limit}"):
        loaded.query_tower.encoder(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match=f"exceed the {limit} positions of"):
        BiEncoder.from_pretrained(checkpoint, max_length=limit + 1)


def test_training_length_is_capped_at_the_tokens_the_positions_hold(loaded):
    # train.py's trainer.max_length cap: the position table's rows less RoBERTa's offset, or
    # every long text would be refused by the encoder mid-training.
    limit = loaded.query_tower.encoder.config.max_tokens
    assert limit < loaded.query_tower.encoder.config.max_position_embeddings
    assert train_length(limit + 5, loaded) == limit
    assert train_length(limit - 3, loaded) == limit - 3


def test_save_loads_back_in_transformers_with_equal_states(checkpoint, loaded, tmp_path):
    loaded.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((checkpoint / "config.json").read_text())
    for field in ("model_type", "pad_token_id", "type_vocab_size", "max_position_embeddings"):
        assert saved[field] == original[field], field
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    theirs = reference(checkpoint, torch.float32)
    assert type(reloaded) is type(theirs)
    assert reloaded.config.architectures == [type(theirs).__name__]
    for side in ("right", "left"):
        assert_equal_states(reloaded, theirs, tokenize(checkpoint, side))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(pooling="cls", normalize=False, projection_dim=8)],
    ids=["mean-normalized", "cls-dense-raw"],
)
def test_save_loads_in_sentence_transformers_to_the_same_embeddings(
    checkpoint, tmp_path, seed, options
):
    model = BiEncoder.from_pretrained(checkpoint, **options)
    assert_sentence_transformers_round_trip(
        model, tmp_path, TEXTS, ("RobertaModel", "XLMRobertaModel")
    )


def test_vocab_json_and_merges_without_tokenizer_json_load(tmp_path):
    """Folders saved before tokenizer.json hold RoBERTa's vocabulary in vocab.json."""
    checkpoint = save_checkpoint("roberta", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (legacy / name).write_bytes((checkpoint / name).read_bytes())
    (legacy / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    (legacy / "merges.txt").write_text("#version: 0.2\n")
    model = BiEncoder.from_pretrained(legacy)
    assert model.tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert torch.equal(model.encode(TEXTS), BiEncoder.from_pretrained(checkpoint).encode(TEXTS))


def sentencepiece_checkpoint(folder: Path) -> Path:
    """A tiny XLM-RoBERTa folder as transformers writes it, its tokenizer built from a
    SentencePiece BPE model trained here (XLM-R's own is 5 MB)."""
    import sentencepiece

    corpus = [*TEXTS, "The quick brown fox jumps over the lazy dog.", "Zwölf Boxkämpfer."] * 30
    trained = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=trained,
        vocab_size=64,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    folder.mkdir()
    (folder / "sentencepiece.bpe.model").write_bytes(trained.getvalue())
    (folder / "config.json").write_text(json.dumps({"model_type": "xlm-roberta"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fields = {**CASES["xlm-roberta"][2], "pad_token_id": tokenizer.pad_token_id}
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    return save_random_checkpoint(AutoModel, config, tokenizer, folder, "LayerNorm.weight")


def test_an_xlm_roberta_folder_with_its_sentencepiece_model_alone_loads(tmp_path):
    """XLM-RoBERTa checkpoints saved before tokenizer.json hold sentencepiece.bpe.model."""
    checkpoint = sentencepiece_checkpoint(tmp_path / "hf")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "model.safetensors", "sentencepiece.bpe.model"):
        (legacy / name).write_bytes((checkpoint / name).read_bytes())
    model = BiEncoder.from_pretrained(legacy)
    expected = AutoTokenizer.from_pretrained(checkpoint)(TEXTS)["input_ids"]
    assert model.tokenizer(TEXTS)["input_ids"] == expected
    assert model.tokenizer.unk_token_id not in expected[1]  # words, not [UNK]s
    assert torch.equal(model.encode(TEXTS), BiEncoder.from_pretrained(checkpoint).encode(TEXTS))


def test_a_sentencepiece_model_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    checkpoint = sentencepiece_checkpoint(tmp_path / "hf")
    (checkpoint / "tokenizer.json").unlink()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentencepiece" else real(name, *a),
    )
    with pytest.raises(
        ImportError, match=r"sentencepiece.bpe.model alone.*pip install sentencepiece"
    ):
        BiEncoder.from_pretrained(checkpoint)
