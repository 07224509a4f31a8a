"""Llama, Mistral, Qwen2 and Qwen3 checkpoints in our decoder against transformers' models
(eager attention): every layer's states, the last-token embedding and the parameter
gradients, on both execution paths, both padding sides, causal and bidirectional; and a
saved bi-encoder's folder in transformers.AutoModel and sentence-transformers.

The checkpoints are random and tiny: grouped-query and multi-query attention, odd widths, a
head_dim that is not hidden_size / heads, RoPE bases, Llama 3's and linear frequency
scaling, sliding windows shorter than the texts (Mistral's on every layer, Qwen2's from
its second), biases (Qwen2's on q/k/v, Llama's and Qwen3's everywhere), Qwen3's q/k norms,
tied and untied embeddings, causal-LM checkpoints (weights under "model.", lm_head beside
them) next to bare ones. The byte-level BPE tokenizer (tests/parity.py; no merges: one
token per byte) comes as a Llama-like one adding BOS and a Qwen-like one adding nothing.

Bidirectional attention is checked against transformers given a 4D mask of our own, which
it applies instead of its causal one (test_a_4d_mask_replaces_the_causal_one shows it does).

Float32 runs against transformers as it is. In float64, transformers still takes RMSNorm
and the softmax in float32, which would leave float64 as blind as float32; the float64
reference is transformers' code with those casts taken out. Both compute RoPE's tables in
float32, as the checkpoints were trained.
"""

import copy
import json
from pathlib import Path

import parity
import pytest
import torch
from parity import (
    DTYPES,
    PATHS,
    SIDES,
    assert_checkpointing_keeps_gradients,
    assert_equal_states,
    assert_sentence_transformers_round_trip,
    decoder_byte_tokenizer,
    save_random_checkpoint,
)
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from biencoder.model.backbone import read_config
from biencoder.model.biencoder import BiEncoder
from biencoder.model.llama import DecoderConfig, LlamaEncoder
from biencoder.model.weights import ours_to_hf

FAMILIES = {
    "llama": (LlamaConfig, modeling_llama, "Llama"),
    "mistral": (MistralConfig, modeling_mistral, "Mistral"),
    "qwen2": (Qwen2Config, modeling_qwen2, "Qwen2"),
    "qwen3": (Qwen3Config, modeling_qwen3, "Qwen3"),
}
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=500.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Head size 6: wavelengths 6.3 (between 8 / 4 and 8: interpolated), 50 and 395
    # (stretched).
    original_max_position_embeddings=8,
)
# (family, checkpoint class, tokenizer adds BOS, config fields).
CASES = {
    "llama3": (
        "llama",
        AutoModelForCausalLM,
        True,
        dict(
            hidden_size=36,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=50,
            num_hidden_layers=3,
            rope_parameters=LLAMA3,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            pad_token_id=2,
        ),
    ),
    "llama-linear": (
        "llama",
        AutoModel,
        True,
        dict(
            hidden_size=35,
            head_dim=8,
            num_attention_heads=5,
            num_key_value_heads=1,
            intermediate_size=44,
            num_hidden_layers=2,
            rope_parameters=dict(rope_type="linear", rope_theta=300.0, factor=3.0),
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "mistral": (
        "mistral",
        AutoModelForCausalLM,
        False,
        dict(
            hidden_size=36,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=40,
            num_hidden_layers=2,
            rope_parameters=dict(rope_type="default", rope_theta=1000.0),
            sliding_window=4,
            pad_token_id=2,
        ),
    ),
    "qwen2": (
        "qwen2",
        AutoModel,
        False,
        dict(
            hidden_size=40,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=36,
            num_hidden_layers=3,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        "qwen3",
        AutoModelForCausalLM,
        False,
        dict(
            hidden_size=30,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=34,
            num_hidden_layers=2,
            rope_parameters=dict(rope_type="default", rope_theta=100.0),
            attention_bias=True,
            pad_token_id=2,
        ),
    ),
}
MAX_POSITIONS = 40
# Of different lengths, all longer than the windows; the last is cut at the model's limit.
TEXTS = [
    "a short one",
    "Grüße aus Köln, am Rhein.",
    "A longer passage, which is cut where the positions end. " * 2,
]
MODES = pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])


def save_checkpoint(case: str, folder: Path) -> Path:
    """An HF folder as transformers writes it: config.json, weights, tokenizer."""
    family, model_class, adds_bos, fields = CASES[case]
    tokenizer = decoder_byte_tokenizer(adds_bos)
    config = FAMILIES[family][0](
        vocab_size=len(tokenizer),
        bos_token_id=0,
        eos_token_id=1,
        max_position_embeddings=MAX_POSITIONS,
        **fields,
    )
    return save_random_checkpoint(model_class, config, tokenizer, folder)


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory) -> Path:
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(checkpoint) -> BiEncoder:
    return BiEncoder.from_pretrained(checkpoint, pooling="last_token")


