"""ModernBERT checkpoints in our encoder against transformers' ModernBertModel (eager
attention): every layer's states, the pooled embedding and the parameter gradients, on both
execution paths and both padding sides; and a saved bi-encoder's folder in
transformers.AutoModel and sentence-transformers.

The checkpoints are random and tiny, with global and local layers, a local window shorter
than the texts, and a byte-level BPE tokenizer (tests/parity.py; no merges: one token per
byte) that pads with the config's pad_token_id.

Float32 runs against transformers as it is. In float64, transformers still rotates queries
and keys and takes the softmax in float32, which would leave float64 as blind as float32;
the float64 reference is transformers' code with those two casts taken out.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from parity import (
    DTYPES,
    PATHS,
    SIDES,
    assert_checkpointing_keeps_gradients,
    assert_equal_states,
    assert_sentence_transformers_round_trip,
    encoder_of,
    roberta_byte_tokenizer,
    save_random_checkpoint,
)
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, ModernBertConfig
from transformers.models.modernbert import modeling_modernbert as hf_modernbert

from biencoder.model.backbone import read_config
from biencoder.model.biencoder import BiEncoder
from biencoder.model.modernbert import ModernBertEncoderConfig
from biencoder.model.weights import ours_to_hf

# Odd widths (head sizes 16 and 10: RoPE needs an even one), global layers every 3 and
# every 2 (so 0 and 3 of four, 0 and 2 of three), windows of 3 and 2 tokens each side
# (local_attention 6, and an odd 5 that transformers halves down), different RoPE bases,
# biases everywhere or nowhere, a masked-LM checkpoint (weights under "model.", head and
# decoder beside them) next to a bare one.
CASES = {
    "biased": (
        AutoModelForMaskedLM,
        dict(
            hidden_size=48,
            num_attention_heads=3,
            intermediate_size=40,
            num_hidden_layers=4,
            global_attn_every_n_layers=3,
            local_attention=6,
            global_rope_theta=1000.0,
            local_rope_theta=80.0,
            attention_bias=True,
            mlp_bias=True,
            norm_bias=True,
            pad_token_id=2,
            max_position_embeddings=48,
        ),
    ),
    "unbiased": (
        AutoModel,
        dict(
            hidden_size=40,
            num_attention_heads=4,
            intermediate_size=52,
            num_hidden_layers=3,
            global_attn_every_n_layers=2,
            local_attention=5,
            global_rope_theta=500.0,
            local_rope_theta=10000.0,
            hidden_activation="gelu_pytorch_tanh",
            norm_eps=1e-6,
            pad_token_id=4,
            max_position_embeddings=40,
        ),
    ),
}
# Of different lengths, all longer than the windows; the last is cut at the model's limit.
TEXTS = [
    "a short one",
    "Grüße aus Köln, am Rhein.",
    "A longer passage, which is cut where the positions end. " * 2,
]


def save_checkpoint(case: str, folder: Path) -> Path:
    """An HF folder as transformers writes it: config.json, weights, tokenizer."""
    model_class, fields = CASES[case]
    tokenizer = roberta_byte_tokenizer(fields["pad_token_id"])
    ids = dict(bos_token_id=0, cls_token_id=0, eos_token_id=1, sep_token_id=1)
    config = ModernBertConfig(vocab_size=len(tokenizer), **ids, **fields)
    return save_random_checkpoint(model_class, config, tokenizer, folder)


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory) -> Path:
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(checkpoint) -> BiEncoder:
    return BiEncoder.from_pretrained(checkpoint)


def rotary_in_dtype(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb without its cast to float32."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotate = hf_modernbert.rotate_half
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def eager_in_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager_attention_forward with the softmax in the inputs' dtype."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture
def reference(monkeypatch):
    """Loads transformers' ModernBertModel with eager attention, in a dtype."""

    def load(folder: Path, dtype: torch.dtype) -> nn.Module:
        if dtype == torch.float64:
            monkeypatch.setattr(hf_modernbert, "apply_rotary_pos_emb", rotary_in_dtype)
            monkeypatch.setattr(hf_modernbert, "eager_attention_forward", eager_in_dtype)
        model = AutoModel.from_pretrained(folder, attn_implementation="eager")
        return model.eval().to(dtype)

    return load


def tokenize(folder: Path, side: str) -> dict[str, torch.Tensor]:
    """TEXTS padded on ``side``, the longest cut at the model's limit."""
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=side)
    config = json.loads((folder / "config.json").read_text())
    limit = config["max_position_embeddings"]
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS) and max(lengths) == limit
    assert min(lengths) > config["local_attention"] + 1  # the windows cut every text
    return dict(batch)


