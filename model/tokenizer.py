"""Tokenizers from model folders: ``load_tokenizer`` checks that a folder's tokenizer fits
its embedding matrix; ``decoder_tokenizer`` makes a decoder's batch (a pad token) and, for
last-token pooling, ends each text with the end-of-sequence token the embedding is read
from, inside the tokenizer so that a saved folder tokenizes the same in
sentence-transformers."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# A tokenizer's vocabulary is in one of these (vocab.txt: BERT's WordPiece; vocab.json:
# RoBERTa's byte-level BPE, whose merges.txt transformers then requires; XLM-RoBERTa's
# SentencePiece model); without any, transformers builds a BERT tokenizer of the special
# tokens alone, which maps every word to [UNK] without an error.
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", SENTENCEPIECE_FILE)


def load_tokenizer(path: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """The tokenizer of the model folder ``path``, refused where it cannot fit an embedding
    matrix of ``vocab_size`` rows."""
    found = [name for name in VOCABULARY_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"{path}: no tokenizer vocabulary; looked for {' or '.join(VOCABULARY_FILES)}. "
            "Copy in the tokenizer files of the model this one was trained from"
        )
    if found == [SENTENCEPIECE_FILE] and importlib.util.find_spec("sentencepiece") is None:
        # Without it transformers fails on an unrelated name (tiktoken).
        raise ImportError(
            f"{path}: the tokenizer is {SENTENCEPIECE_FILE} alone, a SentencePiece model that "
            "transformers reads with the sentencepiece package: pip install sentencepiece, "
            "or copy the model's tokenizer.json into the folder"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    files = ", ".join(found)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{path}: the tokenizer ({files}) has {len(tokenizer)} tokens but the embedding "
            f"matrix has {vocab_size} rows (vocab_size in config.json): token ids would "
            "index past it. Is the tokenizer from another model?"
        )
    # Unused embedding rows are harmless, but this many means the ids of one vocabulary
    # select the rows of another.
    if 2 * len(tokenizer) < vocab_size:
        log.warning(
            "%s: the tokenizer (%s) has %d tokens, under half the %d rows of the embedding "
            "matrix (vocab_size in config.json); is the tokenizer from another model?",
            path,
            files,
            len(tokenizer),
            vocab_size,
        )
    return tokenizer


def ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` ends a text with its end-of-sequence token by itself (Qwen3-
    Embedding's does; a folder saved by a last-token bi-encoder does)."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1] == eos


def decoder_tokenizer(
    tokenizer: PreTrainedTokenizerBase, path: Path, append_eos: bool, suffix: str = ""
) -> PreTrainedTokenizerBase:
    """A decoder's tokenizer made to batch and to end each text with the tokens of
    ``suffix`` and then, where ``append_eos``, its end-of-sequence token: the token a
    last-token embedding is read from, which Llama's tokenizers (BOS only) and Qwen's
    (nothing) do not add. Done in the tokenizer itself, so that truncation keeps the ending
    and the folder ``save_pretrained`` writes tokenizes the same in sentence-transformers.
    A tokenizer that ends texts so already (a saved folder's) is returned as it is."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoders are trained without padding; padded positions are masked, so any id does.
        tokenizer.pad_token = tokenizer.eos_token
    ending = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if append_eos:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{path}: pooling 'last_token' on a decoder pools its end-of-sequence token, "
                "but the tokenizer has none (eos_token in tokenizer_config.json)"
            )
        ending.append(tokenizer.eos_token_id)
    ids = tokenizer("a")["input_ids"]
    if not ending or ids[-len(ending) :] == ending:
        return tokenizer
    wanted = [*ids, *ending]
    if ending == [tokenizer.eos_token_id] and hasattr(tokenizer, "add_eos_token"):
        # Llama's own switch, saved in tokenizer_config.json: transformers rebuilds the
        # post-processor from it when the file sets it. It drops what the switches do not
        # describe (Llama 3's BOS template), hence the check on a copy.
        flagged = copy.deepcopy(tokenizer)
        flagged.add_eos_token = True
        if flagged("a")["input_ids"] == wanted:
            return flagged
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Through the JSON: tokenizers' post-processors cannot be read from Python, and a
        # second template after a first one does not append to its output.
        state = json.loads(backend.to_str())
        tokens = tokenizer.convert_ids_to_tokens(ending)
        state["post_processor"] = _ending_with(state["post_processor"], ending, tokens)
        backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor
        if tokenizer("a")["input_ids"] == wanted:
            return tokenizer
    raise ValueError(
        f"{path}: cannot make the tokenizer ({type(tokenizer).__name__}) end texts with "
        f"{tokenizer.decode(ending)!r}, where pooling 'last_token' on a decoder reads the "
        "embedding"
    )


def _ending_with(processor: dict | None, ids: list[int], tokens: list[str]) -> dict:
    """The JSON of a tokenizers post-processor that does what ``processor`` does, then
    appends the tokens ``ids`` (spelled ``tokens``; one special token of the template) to
    each sequence."""
    name = "".join(tokens)
    special = {name: {"id": name, "ids": ids, "tokens": tokens}}

    def end(type_id: int) -> dict:
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    if processor is not None and processor["type"] == "Sequence":
        *kept, last = processor["processors"]
        return {**processor, "processors": [*kept, *_flatten(_ending_with(last, ids, tokens))]}
    if processor is not None and processor["type"] == "TemplateProcessing":
        return {
            **processor,
            "single": [*processor["single"], end(0)],
            "pair": [*processor["pair"], end(1)],
            "special_tokens": processor["special_tokens"] | special,
        }
    template = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, end(0)],
        "pair": [
            {"Sequence": {"id": "A", "type_id": 0}},
            end(0),
            {"Sequence": {"id": "B", "type_id": 1}},
            end(1),
        ],
        "special_tokens": special,
    }
    return (
        template if processor is None else {"type": "Sequence", "processors": [processor, template]}
    )


def _flatten(processor: dict) -> list[dict]:
    return processor["processors"] if processor["type"] == "Sequence" else [processor]