def rms_in_dtype(self, hidden_states):
    """transformers' RMSNorm without its cast to float32."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def eager_in_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager_attention_forward with the softmax in the inputs' dtype."""
    groups = module.num_key_value_groups
    key = modeling_llama.repeat_kv(key, groups)
    value = modeling_llama.repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture
def reference(monkeypatch):
    """Loads transformers' model with eager attention, in a dtype."""

    def load(folder: Path, dtype: torch.dtype) -> nn.Module:
        if dtype == torch.float64:
            for _, module, prefix in FAMILIES.values():
                monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", rms_in_dtype)
                monkeypatch.setattr(module, "eager_attention_forward", eager_in_dtype)
        model = AutoModel.from_pretrained(folder, attn_implementation="eager")
        return model.eval().to(dtype)

    return load


def given_masks(model: nn.Module, mask: torch.Tensor, dtype: torch.dtype, causal: bool = False):
    """transformers' attention_mask argument for attention both ways (or causal): additive
    [B, 1, L, L] masks, a key allowed where it is real, not after the query where
    ``causal``, and, on a sliding layer, fewer than sliding_window positions away; one per
    layer type where the model keys its masks by layer type."""
    config = model.config
    L = mask.shape[1]
    index = torch.arange(L)
    distance = index[:, None] - index[None, :]  # query minus key

    def additive(window: int | None) -> torch.Tensor:
        allowed = mask.bool()[:, None, None, :].expand(-1, 1, L, L)
        if window is not None:
            allowed = allowed & (distance.abs() < window)
        if causal:
            allowed = allowed & (distance >= 0)
        zeros = torch.zeros(allowed.shape, dtype=dtype)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)

    if config.model_type == "mistral":
        return additive(config.sliding_window)
    if config.model_type == "llama":
        return additive(None)
    return {"full_attention": additive(None), "sliding_attention": additive(config.sliding_window)}


def encoder_of(
    model: BiEncoder, dtype: torch.dtype, unpadded: bool, bidirectional: bool = False
) -> LlamaEncoder:
    encoder = parity.encoder_of(model, dtype, unpadded)
    encoder.bidirectional = bidirectional
    return encoder


def tokenize(model: BiEncoder, side: str) -> dict[str, torch.Tensor]:
    """TEXTS as the bi-encoder tokenizes them, padded on ``side``, the longest cut at the
    model's limit."""
    model = copy.deepcopy(model)
    model.tokenizer.padding_side = side
    batch = model.tokenize(TEXTS, kind="doc", max_length=MAX_POSITIONS)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS) and max(lengths) == MAX_POSITIONS
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position. [B]"""
    return mask.shape[1] - 1 - mask.flip(1).int().argmax(1)


@DTYPES
@PATHS
@SIDES
@MODES
def test_every_layer_matches_transformers(
    checkpoint, loaded, reference, dtype, tolerance, unpadded, side, bidirectional
):
    """Our ``num_layers=k`` is layer k's output through the final norm (what a decoder cut
    at k layers computes); transformers' hidden_states[k] is before it but for the last."""
    batch = tokenize(loaded, side)
    real = batch["attention_mask"].bool()
    encoder = encoder_of(loaded, dtype, unpadded, bidirectional)
    theirs = reference(checkpoint, dtype)
    mask = batch["attention_mask"]
    if bidirectional:
        mask = given_masks(theirs, mask, dtype)
    with torch.no_grad():
        output = theirs(batch["input_ids"], attention_mask=mask, output_hidden_states=True)
        layers = encoder.config.num_hidden_layers
        assert len(output.hidden_states) == layers + 1
        for k in range(layers + 1):
            if k < layers:
                expected = theirs.norm(output.hidden_states[k])
            else:
                expected = output.last_hidden_state
            actual = encoder(batch["input_ids"], batch["attention_mask"], num_layers=k)
            assert_close(actual[real], expected[real], tolerance, f"layer {k}")