@DTYPES
@PATHS
@SIDES
def test_every_layer_matches_transformers(
    checkpoint, loaded, reference, dtype, tolerance, unpadded, side
):
    """Our ``num_layers=k`` is layer k's output through the final norm (what a ModernBERT
    cut at k layers computes); transformers' hidden_states[k] is before it but for the last."""
    batch = tokenize(checkpoint, side)
    real = batch["attention_mask"].bool()
    encoder = encoder_of(loaded, dtype, unpadded)
    theirs = reference(checkpoint, dtype)
    with torch.no_grad():
        output = theirs(**batch, output_hidden_states=True)
        layers = encoder.config.num_hidden_layers
        assert len(output.hidden_states) == layers + 1
        for k in range(layers + 1):
            if k < layers:
                expected = theirs.final_norm(output.hidden_states[k])
            else:
                expected = output.last_hidden_state
            actual = encoder(batch["input_ids"], batch["attention_mask"], num_layers=k)
            assert_close(actual[real], expected[real], tolerance, f"layer {k}")


@DTYPES
@PATHS
@SIDES
def test_pooled_embedding_and_gradients_match_transformers(
    checkpoint, loaded, reference, seed, dtype, tolerance, unpadded, side
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
    hf = dict(theirs.named_parameters())
    ours = dict(tower.encoder.named_parameters())
    assert {ours_to_hf(name, "modernbert") for name in ours} == set(hf)
    for name, p in ours.items():
        assert_close(p.grad, hf[ours_to_hf(name, "modernbert")].grad, tolerance, name)


def test_config_reads_the_layer_pattern_and_rope_bases(checkpoint):
    ours = read_config(checkpoint / "config.json")
    theirs = ModernBertConfig.from_pretrained(checkpoint)
    assert isinstance(ours, ModernBertEncoderConfig)
    assert ours.layer_types == theirs.layer_types
    assert "sliding_attention" in ours.layer_types and ours.window == theirs.sliding_window
    assert ours.global_rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert ours.local_rope_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    for field in ("pad_token_id", "norm_eps", "norm_bias", "attention_bias", "mlp_bias"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_a_config_json_of_transformers_4_reads_the_same(tmp_path):
    """The Hub's ModernBERT configs predate layer_types and rope_parameters."""
    path = tmp_path / "config.json"
    old = dict(
        model_type="modernbert",
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=7,
        global_attn_every_n_layers=3,
        global_rope_theta=1234.0,
        local_rope_theta=56.0,
        local_attention=10,
    )
    path.write_text(json.dumps(old))
    ours, theirs = read_config(path), ModernBertConfig.from_pretrained(tmp_path)
    assert ours.layer_types == theirs.layer_types
    assert ours.global_rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert ours.local_rope_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    assert ours.window == theirs.sliding_window == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(layer_types=["full_attention", "full_attention", "sliding_attention"]),
            "field 'layer_types': only a global layer every n layers",
        ),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}),
            "field 'rope_parameters': only rope_type 'default' is supported",
        ),
        (dict(hidden_size=36, num_attention_heads=4), "RoPE needs an even head size"),
        (dict(hidden_activation="swish"), "hidden_activation 'swish' is not supported"),
    ],
    ids=["layer_types", "rope_type", "odd_head", "activation"],
)
def test_config_errors_name_the_file_and_field(tmp_path, fields, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="modernbert", num_hidden_layers=3) | fields))
    with pytest.raises(ValueError) as err:
        read_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_the_task_model_checkpoint_is_prefixed_and_loads(checkpoint, loaded):
    names = load_file(checkpoint / "model.safetensors").keys()
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    if architecture.endswith("ForMaskedLM"):
        assert all(n.startswith(("model.", "head.", "decoder.")) for n in names)
        assert any(n.startswith("head.") for n in names)
    hf = AutoModel.from_pretrained(checkpoint).state_dict()
    for name, tensor in loaded.query_tower.encoder.state_dict().items():
        assert torch.equal(tensor, hf[ours_to_hf(name, "modernbert")]), name


def test_gradient_checkpointing_gives_the_same_gradients(loaded, seed):
    assert_checkpointing_keeps_gradients(loaded.query_tower.encoder)


def test_the_nested_kernel_refuses_the_local_layers(loaded):
    model = copy.deepcopy(loaded)
    model.set_attention("nested")
    with pytest.raises(ValueError, match="attention='nested' has no sliding window"):
        model.encode(TEXTS)


def test_save_loads_back_in_transformers_with_equal_states(checkpoint, loaded, tmp_path):
    loaded.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "modernbert" and saved["architectures"] == ["ModernBertModel"]
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    theirs = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    assert type(reloaded) is type(theirs) is hf_modernbert.ModernBertModel
    for field in ("layer_types", "rope_parameters", "local_attention", "norm_eps", "norm_bias"):
        assert getattr(reloaded.config, field) == getattr(theirs.config, field), field
    for side in ("right", "left"):
        assert_equal_states(reloaded, theirs, tokenize(checkpoint, side))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(pooling="cls", normalize=False, projection_dim=8), dict(num_layers=2)],
    ids=["mean-normalized", "cls-dense-raw", "layer-2"],
)
def test_save_loads_in_sentence_transformers_to_the_same_embeddings(
    checkpoint, tmp_path, seed, options
):
    model = BiEncoder.from_pretrained(checkpoint, **options)
    assert_sentence_transformers_round_trip(model, tmp_path, TEXTS, ("ModernBertModel",))
