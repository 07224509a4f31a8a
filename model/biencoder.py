"""The bi-encoder: text -> tokens -> encoder -> pooling -> projection -> normalisation.

    model = BiEncoder.from_pretrained(folder, pooling="mean", normalize=True)
    q = model.encode(queries, kind="query")   # [len(queries), dim]
    d = model.encode(docs, kind="doc")
    model.save_pretrained(out)                 # loads here and in SentenceTransformer(out)

Queries and documents share one tower by default; ``shared=False`` gives each its own
copy of the encoder (asymmetric towers), initialised from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from biencoder.model.attention import CHOICES as ATTENTION_CHOICES
from biencoder.model.backbone import AnyEncoder, build_encoder, read_config
from biencoder.model.bert import Packing
from biencoder.model.llama import DECODER_TYPES, DecoderConfig, LlamaEncoder
from biencoder.model.lora import (
    NO_LORA,
    LoraSettings,
    add_lora,
    merged,
    save_adapter_state,
)
from biencoder.model.pooling import POOLING_HEADS, AttentionPooling, build_pooling
from biencoder.model.tokenizer import decoder_tokenizer, ends_with_eos, load_tokenizer
from biencoder.model.weights import find_weights, load_hf_weights, read_state_dict, save_hf_weights
from biencoder.runtime.device import bf16_supported

log = logging.getLogger(__name__)

Kind = Literal["query", "doc"]
Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")
CONFIG_NAME = "biencoder.json"
DOC_TOWER_DIR = "doc_tower"
POOLING_DIR, DENSE_DIR, NORMALIZE_DIR = "1_Pooling", "2_Dense", "3_Normalize"
# Texts are cut to max_length * MAX_CHARS_PER_TOKEN characters before tokenising, because
# the tokenizer tokenises the whole string before truncating it to max_length tokens (a
# 20 MB line took 3.4 GB). No WordPiece token is longer than 18 characters in BERT's
# vocabulary, and SciFact abstracts average 4.6 characters per token (6.3 at most, spaces
# included), so the first max_length * 64 characters hold the first max_length tokens of
# any text that is not mostly whitespace or words over 100 characters (one [UNK] each,
# whatever their length): tokens past the cut would have been truncated anyway. Shorter
# texts are not touched.
MAX_CHARS_PER_TOKEN = 64
# Our pooling names -> sentence-transformers' legacy flags (read by every ST version).
_ST_POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "last_token": "pooling_mode_lasttoken",
}
_ST_FLAG_TO_POOLING = {flag: name for name, flag in _ST_POOLING_FLAGS.items()}
# sentence-transformers >= 6 names its modes with one string.
_ST_POOLING_MODES = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "weightedmean": "weighted_mean",
    "lasttoken": "last_token",
}


@dataclass
class BiEncoderConfig:
    """How token states become an embedding; saved as ``biencoder.json``."""

    pooling: str = "mean"
    normalize: bool = True
    projection_dim: int | None = None
    max_length: int = 512
    query_prefix: str = ""
    doc_prefix: str = ""
    shared: bool = True
    num_layers: int | None = None  # pool this layer's output; None = the last layer
    # Decoders only: attend to later tokens too (LLM2Vec, GritLM); None = causal, as trained.
    bidirectional: bool | None = None
    # Decoders only: end each text with the tokenizer's EOS; None = where pooling is
    # last_token (E5-Mistral, Qwen3-Embedding). False pools the text's own last token.
    append_eos: bool | None = None
    # Decoders only: text the tokenizer ends every query and document with, after truncation
    # and before the EOS (PromptEOL's '" means in one word:"'), where last_token pools.
    suffix: str = ""


class Tower(nn.Module):
    """One encoder with its pooling head and optional projection: tokens -> [B, dim]."""

    def __init__(
        self,
        encoder: AnyEncoder,
        pooling: str,
        projection_dim: int | None,
        num_layers: int | None = None,
    ):
        super().__init__()
        H = encoder.config.hidden_size
        self.encoder = encoder
        self.pooling = build_pooling(pooling, H)
        self.projection = nn.Linear(H, projection_dim) if projection_dim else None
        self.num_layers = num_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, self.num_layers, packing)
        pooled = self.pooling(hidden, attention_mask)  # [B, H]
        return self.projection(pooled) if self.projection is not None else pooled

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return self.projection.out_features
        return self.encoder.config.hidden_size


def truncate_embeddings(emb: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation: keep the first ``dim`` coordinates, re-normalising if asked."""
    if dim is None or dim == emb.shape[-1]:
        return emb
    if not 0 < dim <= emb.shape[-1]:
        raise ValueError(f"truncation dim {dim} outside (0, {emb.shape[-1]}]")
    emb = emb[..., :dim]
    return F.normalize(emb, dim=-1) if normalize else emb


