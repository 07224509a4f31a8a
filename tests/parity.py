"""What the parity tests against transformers share (test_roberta, test_modernbert,
test_llama, test_families_cli): tiny tokenizers built in the test, random checkpoints saved
by transformers, and the round trips of a saved bi-encoder through transformers.AutoModel
and sentence-transformers.

The tokenizers are byte-level BPE with no merges (one token per byte), so that any text
tokenizes without a vocabulary file and the special tokens sit at the ids a test chooses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tolerances import assert_close
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerFast, RobertaTokenizer

from biencoder.model.biencoder import BiEncoder

# (dtype, tolerance relative to the largest expected magnitude). Measured on RoBERTa: states
# within 4 eps of transformers', gradients within 38 eps (those of the attention weights,
# whose terms cancel most). Float64 shows what float32 rounding would hide (see
# test_encoder); float32 is what runs.
DTYPES = pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-13), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
PATHS = pytest.mark.parametrize("unpadded", [True, False], ids=["unpadded", "padded"])
SIDES = pytest.mark.parametrize("side", ["right", "left"])
# Embeddings of one model from sentence-transformers and from our encoder: the same
# weights through different code, float32.
EMBEDDING_TOLERANCE = 1e-5


def _byte_symbols() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def roberta_byte_tokenizer(pad_token_id: int) -> RobertaTokenizer:
    """RoBERTa's tokenizer over the 256 byte symbols, <s> </s> <unk> <mask> first and <pad>
    at ``pad_token_id``: it pads with the config's pad id wherever that is, as a real
    RoBERTa tokenizer does with id 1."""
    tokens = ["<s>", "</s>", "<unk>", "<mask>", *_byte_symbols()]
    tokens.insert(pad_token_id, "<pad>")
    return RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def decoder_byte_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over the 256 byte symbols, <s> <\\s> <pad> <unk> at 0-3:
    Llama's adds <s> in front of each text, Qwen's adds nothing; neither ends it."""
    tokens = ["<s>", "</s>", "<pad>", "<unk>", *_byte_symbols()]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def randomize(model: nn.Module, gain: str = "norm.weight") -> None:
    """Every parameter drawn at a scale where attention is far from uniform and norms have
    gains (the parameters whose names contain ``gain``: mean 1), so that a wrong position,
    token type, window, mask or norm moves the states by their own size, not by the 2 % of
    BERT's initialisation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(mean=1.0 if gain in name else 0.0, std=0.2)


def save_random_checkpoint(
    model_class: type,
    config: PretrainedConfig,
    tokenizer,
    folder: Path,
    gain: str = "norm.weight",
) -> Path:
    """An HF folder as transformers writes it (config.json, weights, tokenizer) of
    ``model_class`` (AutoModel, AutoModelForMaskedLM, ...) with ``config``, randomised by
    :func:`randomize` from seed 0."""
    torch.manual_seed(0)
    model = model_class.from_config(config)
    randomize(model, gain)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def encoder_of(model: BiEncoder, dtype: torch.dtype, unpadded: bool) -> nn.Module:
    """A copy of the query tower's encoder in ``dtype`` on the packed or padded path."""
    encoder = copy.deepcopy(model.query_tower.encoder).to(dtype)
    encoder.unpadded = unpadded
    return encoder


def assert_equal_states(
    actual_model: nn.Module, expected_model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    """Every layer's states of two transformers models on ``batch`` bitwise equal: the same
    weights through the same code."""
    with torch.no_grad():
        actual = actual_model(**batch, output_hidden_states=True).hidden_states
        expected = expected_model(**batch, output_hidden_states=True).hidden_states
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"layer {k}")


def assert_checkpointing_keeps_gradients(
    encoder: nn.Module, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> None:
    """Gradient checkpointing gives ``encoder``'s (a copy's) gradients bitwise on ``ids`` and
    ``mask`` (three ragged texts by default): it recomputes the same forward."""
    encoder = copy.deepcopy(encoder).train()
    if ids is None or mask is None:
        ids = torch.randint(5, 100, (3, 12))
        mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 7 + [0] * 5])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        encoder.zero_grad()
        encoder.gradient_checkpointing = checkpointing
        (encoder(ids, mask) ** 2).sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=0)


def assert_sentence_transformers_round_trip(
    model: BiEncoder, folder: Path, texts: list[str], architectures: Iterable[str]
) -> None:
    """``model`` saved to ``folder`` loads in sentence-transformers as one of
    ``architectures`` and embeds ``texts`` (as documents) as ``model`` does, and loads back
    in ``BiEncoder.from_pretrained`` to the same embeddings bitwise."""
    expected = model.encode(texts, kind="doc")
    model.save_pretrained(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    assert type(st[0].auto_model).__name__ in tuple(architectures)
    actual = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    assert_close(actual, expected, tolerance=EMBEDDING_TOLERANCE)
    assert torch.equal(BiEncoder.from_pretrained(folder).encode(texts, kind="doc"), expected)


def perturb_adapters(model: nn.Module, std: float = 0.05) -> None:
    """Give every LoRA ``B`` seeded random values: it starts at zero, which would hide every
    mistake in how the update is applied and leave ``A`` without gradient."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
