"""``python train.py [model=<family>] model.path=DIR debug=tiny`` for a checkpoint of each
supported family as transformers saves it, and the run's final checkpoint in
sentence-transformers with the embeddings ``BiEncoder.from_pretrained`` gives.

The checkpoints are random and tiny (2 layers, 32 wide), with the tokenizers of
tests/parity.py (byte-level BPE) or, for BERT, the packaged MiniLM's WordPiece. Runs compose
the config in-process, as the command line does; one runs the command itself. Every family
takes about a second per run on one core.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from configs import compose_train, run_entry
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from parity import (
    EMBEDDING_TOLERANCE,
    decoder_byte_tokenizer,
    roberta_byte_tokenizer,
    save_random_checkpoint,
)
from sentence_transformers import SentenceTransformer
from tolerances import assert_close
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    XLMRobertaConfig,
)

from biencoder import train as train_cli
from biencoder.model.biencoder import BiEncoder

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Room for the decoder option's instruction (95 bytes, one token each) and a text after it;
# RoPE makes positions free.
DECODER = dict(
    SHAPE, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1
)
# family: (conf/model option, config class, checkpoint class, config fields). Windows
# (ModernBERT's local layers, Mistral's) shorter than debug=tiny's 32 tokens.
FAMILIES = {
    "bert": ("bert", BertConfig, AutoModel, dict(SHAPE, max_position_embeddings=64)),
    "roberta": (
        "roberta",
        RobertaConfig,
        AutoModelForMaskedLM,
        dict(SHAPE, max_position_embeddings=66, pad_token_id=1),
    ),
    "xlm-roberta": (
        "roberta",
        XLMRobertaConfig,
        AutoModel,
        dict(SHAPE, max_position_embeddings=66, pad_token_id=1),
    ),
    "modernbert": (
        "modernbert",
        ModernBertConfig,
        AutoModelForMaskedLM,
        dict(
            SHAPE,
            global_attn_every_n_layers=2,
            local_attention=8,
            max_position_embeddings=64,
            pad_token_id=2,
            bos_token_id=0,
            cls_token_id=0,
            eos_token_id=1,
            sep_token_id=1,
        ),
    ),
    "llama": ("decoder", LlamaConfig, AutoModelForCausalLM, DECODER),
    "qwen3": ("decoder", Qwen3Config, AutoModel, dict(DECODER, head_dim=8)),
    "mistral": ("decoder", MistralConfig, AutoModel, dict(DECODER, sliding_window=8)),
    "qwen2": ("decoder", Qwen2Config, AutoModelForCausalLM, DECODER),
}
# What each option pools: the published embedders' choice (see conf/model/*.yaml), which a
# folder's sentence-transformers files then carry.
POOLING = {"bert": "mean", "roberta": "mean", "modernbert": "mean", "decoder": "last_token"}
TEXTS = ["hi", "Grüße aus Köln.", "Aspirin lowers the risk of a first heart attack."]


def save_family(family: str, folder: Path, minilm_path: str) -> Path:
    """A random checkpoint of ``family`` with its tokenizer, as transformers saves them."""
    _, config_class, model_class, fields = FAMILIES[family]
    if family == "bert":
        tokenizer = AutoTokenizer.from_pretrained(minilm_path)
        gain = "LayerNorm.weight"
    elif family in ("roberta", "xlm-roberta"):
        tokenizer = roberta_byte_tokenizer(fields["pad_token_id"])
        gain = "LayerNorm.weight"
    elif family == "modernbert":
        tokenizer = roberta_byte_tokenizer(fields["pad_token_id"])
        gain = "norm.weight"
    else:
        tokenizer = decoder_byte_tokenizer(adds_bos=family == "llama")
        gain = "norm.weight"
    config = config_class(vocab_size=len(tokenizer), **fields)
    return save_random_checkpoint(model_class, config, tokenizer, folder, gain)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path):
    """``checkpoints(family)``: that family's folder, saved once per module."""
    saved: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_family(family, tmp_path_factory.mktemp(family), minilm_path)
        return saved[family]

    return get