def test_a_4d_mask_replaces_the_causal_one(checkpoint, loaded):
    """The bidirectional oracle's premise: transformers applies a 4D mask it is given as it
    is, so a causal one given reproduces its own, and ours differs."""
    batch = tokenize(loaded, "right")
    theirs = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        plain = theirs(**batch).last_hidden_state
        masks = given_masks(theirs, batch["attention_mask"], torch.float32)
        both_ways = theirs(batch["input_ids"], attention_mask=masks).last_hidden_state
        masks = given_masks(theirs, batch["attention_mask"], torch.float32, causal=True)
        given = theirs(batch["input_ids"], attention_mask=masks).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(given[real], plain[real], rtol=0, atol=1e-6)
    assert (both_ways[real] - plain[real]).abs().max() > 0.1


@DTYPES
@PATHS
@SIDES
def test_last_token_embedding_and_gradients_match_transformers(
    checkpoint, loaded, reference, seed, dtype, tolerance, unpadded, side
):
    batch = tokenize(loaded, side)
    mask = batch["attention_mask"]
    rows = torch.arange(len(TEXTS))
    # The bi-encoder's tokenizer ends every text with EOS, where last_token pools.
    assert (batch["input_ids"][rows, last_real(mask)] == loaded.tokenizer.eos_token_id).all()
    tower = copy.deepcopy(loaded.query_tower).to(dtype)
    tower.encoder.unpadded = unpadded
    theirs = reference(checkpoint, dtype)
    upstream = torch.randn(len(TEXTS), tower.dim, dtype=dtype)  # non-unit, per coordinate

    pooled = tower(batch["input_ids"], mask)  # [B, H]
    (pooled * upstream).sum().backward()
    states = theirs(**batch).last_hidden_state
    expected = states[rows, last_real(mask)]
    (expected * upstream).sum().backward()

    assert_close(pooled.detach(), expected.detach(), tolerance)
    model_type = tower.encoder.config.model_type
    hf = dict(theirs.named_parameters())
    ours = dict(tower.encoder.named_parameters())
    assert {ours_to_hf(name, model_type) for name in ours} == set(hf)
    for name, p in ours.items():
        assert_close(p.grad, hf[ours_to_hf(name, model_type)].grad, tolerance, name)


def test_config_reads_what_transformers_runs(checkpoint):
    ours = read_config(checkpoint / "config.json")
    theirs = AutoModel.from_pretrained(checkpoint).config
    assert isinstance(ours, DecoderConfig)
    assert ours.kv_heads == theirs.num_key_value_heads
    assert (
        ours.head_size == getattr(theirs, "head_dim", None)
        or theirs.hidden_size // theirs.num_attention_heads
    )
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rope_type == theirs.rope_parameters["rope_type"]
    types = getattr(theirs, "layer_types", None)
    for layer in range(ours.num_hidden_layers):
        if theirs.model_type == "mistral":
            sliding = theirs.sliding_window is not None
        else:
            sliding = types is not None and types[layer] == "sliding_attention"
        expected = theirs.sliding_window - 1 if sliding and theirs.sliding_window else None
        assert ours.window(layer) == expected, layer
    assert any(ours.window(i) for i in range(ours.num_hidden_layers)) == (
        ours.model_type in ("mistral", "qwen2")
    )


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_theta=321.0),
        dict(rope_theta=99.0, rope_scaling=dict(type="linear", factor=2.5)),
        dict(rope_theta=77.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"}),
    ],
    ids=["default", "linear", "llama3"],
)
def test_a_config_json_of_transformers_4_reads_the_same(tmp_path, rope):
    """Hub configs of transformers 4 keep rope_theta and rope_scaling at the top level."""
    path = tmp_path / "config.json"
    fields = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    path.write_text(json.dumps(fields | rope))
    ours, theirs = read_config(path), LlamaConfig.from_pretrained(tmp_path)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rope_type == theirs.rope_parameters["rope_type"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text(json.dumps(ours.to_hf_dict()))
    assert read_config(new / "config.json") == ours


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}),
            "field 'rope_parameters': rope_type 'yarn' is not supported",
        ),
        (
            dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
            "field 'rope_scaling': rope_type 'dynamic' is not supported",
        ),
        (
            dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
            "partial_rotary_factor 0.5 is not supported",
        ),
        (dict(hidden_size=36, num_attention_heads=4), "field 'head_dim': 9 is odd"),
        (dict(num_key_value_heads=3), "field 'num_key_value_heads'"),
        (dict(hidden_act="relu2"), "field 'hidden_act': 'relu2' is not supported"),
    ],
    ids=["rope_type", "rope_scaling", "partial", "odd_head", "kv_heads", "activation"],
)
def test_config_errors_name_the_file_and_field(tmp_path, fields, message):
    path = tmp_path / "config.json"
    base = dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    path.write_text(json.dumps(base | fields))
    with pytest.raises(ValueError) as err:
        read_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_the_checkpoint_loads_whatever_its_wrapper(checkpoint, loaded):
    names = load_file(checkpoint / "model.safetensors").keys()
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    if architecture.endswith("ForCausalLM"):
        assert all(n.startswith(("model.", "lm_head.")) for n in names)
    hf = AutoModel.from_pretrained(checkpoint).state_dict()
    ours = loaded.query_tower.encoder.state_dict()
    assert {ours_to_hf(name, loaded.query_tower.encoder.config.model_type) for name in ours} == set(
        hf
    )
    for name, tensor in ours.items():
        assert torch.equal(
            tensor, hf[ours_to_hf(name, loaded.query_tower.encoder.config.model_type)]
        ), name


