"""The query in a language model's reply: lead-ins, list markers and quotes stripped, the
first sentence kept, and replies that are no query of the prompt's style (or copy the
document) rejected with the reason."""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+")


# A reply's lead-in before the query: "Sure! Here is a possible question:", "Question:",
# "The search query would be -", "Q:". It must end in a colon or dash.
_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly)\b[^:\n]*?[.!,]\s*)?"
    r"(?:[^:\n]{0,60}?\b(?:question|query|queries|claim|statement|keywords?|search|"
    r"document|abstract|answer)\b"
    r"[^:\n]{0,40}?|q|a)\s*(?::\s*|[-–]\s+)",
    re.IGNORECASE,
)
# "The document supports the claim that X", "The study suggests that X", "... claim of X".
_CLAIM_THAT = re.compile(
    r"^[^.]{0,100}?\b(?:claims?|statements?|findings?|evidence|hypothesis|document|abstract|"
    r"study|paper|text|authors?|research)\b[^.]{0,60}?\bthat\s+"
    r"|^[^.]{0,60}?\bclaims?\s+of\s+",
    re.IGNORECASE,
)
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*•])\s+")
_QUOTES = "\"'“”‘’`*_ "
_QUESTION_START = re.compile(
    r"^(?:what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|"
    r"could|should|would|will|has|have|had|may|might|must)\b",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` words."""
    return _WORD.findall(text.lower())


def word_key(text: str) -> str:
    """``text``'s words joined by spaces: equal for texts that differ only in case,
    punctuation and spacing."""
    return " ".join(words(text))


def _clean(line: str) -> str:
    line = _LIST_MARKER.sub("", line.strip())
    line = _PREAMBLE.sub("", line, count=1)
    return line.strip(_QUOTES)


def _first_sentence(text: str, style: str) -> str | None:
    """Up to the first "?" (questions) or full stop (claims); None for a claim that never
    ends (the reply ran out of tokens mid-sentence)."""
    if style == "question":
        end = text.find("?")
        return text[: end + 1] if end >= 0 else text
    if style == "claim":
        match = re.search(r"(?<=[a-z0-9)\]%])[.!](?:\s|$)", text)
        return text[: match.start() + 1] if match else None
    return text


def parse_query(
    reply: str, document: str, style: str = "question", examples: Iterable[str] = ()
) -> tuple[str | None, str]:
    """The query in a model's ``reply`` and ``"ok"``, or None and why it was rejected
    (``"empty"``, ``"not_question"``, ``"truncated"``, ``"copy"``).

    Takes the first line that still has text once list markers ("1.", "-"), lead-ins
    ("Here is a possible question:", "Question:") and quotes are stripped, then its first
    sentence (up to the "?" for questions; a claim with no full stop was cut off by
    ``max_new_tokens``). "The study suggests that X" and "the claim of X" become X. A
    question must end in "?" or start like one; a query whose words appear in that order
    in the document (the title, a sentence copied), or that is one of the prompt's
    ``examples``, is a copy.
    """
    query = ""
    for line in reply.splitlines():
        # A line ending in a colon introduces what follows ("Here are three questions:").
        if line.strip().endswith(":"):
            continue
        query = _clean(line)
        if query:
            break
    if style == "claim":
        query = _CLAIM_THAT.sub("", query, count=1)
        query = query[:1].upper() + query[1:]
    if not words(query):
        return None, "empty"
    sentence = _first_sentence(query, style)
    if sentence is None:
        return None, "truncated"
    query = sentence.strip(_QUOTES)
    if style == "question" and not (query.endswith("?") or _QUESTION_START.match(query)):
        return None, "not_question"
    key = word_key(query)
    if f" {key} " in f" {' '.join(words(document))} " or key in map(word_key, examples):
        return None, "copy"
    return query, "ok"