def assert_loads_alike(folder: Path, architecture: str) -> BiEncoder:
    """``folder`` loads in sentence-transformers as ``architecture`` and embeds queries and
    documents (with the prompts it saved) as ``BiEncoder.from_pretrained`` does: at the
    saved max_length, and at the checkpoint's whole length, where the decoder option's
    queries are more than their instruction. Returns our model."""
    ours = BiEncoder.from_pretrained(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    assert type(st[0].auto_model).__name__ == architecture
    whole = ours.query_tower.encoder.config.max_tokens
    for length in (ours.config.max_length, whole):
        model = BiEncoder.from_pretrained(folder, max_length=length)
        st.max_seq_length = length
        for kind, prompt in (("query", "query"), ("doc", "document")):
            expected = model.encode(TEXTS, kind=kind)
            actual = st.encode(TEXTS, prompt_name=prompt, convert_to_tensor=True)
            assert_close(
                actual, expected, EMBEDDING_TOLERANCE, f"{kind} embeddings at {length} tokens"
            )
            if length == whole:
                # Three texts, three embeddings: not one vector compared thrice.
                assert torch.pdist(expected).min() > 1e-3, kind
    return ours


def trained(folder: Path, run_dir: Path, *option: str) -> Path:
    """The last checkpoint of ``python train.py [OPTION] model.path=FOLDER debug=tiny``."""
    cfg = compose_train(*option, f"model.path={folder}", "debug=tiny")
    train_cli.train(cfg, run_dir)
    assert (run_dir / "metrics.json").is_file()  # the final evaluation ran
    return run_dir / "checkpoints" / "last"


def base_architecture(folder: Path) -> str:
    """transformers' class of the checkpoint's bare model (what AutoModel builds)."""
    name = json.loads((folder / "config.json").read_text())["architectures"][0]
    return name.replace("ForMaskedLM", "Model").replace("ForCausalLM", "Model")


# One family per option in the default run; the others that share it are `slow`.
OPTION_CASES = [
    pytest.param(f, marks=pytest.mark.slow) if f in ("xlm-roberta", "mistral", "qwen2") else f
    for f in FAMILIES
]


@pytest.mark.parametrize("family", OPTION_CASES)
def test_the_family_option_trains_and_loads_in_sentence_transformers(
    family, checkpoints, tmp_path, one_thread
):
    folder = checkpoints(family)
    option = FAMILIES[family][0]
    last = trained(folder, tmp_path, f"model={option}")
    model = assert_loads_alike(last, base_architecture(folder))
    assert model.config.pooling == POOLING[option]
    assert model.config.max_length == 32  # debug=tiny's
    prefix = compose_train(f"model={option}", f"model.path={folder}").model.query_prefix
    assert model.config.query_prefix == (prefix or "")
    if option == "decoder":
        assert model.config.query_prefix.startswith("Instruct: ")
        # Every text ends with EOS, the token last_token pooling reads.
        ids = model.token_ids(TEXTS, kind="query")["input_ids"]
        assert all(row[-1] == model.tokenizer.eos_token_id for row in ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_alone_trains_and_loads_in_sentence_transformers(
    family, checkpoints, tmp_path, one_thread
):
    folder = checkpoints(family)
    last = trained(folder, tmp_path)
    model = assert_loads_alike(last, base_architecture(folder))
    # A transformers folder has no pooling of its own: mean, whatever the family.
    assert model.config.pooling == "mean"


def test_the_command_line_trains_a_decoder(checkpoints, tmp_path):
    """The command itself, through Hydra's main, for the family furthest from the default
    model."""
    folder = checkpoints("qwen3")
    run_dir = tmp_path / "run"
    run_entry(
        "train.py",
        "model=decoder",
        f"model.path={folder}",
        "debug=tiny",
        f"hydra.run.dir={run_dir}",
    )
    assert_loads_alike(run_dir / "checkpoints" / "last", "Qwen3Model")


@pytest.mark.parametrize("option", sorted(POOLING))
def test_each_option_is_typed_and_needs_a_path(option, tmp_path):
    # Typed: the schema checks the keys and their types at composition.
    cfg = compose_train(f"model={option}", "debug=tiny")
    assert dataclasses.is_dataclass(OmegaConf.get_type(cfg.model))
    with pytest.raises(MissingMandatoryValue, match=r"^Missing mandatory value: model\.path"):
        train_cli.train(cfg, tmp_path)


@pytest.mark.parametrize("family", ["roberta", "modernbert", "llama", "qwen3"])
def test_a_lora_run_saves_a_merged_model_of_each_family(family, checkpoints, tmp_path, one_thread):
    """LoRA on each family's block linears (ModernBERT's fused qkv and GeGLU, the decoders'
    q/k/v/gate): the merged checkpoint loads in sentence-transformers with our
    embeddings, its adapted weights moved and the frozen ones did not."""
    folder = checkpoints(family)
    last = trained(folder, tmp_path, f"model={FAMILIES[family][0]}", "model.lora.r=4")
    assert (last / "adapter" / "adapter_model.safetensors").is_file()
    model = assert_loads_alike(last, base_architecture(folder))
    base = BiEncoder.from_pretrained(folder).query_tower.encoder.state_dict()
    tuned = model.query_tower.encoder.state_dict()
    assert base.keys() == tuned.keys()
    for name in base:
        linear = ".layers." in f".{name}" and name.endswith(".weight") and base[name].ndim == 2
        assert torch.equal(base[name], tuned[name]) != linear, name