def test_gradient_checkpointing_gives_the_same_gradients(loaded, seed):
    assert_checkpointing_keeps_gradients(loaded.query_tower.encoder)


def test_the_nested_kernel(loaded):
    """Refuses causal attention and windows; bidirectional without a window, it gives the
    padded kernel's states."""
    model = copy.deepcopy(loaded)
    model.set_attention("nested")
    with pytest.raises(ValueError, match=r"attention='nested' has no (causal mask|sliding window)"):
        model.encode(TEXTS)
    encoder = model.query_tower.encoder
    encoder.bidirectional = True
    if any(layer.attn.window is not None for layer in encoder.layers):
        with pytest.raises(ValueError, match="attention='nested' has no sliding window"):
            model.encode(TEXTS)
        return
    nested = model.encode(TEXTS)
    model.set_attention("padded")
    torch.testing.assert_close(nested, model.encode(TEXTS), rtol=0, atol=1e-6)


def test_save_loads_back_in_transformers_with_equal_states(checkpoint, loaded, tmp_path):
    loaded.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    theirs = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert saved["architectures"] == [type(theirs).__name__]
    assert type(reloaded) is type(theirs)
    fields = (
        "rope_parameters",
        "sliding_window",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
    )
    for field in (*fields, "tie_word_embeddings", "attention_bias", "mlp_bias", "layer_types"):
        assert getattr(reloaded.config, field, None) == getattr(theirs.config, field, None), field
    for side in ("right", "left"):
        assert_equal_states(reloaded, theirs, tokenize(loaded, side))


@pytest.mark.parametrize(
    "options",
    [
        dict(pooling="last_token"),
        dict(pooling="mean", normalize=False, projection_dim=8),
        dict(pooling="last_token", num_layers=1),
    ],
    ids=["last-normalized", "mean-dense-raw", "layer-1"],
)
def test_save_loads_in_sentence_transformers_to_the_same_embeddings(
    checkpoint, tmp_path, seed, options
):
    model = BiEncoder.from_pretrained(checkpoint, **options)
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    assert_sentence_transformers_round_trip(
        model, tmp_path, TEXTS, (architecture.replace("ForCausalLM", "Model"),)
    )


def test_bidirectional_is_saved_and_changes_the_embeddings(checkpoint, tmp_path):
    causal = BiEncoder.from_pretrained(checkpoint, pooling="last_token")
    model = BiEncoder.from_pretrained(checkpoint, pooling="last_token", bidirectional=True)
    assert model.query_tower.encoder.bidirectional and not causal.query_tower.encoder.bidirectional
    expected = model.encode(TEXTS)
    assert (expected - causal.encode(TEXTS)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "biencoder.json").read_text())["bidirectional"] is True
    assert torch.equal(BiEncoder.from_pretrained(tmp_path).encode(TEXTS), expected)
    overridden = BiEncoder.from_pretrained(tmp_path, bidirectional=False).encode(TEXTS)
    torch.testing.assert_close(overridden, causal.encode(TEXTS), rtol=0, atol=1e-6)


def test_encoders_refuse_the_bidirectional_option(minilm_path):
    with pytest.raises(ValueError, match=r"^bidirectional: .*config.json holds a 'bert' encoder"):
        BiEncoder.from_pretrained(minilm_path, bidirectional=True)


