"""Prompts for synthetic queries: an instruction, few-shot examples and a template, read from
a YAML file; the shipped ones are data/prompts/<style>.yaml."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from biencoder.data.errors import DataError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
STYLES = ("question", "claim", "keywords")
PLACEHOLDER = "{document}"
# What str.format would take for a field: a name in braces, maybe with an attribute, an
# index, a conversion or a format spec. Other braces (a JSON example) are kept as written.
FIELD = re.compile(r"\{([A-Za-z_]\w*)([.\[!:][^{}\s\"']*)?\}")


def template_problem(template: str) -> tuple[int, str] | None:
    """(offset, what is wrong) for the first thing in ``template`` that looks like a
    placeholder but is not ``{document}``, or for a template without one; None when it is
    fine."""
    for match in FIELD.finditer(template):
        if match.group(1) != "document":
            return match.start(), (
                f"{match.group()} is not a placeholder: a template fills in only "
                f"{PLACEHOLDER} and keeps other braces as written"
            )
        if match.group(2):
            return match.start(), f"{match.group()}: write {PLACEHOLDER}, with no format spec"
    if PLACEHOLDER not in template:
        return 0, f"has no {PLACEHOLDER} placeholder"
    return None


def _template_line(text: str, offset: int) -> int | None:
    """The 1-based line of the prompt file ``text`` holding ``offset`` into its template:
    exact in a literal block (``template: |``), else the line the template starts on."""
    node = yaml.compose(text)
    for key, value in node.value:
        if key.value == "template":
            if value.style == "|":
                return value.start_mark.line + 2 + value.value[:offset].count("\n")
            return value.start_mark.line + 1
    return None


@dataclass(frozen=True)
class Prompt:
    """A Promptagator-style prompt: an instruction, few-shot ``examples`` (document, query)
    and a ``template`` with ``{document}`` that ends where the query goes; any other braces
    in it are text (a JSON example), but a name in braces, such as ``{doc}``, is refused.

    A prompt file (YAML) has the keys ``instruction``, ``template``, ``style`` (question,
    claim or keywords: what the parser accepts) and ``examples``, a list of
    ``{document, query}``; its id is the file name without ``.yaml``.
    """

    id: str
    instruction: str
    template: str
    style: str = "question"
    examples: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if problem := template_problem(self.template):
            raise ValueError(f"template: {problem[1]}")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Prompt:
        """Read a prompt file; DataError names the file and the key that is wrong."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            record = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(f"not valid YAML: {err}", path) from err
        if not isinstance(record, dict):
            raise DataError("expected a mapping of instruction, template, style, examples", path)
        for key in ("instruction", "template"):
            if not isinstance(record.get(key), str):
                raise DataError("required text is missing", path, field=key)
        if problem := template_problem(record["template"]):
            offset, reason = problem
            raise DataError(reason, path, _template_line(text, offset), field="template")
        style = record.get("style", "question")
        if style not in STYLES:
            raise DataError(f"{style!r} is not one of {', '.join(STYLES)}", path, field="style")
        examples = []
        for i, example in enumerate(record.get("examples") or []):
            if not isinstance(example, dict) or not all(
                isinstance(example.get(k), str) for k in ("document", "query")
            ):
                raise DataError("needs text 'document' and 'query'", path, field=f"examples[{i}]")
            examples.append((example["document"], example["query"]))
        return cls(path.stem, record["instruction"], record["template"], style, tuple(examples))

    def render(
        self, document: str, *, num_examples: int | None = None, max_words: int | None = None
    ) -> str:
        """The prompt for ``document``: instruction, the first ``num_examples`` examples
        (all when None), then the document's template. ``max_words`` asks for queries of at
        most that many words."""
        instruction = self.instruction.strip()
        if max_words is not None:
            instruction += f" Use at most {max_words} words."
        shots = self.examples[:num_examples] if num_examples is not None else self.examples
        parts = [instruction]
        parts += [f"{self.template.replace(PLACEHOLDER, d)} {q}" for d, q in shots]
        parts.append(self.template.replace(PLACEHOLDER, document))
        return "\n\n".join(parts)


def builtin_prompt(style: str) -> Path:
    """The prompt file shipped for ``style`` (data/prompts/<style>.yaml)."""
    if style not in STYLES:
        raise ValueError(f"style: {style!r} is not one of {', '.join(STYLES)}")
    return PROMPTS_DIR / f"{style}.yaml"