class BiEncoder(nn.Module):
    def __init__(
        self,
        config: BiEncoderConfig,
        query_tower: Tower,
        tokenizer: PreTrainedTokenizerBase,
        doc_tower: Tower | None = None,
    ):
        super().__init__()
        if config.shared != (doc_tower is None):
            raise ValueError("pass a doc_tower exactly when config.shared is False")
        self.config = config
        self.query_tower = query_tower
        self.doc_tower = doc_tower
        self.tokenizer = tokenizer
        # Texts cut by characters before tokenising (see MAX_CHARS_PER_TOKEN), since loading.
        self.texts_cut = 0
        # encode's precision when a call names none: evaluation code calls encode in many
        # places, and an entry point sets this once instead of passing it to each.
        self.precision: Precision = "fp32"
        # The adapters' settings where from_pretrained put LoRA on the encoders.
        self.lora: LoraSettings | None = None

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        projection_dim: int | None = None,
        max_length: int | None = None,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        shared: bool | None = None,
        num_layers: int | None = None,
        bidirectional: bool | None = None,
        append_eos: bool | None = None,
        suffix: str | None = None,
        attention: str = "auto",
        lora: LoraSettings = NO_LORA,
        device: str | torch.device | None = None,
    ) -> BiEncoder:
        """Load a folder written by ``save_pretrained``, by sentence-transformers, or a
        plain HF BERT, RoBERTa, XLM-RoBERTa, ModernBERT, Llama, Mistral, Qwen2 or Qwen3
        checkpoint, or a Llama-architecture GGUF file (converted once, :func:`model_folder`).
        Arguments left as None come from the folder's own configuration (``biencoder.json``,
        else sentence-transformers' module files, else mean pooling, normalised); given ones
        override it. ``bidirectional=True`` lets a decoder's tokens attend to later ones too
        (LLM2Vec, GritLM), which changes the embeddings and is saved; encoders refuse the
        option. A decoder pooled with ``last_token`` gets a
        tokenizer that ends each text with its end-of-sequence token, where it did not;
        ``append_eos`` says otherwise (False: the text's own last token is pooled; True: EOS
        ends every text whatever the pooling); ``suffix`` is text the tokenizer ends every
        text with, before that EOS, where truncation cannot cut it. Encoders refuse both.
        ``attention`` picks the kernel of the encoders' attention over packed tokens
        (:meth:`set_attention`); it changes speed, not the embeddings, and is not saved.
        ``lora`` with ``r > 0`` puts LoRA adapters on each encoder and freezes the rest of it
        (``model.lora``); ``save_pretrained`` then writes the merged model and the adapters.
        Like ``transformers``, the model comes back in eval mode: call ``.train()`` to
        enable dropout."""
        check_load_arguments(pooling, projection_dim, max_length, num_layers, attention)
        path = model_folder(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
        saved = _read_saved_config(path)
        overrides = {
            "pooling": pooling,
            "normalize": normalize,
            "projection_dim": projection_dim,
            "max_length": max_length,
            "query_prefix": query_prefix,
            "doc_prefix": doc_prefix,
            "shared": shared,
            "num_layers": num_layers,
            "bidirectional": bidirectional,
            "append_eos": append_eos,
            "suffix": suffix,
        }
        config = dataclasses.replace(saved, **{k: v for k, v in overrides.items() if v is not None})
        encoder_config = read_config(path / "config.json")
        decoder = isinstance(encoder_config, DecoderConfig)
        if config.bidirectional is not None and not decoder:
            raise ValueError(
                f"bidirectional: {path / 'config.json'} holds a "
                f"{encoder_config.model_type!r} encoder, which attends both ways already; "
                f"only decoders ({', '.join(DECODER_TYPES)}) take the option"
            )
        endings = {"append_eos": config.append_eos is not None, "suffix": bool(config.suffix)}
        given = [key for key, set_ in endings.items() if set_]
        if given and not decoder:
            raise ValueError(
                f"{given[0]}: {path / 'config.json'} holds a {encoder_config.model_type!r} "
                "encoder, whose tokenizer ends texts with its own special tokens; only "
                f"decoders ({', '.join(DECODER_TYPES)}) take the option"
            )
        if config.max_length > encoder_config.max_tokens:
            raise ValueError(
                f"max_length: {config.max_length} tokens exceed the "
                f"{encoder_config.max_tokens} positions of {path / 'config.json'}"
            )
        if config.num_layers is not None and config.num_layers > encoder_config.num_hidden_layers:
            raise ValueError(
                f"num_layers: {config.num_layers} is more than the model's "
                f"{encoder_config.num_hidden_layers} layers"
            )
        tokenizer = load_tokenizer(path, encoder_config.vocab_size)
        if decoder:
            append = config.append_eos
            tokenizer = decoder_tokenizer(
                tokenizer,
                path,
                config.pooling == "last_token" if append is None else append,
                config.suffix,
            )
            if append is False and ends_with_eos(tokenizer):
                raise ValueError(
                    f"append_eos: false, but the tokenizer of {path} ends every text with "
                    f"{tokenizer.eos_token!r} by itself; load the base model's tokenizer files "
                    "into the folder, or leave append_eos unset"
                )
        heads_match = (
            config.pooling == saved.pooling and config.projection_dim == saved.projection_dim
        )
        query_tower = _load_tower(path, config, load_heads=heads_match)
        doc_tower = None
        if not config.shared:
            doc_path = path / DOC_TOWER_DIR
            if doc_path.is_dir():
                doc_tower = _load_tower(doc_path, config, load_heads=heads_match)
            else:
                doc_tower = copy.deepcopy(query_tower)
        if lora.enabled:
            for tower in (query_tower, doc_tower):
                if tower is not None:
                    add_lora(tower.encoder, lora)
        # eval() after the adapters, whose dropout layers are made in training mode.
        model = cls(config, query_tower, tokenizer, doc_tower).eval()
        model.set_attention(attention)
        model.lora = lora if lora.enabled else None
        return model.to(device) if device is not None else model

    # ------------------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | Path) -> None:
        """Write a folder that ``BiEncoder.from_pretrained`` and
        ``sentence_transformers.SentenceTransformer`` both load to the same embeddings.
        A model with LoRA adapters is saved merged, plus its adapters and heads in
        ``adapter/`` (``model.lora.load_adapter_state`` reads them back)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # A tower pooled from an intermediate layer is saved cut at that layer, so the
        # checkpoint means the same thing to loaders that always use the last layer.
        config = dataclasses.replace(self.config, num_layers=None)
        (path / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        self.tokenizer.save_pretrained(str(path))
        adapted = self.lora is not None
        _save_tower(self.query_tower, path, self.config, adapted)
        if self.doc_tower is not None:
            _save_tower(self.doc_tower, path / DOC_TOWER_DIR, self.config, adapted)
            log.warning(
                "%s: separate towers; sentence-transformers will load the query tower "
                "only; use BiEncoder.from_pretrained for documents",
                path,
            )
        if self.lora is not None:
            save_adapter_state(self, self.lora, path)

    # ---------------------------------------------------------------------------- encoding

    @property
    def dim(self) -> int:
        return self.query_tower.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tower(self, kind: Kind) -> Tower:
        if kind not in ("query", "doc"):
            raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
        return self.doc_tower if kind == "doc" and self.doc_tower is not None else self.query_tower

    def _tokenizer_input(self, texts: list[str], kind: Kind, max_length: int) -> list[str]:
        """Each text cut to the character budget of ``max_length`` tokens (see
        ``MAX_CHARS_PER_TOKEN``), then prefixed."""
        budget = max_length * MAX_CHARS_PER_TOKEN
        cut = sum(len(t) > budget for t in texts)
        if cut:
            # Once at WARNING, then DEBUG: training at a short max_length cuts the same long
            # documents batch after batch; texts_cut keeps the count.
            self.texts_cut += cut
            log.log(
                logging.WARNING if self.texts_cut == cut else logging.DEBUG,
                "cut %d of %d texts to their first %d characters (%d tokens x %d) before "
                "tokenising; their tokens past max_length are dropped anyway (%d so far)",
                cut,
                len(texts),
                budget,
                max_length,
                MAX_CHARS_PER_TOKEN,
                self.texts_cut,
            )
            texts = [t[:budget] for t in texts]
        prefix = self.config.query_prefix if kind == "query" else self.config.doc_prefix
        return [prefix + t for t in texts] if prefix else list(texts)

    def tokenize(
        self, texts: list[str], kind: Kind, max_length: int | None = None
    ) -> dict[str, torch.Tensor | Packing]:
        """Prefix, truncate to ``max_length`` (the config's unless given) and pad to the
        longest text in the batch. Texts longer than ``max_length * MAX_CHARS_PER_TOKEN``
        characters are cut to that before tokenising, with a warning.

        Besides the tokenizer's tensors, ``"packing"`` holds the batch's
        :class:`~biencoder.model.bert.Packing`, computed here on the host so that the
        encoder never has to read the mask back from a GPU."""
        max_length = max_length or self.config.max_length
        features = dict(
            self.tokenizer(
                self._tokenizer_input(texts, kind, max_length),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        return with_packing(features)

    def token_ids(
        self, texts: list[str], kind: Kind, max_length: int | None = None
    ) -> dict[str, list[list[int]]]:
        """Prefixed and truncated like :meth:`tokenize`, but unpadded: lists of ids per text,
        to be batched later with :meth:`pad` (e.g. texts of similar lengths together)."""
        max_length = max_length or self.config.max_length
        return dict(
            self.tokenizer(
                self._tokenizer_input(texts, kind, max_length),
                truncation=True,
                max_length=max_length,
            )
        )

    def pad(
        self, tokens: dict[str, list[list[int]]], rows: list[int]
    ) -> dict[str, torch.Tensor | Packing]:
        """Rows ``rows`` of :meth:`token_ids`'s output as one padded batch, as
        :meth:`tokenize` returns it (with its ``"packing"``)."""
        batch = self.tokenizer.pad(
            {k: [tokens[k][i] for i in rows] for k in tokens}, return_tensors="pt"
        )
        return with_packing(dict(batch))

    def forward(self, features: dict[str, torch.Tensor], kind: Kind) -> torch.Tensor:
        """Embeddings [B, dim] for a tokenized batch; differentiable (training path)."""
        return self._embed(features, kind, self.config.normalize)

    def _embed(
        self, features: dict[str, torch.Tensor], kind: Kind, normalize: bool
    ) -> torch.Tensor:
        emb = self.tower(kind)(
            features["input_ids"],
            features["attention_mask"],
            features.get("token_type_ids"),
            features.get("packing"),
        )
        return F.normalize(emb, dim=-1) if normalize else emb

    def set_unpadded(self, unpadded: bool) -> None:
        """Run every tower's encoder on packed real tokens (True, the default) or on the
        padded batch (False); see ``model.bert``. The embeddings are the same up to
        rounding."""
        for tower in (self.query_tower, self.doc_tower):
            if tower is not None:
                tower.encoder.unpadded = unpadded

    def set_attention(self, name: str) -> None:
        """Compute every tower's unpadded attention with the kernel ``name``: "auto" (the
        default), "padded", "varlen" or "nested"; see ``model.attention``. The embeddings
        are the same up to rounding."""
        if name not in ATTENTION_CHOICES:
            raise ValueError(
                f"unknown attention {name!r}; choose one of {', '.join(ATTENTION_CHOICES)}"
            )
        for tower in (self.query_tower, self.doc_tower):
            if tower is not None:
                tower.encoder.attention = name

    @contextlib.contextmanager
    def encoding_precision(self, precision: Precision) -> Iterator[None]:
        """``encode`` calls that name no precision use ``precision`` inside the block."""
        self._precision_context(precision)  # refuses an unknown or unsupported one now
        saved, self.precision = self.precision, precision
        try:
            yield
        finally:
            self.precision = saved

    def _precision_context(self, precision: Precision) -> contextlib.AbstractContextManager:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp32":
            return contextlib.nullcontext()
        device = self.device
        if not bf16_supported(device):
            raise RuntimeError(
                f"precision='bf16': torch reports no bfloat16 support on {device} "
                "(CPU: oneDNN bf16 needs AVX-512 or AMX; CUDA: compute capability 8.0+); "
                "use precision='fp32'"
            )
        # Autocast runs the matrix products in bf16 and keeps the residual stream, layer
        # norms and pooling in fp32, which loses far less than casting the weights.
        return torch.autocast(device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def encode(
        self,
        texts: list[str],
        kind: Kind = "query",
        batch_size: int = 64,
        dim: int | None = None,
        show_progress: bool | None = None,
        normalize: bool | None = None,
        precision: Precision | None = None,
    ) -> torch.Tensor:
        """Embed ``texts`` -> float32 tensor [len(texts), dim] on the CPU, in input order.

        Texts are tokenized once and batched longest-first, so each batch pads to similar
        lengths and the first batch shows the peak memory at once. ``dim`` truncates
        (Matryoshka) and re-normalises when normalising. ``normalize`` overrides the
        config's ``normalize`` for this call: ``False`` gives the raw pooled (and projected)
        embeddings, e.g. to measure their norms. ``precision`` is "fp32" or "bf16" (matrix
        products in bfloat16 under autocast, where torch reports support for it; an error
        otherwise); None takes ``self.precision``. The progress bar shows for more than 10
        batches unless ``show_progress`` says otherwise. Texts longer than
        ``max_length * MAX_CHARS_PER_TOKEN`` characters are cut to that before tokenising,
        with a warning.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        if normalize is None:
            normalize = self.config.normalize
        autocast = self._precision_context(precision or self.precision)
        was_training = self.training
        self.eval()
        tokens = self.token_ids(texts, kind)
        order = sorted(range(len(texts)), key=lambda i: -len(tokens["input_ids"][i]))
        out = torch.empty(len(texts), dim or self.dim)
        starts = range(0, len(texts), batch_size)
        if show_progress is None:
            show_progress = len(starts) > 10
        for start in tqdm(starts, desc=f"encode {kind}s", unit="batch", disable=not show_progress):
            idx = order[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in self.pad(tokens, idx).items()}
            with autocast:
                emb = self._embed(batch, kind, normalize)
            out[idx] = truncate_embeddings(emb.float(), dim, normalize).cpu()
        self.train(was_training)
        return out


def with_packing(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Packing]:
    """``features`` (host tensors from the tokenizer) with their ``"packing"`` added."""
    return {**features, "packing": Packing.from_mask(features["attention_mask"])}


def embedding_dim(path: str | Path, projection_dim: int | None = None) -> int:
    """The width of the embeddings the folder ``path`` gives (with ``projection_dim`` as
    ``from_pretrained`` would apply it), read from its config files without loading
    weights."""
    if projection_dim is not None:
        return projection_dim
    path = model_folder(path)
    saved = _read_saved_config(path)
    if saved.projection_dim is not None:
        return saved.projection_dim
    return read_config(path / "config.json").hidden_size


def model_folder(path: str | Path) -> Path:
    """``path``, or for a GGUF file (llama.cpp's format) the Hugging Face folder it is
    converted to, once, in a cache (``model.gguf``)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        return path
    from biencoder.model.gguf import folder_from_gguf  # transformers' GGUF reader: slow import

    return folder_from_gguf(path)


def check_load_arguments(
    pooling: str | None,
    projection_dim: int | None,
    max_length: int | None,
    num_layers: int | None,
    attention: str = "auto",
) -> None:
    """Raise a ValueError for arguments of ``from_pretrained`` that are wrong whatever the
    folder (it calls this before reading any file)."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(
            f"attention: unknown kernel {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}"
        )
    if pooling is not None and pooling not in POOLING_HEADS:
        raise ValueError(
            f"pooling: unknown pooling {pooling!r}; choose one of {', '.join(POOLING_HEADS)}"
        )
    for name, value in (
        ("projection_dim", projection_dim),
        ("max_length", max_length),
        ("num_layers", num_layers),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be positive or null, got {value}")


# -------------------------------------------------------------------- folder layout helpers


def _read_saved_config(path: Path) -> BiEncoderConfig:
    """Our ``biencoder.json`` if present, else what sentence-transformers' files say."""
    if (path / CONFIG_NAME).is_file():
        raw = json.loads((path / CONFIG_NAME).read_text())
        known = {f.name for f in dataclasses.fields(BiEncoderConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path / CONFIG_NAME}: unknown fields {', '.join(unknown)}")
        # Checked here, or a bad saved value fails later without naming the file.
        try:
            check_load_arguments(
                raw.get("pooling"),
                raw.get("projection_dim"),
                raw.get("max_length"),
                raw.get("num_layers"),
            )
        except ValueError as err:
            raise ValueError(f"{path / CONFIG_NAME}: {err}") from err
        return BiEncoderConfig(**raw)
    config = BiEncoderConfig()
    encoder_config = read_config(path / "config.json")
    config.max_length = encoder_config.max_tokens
    st_bert = path / "sentence_bert_config.json"
    if st_bert.is_file():
        config.max_length = json.loads(st_bert.read_text()).get("max_seq_length", config.max_length)
    modules = path / "modules.json"
    if modules.is_file():
        types = [m["type"].rsplit(".", 1)[-1] for m in json.loads(modules.read_text())]
        config.normalize = "Normalize" in types
        config.pooling = _st_pooling_mode(path / POOLING_DIR / "config.json")
        if (path / DENSE_DIR / "config.json").is_file():
            dense = json.loads((path / DENSE_DIR / "config.json").read_text())
            config.projection_dim = dense["out_features"]
    prompts = path / "config_sentence_transformers.json"
    if prompts.is_file():
        saved_prompts = json.loads(prompts.read_text()).get("prompts") or {}
        config.query_prefix = saved_prompts.get("query", "")
        config.doc_prefix = saved_prompts.get("document", "")
    return config


def _st_pooling_mode(pooling_config: Path) -> str:
    raw = json.loads(pooling_config.read_text()) if pooling_config.is_file() else {}
    if isinstance(raw.get("pooling_mode"), str):
        mode = raw["pooling_mode"]
        if mode not in _ST_POOLING_MODES:
            raise ValueError(f"{pooling_config}: pooling mode {mode!r} has no BiEncoder equivalent")
        return _ST_POOLING_MODES[mode]
    modes = [name for flag, name in _ST_FLAG_TO_POOLING.items() if raw.get(flag)]
    if len(modes) > 1:
        raise ValueError(
            f"{pooling_config}: several pooling modes {modes}; BiEncoder pools with exactly one"
        )
    return modes[0] if modes else "mean"


def _load_tower(path: Path, config: BiEncoderConfig, load_heads: bool) -> Tower:
    encoder = build_encoder(read_config(path / "config.json"))
    load_hf_weights(encoder, find_weights(path), encoder.config.model_type)
    if isinstance(encoder, LlamaEncoder):
        encoder.bidirectional = bool(config.bidirectional)
    tower = Tower(encoder, config.pooling, config.projection_dim, config.num_layers)
    # Head weights saved for a different pooling/projection do not apply; fresh ones do.
    if load_heads and isinstance(tower.pooling, AttentionPooling):
        tower.pooling.load_state_dict(read_state_dict(path / POOLING_DIR / "model.safetensors"))
    if load_heads and tower.projection is not None:
        dense = read_state_dict(path / DENSE_DIR / "model.safetensors")
        tower.projection.load_state_dict({k.removeprefix("linear."): v for k, v in dense.items()})
    return tower


def _save_tower(tower: Tower, path: Path, config: BiEncoderConfig, adapted: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    encoder = merged(tower.encoder) if adapted else tower.encoder
    if tower.num_layers is not None and tower.num_layers < len(encoder.layers):
        kept = dataclasses.replace(encoder.config, num_hidden_layers=tower.num_layers)
        cut = build_encoder(kept)
        cut.load_state_dict(encoder.state_dict(), strict=False)
        encoder = cut
    (path / "config.json").write_text(json.dumps(encoder.config.to_hf_dict(), indent=2) + "\n")
    save_hf_weights(encoder, path / "model.safetensors", encoder.config.model_type)
    if config.bidirectional:
        log.warning(
            "%s: bidirectional attention; transformers and sentence-transformers run the "
            "decoder causally: this folder embeds correctly with BiEncoder.from_pretrained only",
            path,
        )

    hidden = encoder.config.hidden_size
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    (path / POOLING_DIR).mkdir(exist_ok=True)
    pooling_config = {"word_embedding_dimension": hidden}
    if isinstance(tower.pooling, AttentionPooling):
        save_file(
            {k: v.detach().cpu() for k, v in tower.pooling.state_dict().items()},
            path / POOLING_DIR / "model.safetensors",
        )
        log.warning(
            "%s: attention pooling has no sentence-transformers equivalent; this folder "
            "embeds correctly with BiEncoder.from_pretrained only",
            path,
        )
    else:
        pooling_config |= {
            flag: flag == _ST_POOLING_FLAGS[config.pooling] for flag in _ST_POOLING_FLAGS.values()
        }
        modules.append(
            {
                "idx": 1,
                "name": "1",
                "path": POOLING_DIR,
                "type": "sentence_transformers.models.Pooling",
            }
        )
    (path / POOLING_DIR / "config.json").write_text(json.dumps(pooling_config, indent=2) + "\n")
    if tower.projection is not None:
        (path / DENSE_DIR).mkdir(exist_ok=True)
        dense_config = {
            "in_features": hidden,
            "out_features": tower.projection.out_features,
            "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        }
        (path / DENSE_DIR / "config.json").write_text(json.dumps(dense_config, indent=2) + "\n")
        save_file(
            {
                f"linear.{k}": v.detach().cpu().contiguous()
                for k, v in tower.projection.state_dict().items()
            },
            path / DENSE_DIR / "model.safetensors",
        )
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": DENSE_DIR,
                "type": "sentence_transformers.models.Dense",
            }
        )
    if config.normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": NORMALIZE_DIR,
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    st_config = {"max_seq_length": config.max_length, "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2) + "\n")
    prompts = {"query": config.query_prefix, "document": config.doc_prefix}
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts, "default_prompt_name": None}, indent=2) + "\n"
    )