def test_append_eos_false_pools_the_texts_own_last_token(checkpoint, tmp_path):
    model = BiEncoder.from_pretrained(
        checkpoint, pooling="last_token", append_eos=False, max_length=MAX_POSITIONS
    )
    ids = model.token_ids(TEXTS, kind="doc")["input_ids"]
    # The folder's own tokenization, untouched: what mean pooling (no EOS) gets.
    plain = BiEncoder.from_pretrained(checkpoint, pooling="mean")
    assert ids == plain.token_ids(TEXTS, kind="doc")["input_ids"]
    assert all(row[-1] != model.tokenizer.eos_token_id for row in ids)
    batch = tokenize(model, "right")
    mask = batch["attention_mask"]
    theirs = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        states = theirs(**batch).last_hidden_state[torch.arange(len(TEXTS)), last_real(mask)]
    expected = nn.functional.normalize(states, dim=-1)
    assert_close(model.encode(TEXTS, kind="doc"), expected, 1e-5)
    with_eos = BiEncoder.from_pretrained(checkpoint, pooling="last_token")
    assert (with_eos.encode(TEXTS) - model.encode(TEXTS)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "biencoder.json").read_text())["append_eos"] is False
    torch.testing.assert_close(
        BiEncoder.from_pretrained(tmp_path).encode(TEXTS), model.encode(TEXTS)
    )


def test_append_eos_true_ends_texts_with_eos_under_any_pooling(checkpoint):
    mean = BiEncoder.from_pretrained(checkpoint, pooling="mean")
    model = BiEncoder.from_pretrained(checkpoint, pooling="mean", append_eos=True)
    ids = model.token_ids(TEXTS[:2], kind="doc")["input_ids"]
    assert ids == [
        [*row, model.tokenizer.eos_token_id]
        for row in mean.token_ids(TEXTS[:2], "doc")["input_ids"]
    ]
    assert (model.encode(TEXTS[:2]) - mean.encode(TEXTS[:2])).abs().max() > 1e-3


def test_append_eos_false_is_refused_where_the_tokenizer_appends_it_itself(checkpoint, tmp_path):
    # A folder saved by a last-token bi-encoder keeps the EOS in its tokenizer.json.
    BiEncoder.from_pretrained(checkpoint, pooling="last_token").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^append_eos: false, but the tokenizer of .* ends every"):
        BiEncoder.from_pretrained(tmp_path, append_eos=False)


def test_encoders_refuse_the_append_eos_option(minilm_path):
    with pytest.raises(ValueError, match=r"^append_eos: .*config.json holds a 'bert' encoder"):
        BiEncoder.from_pretrained(minilm_path, append_eos=True)


SUFFIX = '" means in one word:"'


@pytest.mark.parametrize("append_eos", [None, False], ids=["then_eos", "alone"])
def test_the_suffix_ends_every_text_after_truncation(checkpoint, tmp_path, append_eos):
    plain = BiEncoder.from_pretrained(checkpoint, pooling="mean", max_length=MAX_POSITIONS)
    model = BiEncoder.from_pretrained(
        checkpoint,
        pooling="last_token",
        suffix=SUFFIX,
        append_eos=append_eos,
        max_length=MAX_POSITIONS,
    )
    ending = model.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
    if append_eos is None:
        ending = [*ending, model.tokenizer.eos_token_id]
    ids = model.token_ids(TEXTS, kind="query")["input_ids"]
    for row, bare in zip(ids, plain.token_ids(TEXTS, kind="query")["input_ids"], strict=True):
        # The longest text is cut to make room: the ending is never truncated away.
        kept = min(len(bare), MAX_POSITIONS - len(ending))
        assert row == [*bare[:kept], *ending]
    assert len(ids[-1]) == MAX_POSITIONS
    without = BiEncoder.from_pretrained(
        checkpoint, pooling="last_token", append_eos=append_eos, max_length=MAX_POSITIONS
    )
    assert (model.encode(TEXTS) - without.encode(TEXTS)).abs().max() > 1e-3
    # Saved: sentence-transformers tokenizes as we do; our loader finds the folder's tokenizer
    # ending texts so already and does not add the ending twice.
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    assert_sentence_transformers_round_trip(
        model, tmp_path, TEXTS, (architecture.replace("ForCausalLM", "Model"),)
    )
    assert json.loads((tmp_path / "biencoder.json").read_text())["suffix"] == SUFFIX
    assert BiEncoder.from_pretrained(tmp_path).token_ids(TEXTS, kind="query")["input_ids"] == ids


def test_encoders_refuse_a_suffix(minilm_path):
    with pytest.raises(ValueError, match=r"^suffix: .*config.json holds a 'bert' encoder"):
        BiEncoder.from_pretrained(minilm_path, suffix="!")
