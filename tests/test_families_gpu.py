"""Each family's packed execution on a CUDA GPU: the varlen flash kernel against the padded
kernel under bf16 autocast (ModernBERT's sliding-window local layers, the decoders' causal
masks and Mistral's window, RoBERTa's positions), forward and every parameter's gradient;
and the GPU against the CPU in fp32. The tolerances are test_varlen's, whose CPU tests check
them on BERT; here a window or a causal mask the varlen call dropped moves the states far
beyond them (the windows are shorter than the texts).

Random tiny encoders of our own configs: no transformers checkpoint is needed, so the
module runs on the GPU machine's image as it is."""

import pytest
import torch
from test_varlen import (
    BF16_TERMS,
    CONFIG,
    LENGTHS,
    NEEDS_VARLEN,
    assert_same_pooled_and_grads,
    make_batch,
    pooled_and_grads,
)

from biencoder.model.backbone import build_encoder
from biencoder.model.bert import Packing
from biencoder.model.biencoder import Tower
from biencoder.model.config import EncoderConfig
from biencoder.model.llama import DecoderConfig
from biencoder.model.modernbert import ModernBertEncoderConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SHAPE = dict(
    vocab_size=CONFIG.vocab_size,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    pad_token_id=0,
)
DECODER = dict(SHAPE, num_key_value_heads=2, attention_dropout=0.0)
# Windows of 8 tokens against texts of up to 64 (LENGTHS["ragged"]).
FAMILIES = {
    "roberta": (EncoderConfig(**SHAPE, model_type="roberta"), "mean"),
    "modernbert": (
        ModernBertEncoderConfig(
            **SHAPE, global_attn_every_n_layers=2, local_attention=8, bos_token_id=None
        ),
        "mean",
    ),
    "llama": (DecoderConfig(**DECODER), "last_token"),
    "mistral": (DecoderConfig(**DECODER, sliding_window=8, model_type="mistral"), "last_token"),
    "qwen3": (DecoderConfig(**DECODER, head_dim=16, model_type="qwen3"), "last_token"),
}


def tower(family: str) -> Tower:
    config, pooling = FAMILIES[family]
    torch.manual_seed(0)
    encoder = build_encoder(config)
    encoder.set_dropout(0.0, 0.0)
    return Tower(encoder, pooling, projection_dim=None).train().cuda()


@NEEDS_VARLEN
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_varlen_equals_padded_under_bf16_autocast(family, side):
    model = tower(family)
    ids, mask = make_batch(LENGTHS["ragged"], side)
    packing = Packing.from_mask(mask).to("cuda")
    ids, mask = ids.cuda(), mask.cuda()
    weights = torch.randn(len(LENGTHS["ragged"]), 32, device="cuda")
    run = (model, True, ids, mask, weights)
    padded = pooled_and_grads(*run, "padded", packing, autocast=torch.bfloat16)
    varlen = pooled_and_grads(*run, "varlen", packing, autocast=torch.bfloat16)
    assert_same_pooled_and_grads(varlen, padded, terms=BF16_TERMS, dtype=torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gpu_computes_what_the_cpu_does_in_fp32(family):
    model = tower(family)
    ids, mask = make_batch(LENGTHS["ragged"], "right")
    weights = torch.randn(len(LENGTHS["ragged"]), 32)
    on_gpu = pooled_and_grads(model, True, ids.cuda(), mask.cuda(), weights.cuda(), "padded")
    on_cpu = pooled_and_grads(model.cpu(), True, ids, mask, weights, "padded")
    pooled, grads = on_gpu
    assert_same_pooled_and_grads(
        (pooled.cpu(), {n: g.cpu() for n, g in grads.items()}), on_cpu, dtype=torch.float32
    )
