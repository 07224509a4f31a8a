"""GGUF checkpoints (llama.cpp's single-file format) as Hugging Face folders that
``BiEncoder.from_pretrained`` loads.

    folder = folder_from_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = BiEncoder.from_pretrained(folder, pooling="last_token")

A GGUF file holds the model's hyperparameters and its tokenizer (vocabulary, merges, special
tokens) as metadata, then its tensors, most of them quantised in blocks (Q4_1: 32 weights of
4 bits sharing a float16 scale and minimum), with llama.cpp's tensor names and its row order
for the query and key projections (the rotated pairs interleaved). Reading it ourselves
would mean a dequantiser per quantisation type, llama.cpp's names and row order, and the
tokenizer rebuilt from its metadata: transformers' GGUF reader does all of that, and keeping
its result as an ordinary folder (float32 safetensors, config.json, tokenizer files) lets
the model, the tokenizer and every other tool load the checkpoint as any other. The reader
is slow (20 s for the 135M SmolLM2, most of it parsing the metadata's 49k-token vocabulary
more than once), so the folder is written once per file, into a cache, and a later call for
the same file only looks it up.

The cache is keyed by the file's resolved path, size and modification time, and by the
versions of this converter and of transformers (whose reader writes the folder): a file
replaced in place or a newer reader gets a new folder. Old folders are not removed (540 MB
for SmolLM2 in float32); delete the cache folder to reclaim them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from gguf import GGUFReader
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# general.architecture values our decoder runs, as llama.cpp names them. transformers reads
# a "llama" file whose general.name says Mistral as a Mistral, which we run too.
SUPPORTED_ARCHITECTURES = ("llama",)
CACHE_ENV = "BIENCODER_GGUF_CACHE"
GGUF_MAGIC = b"GGUF"
# Part of the cache key: bump it when the folder written for a file changes.
_FORMAT = 1


def gguf_cache_dir() -> Path:
    """Where converted folders go: ``$BIENCODER_GGUF_CACHE``, else ``biencoder/gguf`` under
    ``$XDG_CACHE_HOME`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "biencoder" / "gguf"


def folder_from_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder (config.json, model.safetensors in float32, tokenizer files)
    holding the model of the GGUF file ``gguf_path``, converted on the first call and found
    in ``cache_dir`` (default :func:`gguf_cache_dir`) on later ones.

    Raises FileNotFoundError for a missing file, and ValueError naming the file for one that
    is not GGUF, whose architecture our decoder does not run, whose RoPE scaling
    transformers' reader would drop, or that transformers cannot read.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    root = Path(cache_dir).expanduser() if cache_dir is not None else gguf_cache_dir()
    folder = root / _cache_key(path)
    # A folder appears under its key only whole (renamed into place), so existing is enough.
    if folder.is_dir():
        return folder
    _check_header(path)
    root.mkdir(parents=True, exist_ok=True)
    # In the cache folder, so that the rename stays on one file system and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        _convert(path, staging)
        try:
            staging.rename(folder)
        except OSError:
            # Another process converted the same file meanwhile; its folder is as good.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _cache_key(path: Path) -> str:
    """``<file stem>-<hash>``: the stem to tell folders apart by eye, the hash of what
    identifies the file's content and the conversion (see the module docstring)."""
    stat = path.stat()
    identity = [str(path), stat.st_size, stat.st_mtime_ns, _FORMAT, transformers.__version__]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def _check_header(path: Path) -> None:
    """Refuse, before the slow conversion, a file that is not GGUF or holds a model that
    would not come out as trained."""
    with open(path, "rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(
                f"{path}: not a GGUF file (it does not start with the bytes {GGUF_MAGIC.decode()})"
            )
    try:
        reader = GGUFReader(path)
        field = reader.get_field("general.architecture")
        architecture = field.contents() if field is not None else None
    except (ValueError, IndexError, OSError) as err:
        # The gguf package reads every tensor's extent too, so a file cut anywhere lands
        # here, with a message ("cannot reshape array ...") that names neither the file nor
        # the cause.
        raise ValueError(
            f"{path}: cannot read the GGUF file (cut short or damaged? download it again): "
            f"{type(err).__name__}: {err}"
        ) from err
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # transformers' reader maps no RoPE-scaling metadata for these architectures: a linear
    # or YaRN factor, or Llama 3.1's frequency table (the rope_freqs tensor), would be
    # dropped and the model rotate its queries and keys otherwise than it was trained.
    scaling = reader.get_field(f"{architecture}.rope.scaling.type")
    scaling = scaling.contents() if scaling is not None else "none"
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        kind = "Llama 3's frequency table" if scaling == "none" else f"type {scaling!r}"
        raise ValueError(
            f"{path}: the model scales RoPE ({kind}), which transformers' GGUF reader "
            "drops; load the model's Hugging Face release instead"
        )


def _convert(path: Path, out: Path) -> None:
    """Write ``path``'s model into the empty folder ``out`` as transformers reads it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        # transformers' messages do not name the file.
        raise ValueError(
            f"{path}: transformers cannot read it: {type(err).__name__}: {err}"
        ) from err
    # What save_pretrained writes (which refuses a model read from GGUF), less the fields
    # that point at the GGUF file: a loader seeing them would look for it.
    config = model.config.to_diff_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # The same tensor as the embeddings (safetensors refuses shared storage); loaders
        # tie it again.
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", {"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
