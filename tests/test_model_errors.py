"""Broken model folders and broken models fail early, with errors that name the cause.

Each test builds the bad input in a temp folder from the tiny random model, which loads in
milliseconds, and checks that the error names the file or field at fault.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biencoder.data.beir import load_beir
from biencoder.data.sts import load_sts
from biencoder.evaluation.config import IndexSpec
from biencoder.evaluation.retrieval import evaluate_retrieval, evaluate_sts
from biencoder.model.biencoder import BiEncoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import TOKENIZER_FILES, WeightLoadingError, save_random_bert


@pytest.fixture
def tiny_copy(tiny_model_path, tmp_path) -> Path:
    """A copy of the tiny model folder, to damage."""
    return Path(shutil.copytree(tiny_model_path, tmp_path / "model"))


def test_folder_without_tokenizer_files_is_refused(tiny_copy):
    for name in TOKENIZER_FILES:
        (tiny_copy / name).unlink()
    # transformers would build a 5-token vocabulary and map every word to [UNK].
    with pytest.raises(FileNotFoundError) as err:
        BiEncoder.from_pretrained(tiny_copy)
    assert str(err.value) == (
        f"{tiny_copy}: no tokenizer vocabulary; looked for tokenizer.json or vocab.txt or "
        "vocab.json or sentencepiece.bpe.model. Copy in the tokenizer files of the model this "
        "one was trained from"
    )


def test_tokenizer_larger_than_the_embedding_matrix_is_refused(minilm_path, tmp_path, seed):
    folder = save_random_bert(tmp_path, minilm_path, EncoderConfig.tiny(vocab_size=1000))
    with pytest.raises(ValueError, match="embedding matrix") as err:
        BiEncoder.from_pretrained(folder)
    assert str(err.value) == (
        f"{folder}: the tokenizer (tokenizer.json, vocab.txt) has 30522 tokens but the "
        "embedding matrix has 1000 rows (vocab_size in config.json): token ids would index "
        "past it. Is the tokenizer from another model?"
    )


def test_tokenizer_far_smaller_than_the_embedding_matrix_warns(
    minilm_path, tiny_model_path, tmp_path, seed, caplog
):
    folder = save_random_bert(tmp_path, minilm_path, EncoderConfig.tiny(vocab_size=70000))
    with caplog.at_level(logging.WARNING, logger="biencoder.model.biencoder"):
        BiEncoder.from_pretrained(tiny_model_path)
        assert "tokenizer" not in caplog.text
        BiEncoder.from_pretrained(folder)
    assert (
        f"{folder}: the tokenizer (tokenizer.json, vocab.txt) has 30522 tokens, under half "
        "the 70000 rows of the embedding matrix (vocab_size in config.json)"
    ) in caplog.text


def test_missing_config_json_is_named(tiny_copy):
    config = tiny_copy / "config.json"
    config.unlink()
    with pytest.raises(FileNotFoundError) as err:
        BiEncoder.from_pretrained(tiny_copy)
    # OSError(errno, strerror) keeps the path out of repr() and err.args.
    assert err.value.args == (
        f"encoder config {config} does not exist: a model folder needs the Hugging Face "
        "config.json of its encoder",
    )


def test_truncated_safetensors_is_named(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightLoadingError, match="truncated or corrupt") as err:
        BiEncoder.from_pretrained(tiny_copy)
    assert str(err.value).startswith(f"{weights}: the file is truncated or corrupt (")


def test_truncated_pytorch_bin_is_named(tiny_copy):
    weights = tiny_copy / "pytorch_model.bin"
    torch.save(load_file(tiny_copy / "model.safetensors"), weights)
    (tiny_copy / "model.safetensors").unlink()
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightLoadingError) as err:
        BiEncoder.from_pretrained(tiny_copy)
    assert str(err.value).startswith(f"{weights}: cannot read the checkpoint: ")


def test_bad_pooling_in_biencoder_json_names_file_and_field(tiny_model_path, tmp_path):
    BiEncoder.from_pretrained(tiny_model_path).save_pretrained(tmp_path)
    config = tmp_path / "biencoder.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"pooling": "avg"}))
    with pytest.raises(ValueError) as err:
        BiEncoder.from_pretrained(tmp_path)
    assert str(err.value) == (
        f"{config}: pooling: unknown pooling 'avg'; choose one of cls, mean, max, "
        "weighted_mean, last_token, attention"
    )


def _poison_token(model: BiEncoder, token_id: int) -> None:
    with torch.no_grad():
        model.query_tower.encoder.embeddings.word.weight[token_id] = float("nan")


def test_retrieval_refuses_non_finite_embeddings_and_counts_them(tiny_model_path, tiny_beir_path):
    dataset = load_beir(tiny_beir_path, "test")
    model = BiEncoder.from_pretrained(tiny_model_path)
    texts = [doc.full_text for doc in dataset.corpus.values()]
    ids = [set(row) for row in model.tokenize(texts, "doc")["input_ids"].tolist()]
    # Attention spreads one NaN token to every position of its text: exactly the documents
    # holding the token become NaN, whatever else they hold.
    token = model.tokenizer.convert_tokens_to_ids("cells")
    poisoned = sum(token in row for row in ids)
    assert 0 < poisoned < len(texts)
    _poison_token(model, token)
    with pytest.raises(ValueError) as err:
        evaluate_retrieval(model, dataset)
    assert str(err.value) == (
        f"{poisoned} of {len(texts)} documents have non-finite embeddings (NaN or inf): the "
        "model's weights are probably NaN or inf (e.g. diverged training)"
    )


def test_sts_refuses_a_model_with_nan_weights(tiny_model_path, tiny_sts_path):
    pairs = load_sts(tiny_sts_path, "test")
    model = BiEncoder.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError) as err:
        evaluate_sts(model, pairs)
    assert str(err.value) == (
        f"{2 * len(pairs)} of {2 * len(pairs)} sentences have non-finite embeddings (NaN or "
        "inf): the model's weights are probably NaN or inf (e.g. diverged training)"
    )


@pytest.mark.parametrize(
    ("index", "dims", "message"),
    [
        (IndexSpec(factory="IVF4,PQ8"), [12], "'IVF4,PQ8' for embedding dim 12: "),
        (IndexSpec(factory="IVF256,Flat"), [], "'IVF256,Flat' clusters its training rows"),
        (IndexSpec(factory="IVF4,Flat", train_size=3), [], "would be trained on 3 "),
        (IndexSpec(), [64], r"matryoshka_dims: \[64\] outside the model's \(0, 32\]"),
    ],
    ids=["pq-dims", "ivf-lists-over-corpus", "ivf-lists-over-train-size", "dim-over-width"],
)
def test_retrieval_checks_index_and_dims_before_encoding(
    tiny_model_path, tiny_beir_path, monkeypatch, index, dims, message
):
    model = BiEncoder.from_pretrained(tiny_model_path)

    def encode(*args, **kwargs):
        raise AssertionError("encoded before checking the index and dims")

    monkeypatch.setattr(model, "encode", encode)
    with pytest.raises(ValueError, match=message):
        evaluate_retrieval(
            model, load_beir(tiny_beir_path, "test"), index=index, matryoshka_dims=dims
        )


def test_a_model_that_runs_its_own_code_is_refused_not_loaded_as_bert(tiny_copy):
    """jina-embeddings-v2 says model_type "bert" but computes attention with ALiBi in its
    own code: loaded into our BERT it would give other embeddings without an error."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["auto_map"] = {
        "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"
    }
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"{tiny_copy}/config.json: field 'auto_map': .*AutoModel"
    ):
        BiEncoder.from_pretrained(tiny_copy)
