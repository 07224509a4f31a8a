"""Our BERT encoder against transformers.BertModel on the packaged all-MiniLM-L6-v2."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import assert_close_to_scale
from transformers import AutoModel

from biencoder.model.bert import Encoder
from biencoder.model.config import EncoderConfig
from biencoder.model.weights import (
    WeightLoadingError,
    hf_to_ours,
    load_hf_weights,
    ours_to_hf,
    save_hf_weights,
)

TEXTS = [
    "hello",
    "Scientific claims need evidence from abstracts that support or refute them.",
    "A much longer passage, " * 20 + "that pads the others in the batch.",
]


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def reference(request, minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval().to(request.param)


@pytest.fixture(params=[True, False], ids=["unpadded", "padded"])
def encoders(request, minilm, reference):
    """Our encoder, on either execution path, and transformers' BertModel, both in one
    dtype. Float32 is what runs, but its rounding (measured: 5·eps·max|h| apart with
    transformers' eager attention here, up to 17·eps·max|h| on an Intel Xeon) is near the
    size of subtle bugs: a LayerNorm eps of 1e-5 instead of 1e-12 moves the states by
    35-75·eps·max|h|, inside the float32 tolerance. In float64 the same bug exceeds the
    tolerance 1e8-fold."""
    ours = copy.deepcopy(minilm.query_tower.encoder).to(reference.dtype)
    ours.unpadded = request.param
    return ours, reference


def assert_same_real_states(encoder, ours, theirs, mask, msg=None):
    """Equal at unpadded tokens up to the summation order of the two implementations."""
    real = mask.bool()
    # The MLP's down-projection is the longest sum in a layer.
    terms = encoder.config.intermediate_size
    assert_close_to_scale(ours[real], theirs[real], terms=terms, msg=msg)


@pytest.mark.parametrize("texts", [TEXTS[1:2], TEXTS], ids=["no_padding", "padded"])
def test_last_hidden_state_matches_transformers(minilm, encoders, texts):
    encoder, reference = encoders
    batch = minilm.tokenize(texts, "query")
    with torch.no_grad():
        ours = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(**batch).last_hidden_state
    assert ours.shape == theirs.shape
    assert_same_real_states(encoder, ours, theirs, batch["attention_mask"])


def test_intermediate_layers_match_hidden_states(minilm, encoders):
    encoder, reference = encoders
    batch = minilm.tokenize(TEXTS, "doc")
    with torch.no_grad():
        theirs = reference(**batch, output_hidden_states=True).hidden_states
        for k in range(len(theirs)):
            ours = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], k)
            assert_same_real_states(encoder, ours, theirs[k], batch["attention_mask"], f"layer {k}")


def test_rejects_too_many_layers_and_too_long_inputs(minilm):
    encoder = minilm.query_tower.encoder
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_layers=7"):
        encoder(ids, torch.ones_like(ids), num_layers=7)
    long_ids = torch.ones(1, 513, dtype=torch.long)
    with pytest.raises(ValueError, match="513 tokens"):
        encoder(long_ids, torch.ones_like(long_ids))


def tiny_config(**overrides) -> EncoderConfig:
    shape = dict(vocab_size=50, hidden_size=16, intermediate_size=32, max_position_embeddings=24)
    return EncoderConfig.tiny(**shape | overrides)


def test_gradient_checkpointing_gives_the_same_gradients(seed):
    encoder = Encoder(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        encoder.zero_grad()
        encoder.gradient_checkpointing = checkpointing
        encoder.train()
        (encoder(ids, mask) ** 2).sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    # Checkpointing reruns the same forward ops on the same inputs, so the gradients are
    # bit for bit the same. Most are under 1e-6 here: assert_close's default atol=1e-5
    # would pass any of them.
    for plain, checkpointed in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=0)


def test_key_renames_round_trip(minilm_path):
    names = load_file(f"{minilm_path}/model.safetensors").keys()
    ours = Encoder(tiny_config()).state_dict().keys()
    assert {ours_to_hf(hf_to_ours(n)) for n in names} == set(names)
    assert {hf_to_ours(ours_to_hf(n)) for n in ours} == set(ours)


def test_task_model_prefix_and_legacy_layernorm_names_load(tmp_path, seed):
    source = Encoder(tiny_config())
    save_hf_weights(source, tmp_path / "plain.safetensors")
    state = load_file(tmp_path / "plain.safetensors")
    legacy = {}
    for name, tensor in state.items():
        name = "bert." + name
        if "LayerNorm" in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy[name] = tensor
    legacy["cls.predictions.bias"] = torch.zeros(50)
    save_file(legacy, tmp_path / "model.safetensors")
    target = Encoder(tiny_config())
    load_hf_weights(target, tmp_path / "model.safetensors")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pytorch_bin_loads_with_weights_only(tmp_path, seed):
    source = Encoder(tiny_config())
    torch.save(
        {ours_to_hf(k): v for k, v in source.state_dict().items()}, tmp_path / "pytorch_model.bin"
    )
    target = Encoder(tiny_config())
    load_hf_weights(target, tmp_path / "pytorch_model.bin")
    assert torch.equal(source.layers[1].mlp.up.weight, target.layers[1].mlp.up.weight)


def test_weight_errors_name_every_bad_key(tmp_path, seed):
    save_hf_weights(Encoder(tiny_config()), tmp_path / "w.safetensors")
    state = load_file(tmp_path / "w.safetensors")
    del state["encoder.layer.1.output.dense.bias"]
    del state["embeddings.LayerNorm.weight"]
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(33, 16)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightLoadingError) as err:
        load_hf_weights(Encoder(tiny_config()), tmp_path / "w.safetensors")
    message = str(err.value)
    assert str(tmp_path / "w.safetensors") in message
    assert "missing keys: embeddings.LayerNorm.weight, encoder.layer.1.output.dense.bias" in message
    assert "unexpected keys: encoder.layer.0.attention.self.rotary.weight" in message
    shape = "encoder.layer.0.intermediate.dense.weight: checkpoint (33, 16) vs model (32, 16)"
    assert shape in message


def test_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "bert",\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"config.json:2: invalid JSON"):
        EncoderConfig.from_json(path)
    path.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        EncoderConfig.from_json(path)
    path.write_text(json.dumps({"position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="field 'position_embedding_type'"):
        EncoderConfig.from_json(path)


def test_set_dropout_changes_the_rates_used_in_training(seed):
    encoder = Encoder(tiny_config())
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(ids)
    expected = encoder.eval()(ids, mask)
    encoder.train()
    encoder.set_dropout(hidden=0.0, attention=0.0)
    # Dropout with p=0 is the identity, so training mode runs the eval computation.
    torch.testing.assert_close(encoder(ids, mask), expected, rtol=0, atol=0)
    encoder.set_dropout(attention=0.5)
    assert not torch.allclose(encoder(ids, mask), expected)
    assert all(m.p == 0.0 for m in encoder.modules() if isinstance(m, torch.nn.Dropout))
