"""Templates and few-shot draws: pure functions, no torch.

A template is text with the placeholders ``{text}``, ``{text_pair}`` and ``{label}`` (``{{`` and
``}}`` are literal braces). It is parsed once into parts, so rendering never evaluates user input
as a format string.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from string import Formatter

PLACEHOLDERS = ("text", "text_pair", "label")

#: written in place of ``{label}`` for cloze scoring until the tokenizer's mask token is known
MASK_SENTINEL = "\u2063tunestack-prompt-mask\u2063"

_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and placeholders, in order."""

    source: str
    parts: tuple[tuple[str, str], ...]  # ("literal", text) or ("field", name)

    @property
    def fields(self) -> list[str]:
        return [value for kind, value in self.parts if kind == "field"]

    @property
    def has_label(self) -> bool:
        return "label" in self.fields

    def text_before_label(self) -> bool:
        """Whether every ``{text}``/``{text_pair}`` comes before ``{label}`` (a prompt to continue)."""
        fields = self.fields
        if "label" not in fields:
            return False
        at = fields.index("label")
        return "text" in fields[:at] and not ({"text", "text_pair"} & set(fields[at + 1 :]))

    def render(self, text: str | None = "", text_pair: str | None = "", label: str | None = "") -> str:
        """Fill every placeholder (``None`` counts as empty)."""
        values = {"text": text or "", "text_pair": text_pair or "", "label": label or ""}
        return "".join(value if kind == "literal" else values[value] for kind, value in self.parts)

    def split_at_label(self) -> tuple[Template, str, Template]:
        """``(before, whitespace, after)``: the template up to ``{label}`` without its trailing
        whitespace, that whitespace (it belongs to the verbalizer: ``" great"`` for BPE
        tokenizers), and the rest after ``{label}``."""
        if not self.has_label:
            return self, "", Template("", ())
        at = next(i for i, (kind, value) in enumerate(self.parts) if kind == "field" and value == "label")
        before = list(self.parts[:at])
        space = ""
        if before and before[-1][0] == "literal":
            literal = before[-1][1]
            stripped = literal.rstrip()
            space = literal[len(stripped) :]
            before[-1] = ("literal", stripped)
        return Template("", tuple(before)), space, Template("", tuple(self.parts[at + 1 :]))


def parse_template(source: str) -> Template:
    """Parse a template; ``ValueError`` with a readable message when it is malformed."""
    parts: list[tuple[str, str]] = []
    try:
        pieces = list(Formatter().parse(source))
    except ValueError as error:
        raise ValueError(f"not a valid template ({error}); write {{{{ and }}}} for literal braces") from None
    for literal, name, spec, conversion in pieces:
        if literal:
            parts.append(("literal", literal))
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            shown = "{" + name + "}"
            raise ValueError(
                f"unknown placeholder {shown}; a template may use {{text}}, {{text_pair}} and {{label}} "
                "(write {{ and }} for literal braces)"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format spec or conversion")
        parts.append(("field", name))
    fields = [value for kind, value in parts if kind == "field"]
    if fields.count("label") > 1:
        raise ValueError("{label} may appear only once")
    return Template(source, tuple(parts))


def tidy(text: str) -> str:
    """Collapse the runs of spaces an empty placeholder leaves and strip the ends."""
    return _SPACES.sub(" ", text).strip()


def input_text(template: Template, text: str | None, text_pair: str | None) -> str:
    """The input of similarity scoring and of ``format_only``: the template without the label (and
    without the whitespace before it: ``"{text} It was {label}."`` gives ``"<text> It was."``)."""
    before, _, after = template.split_at_label()
    return tidy(before.render(text, text_pair, "") + after.render(text, text_pair, ""))


def prompt_text(template: Template, text: str | None, text_pair: str | None) -> str:
    """The prompt of LM scoring: the template up to ``{label}`` (its trailing space removed)."""
    before, _, _ = template.split_at_label()
    return before.render(text, text_pair, "").strip()


def cloze_text(template: Template, text: str | None, text_pair: str | None, mask: str) -> str:
    """The input of cloze scoring: ``{label}`` becomes the mask token."""
    return tidy(template.render(text, text_pair, mask))


def description(template: Template, word: str) -> str:
    """A label description: the template with the verbalizer word and no input text."""
    return tidy(template.render("", "", word))


def demonstration(template: Template, text: str | None, text_pair: str | None, word: str) -> str:
    """An in-context example: the whole template filled with the example and its label word."""
    return tidy(template.render(text, text_pair, word))


def continuation(template: Template, word: str) -> str:
    """What LM scoring measures after the prompt: the whitespace before ``{label}`` and the word."""
    _, space, _ = template.split_at_label()
    return space + word


# ---------------------------------------------------------------------------------------------
# few-shot draws
# ---------------------------------------------------------------------------------------------


def draw_shots(labels: Sequence[str | None], classes: Sequence[str], k: int, seed: int) -> list[int]:
    """Indices of ``k`` examples per class, drawn reproducibly from ``seed``.

    Returned in a seeded shuffled order (the order in-context examples are shown in), so classes
    are interleaved rather than grouped. ``ValueError`` when a class has fewer than ``k`` examples.
    """
    if k <= 0:
        return []
    rng = random.Random(seed)
    pools: dict[str, list[int]] = {name: [] for name in classes}
    for index, label in enumerate(labels):
        if label in pools:
            pools[label].append(index)
    short = {name: len(pool) for name, pool in pools.items() if len(pool) < k}
    if short:
        listing = ", ".join(f"'{name}' has {count}" for name, count in short.items())
        raise ValueError(f"shots = {k} needs {k} training examples per label, but {listing}")
    chosen = [index for name in classes for index in rng.sample(pools[name], k)]
    rng.shuffle(chosen)
    return chosen


def check_verbalizers(verbalizers: Mapping[str, Sequence[str]], labels: Sequence[str]) -> str | None:
    """A message when the verbalizer labels and the task labels differ, else None."""
    missing = [label for label in labels if label not in verbalizers]
    unknown = [label for label in verbalizers if label not in set(labels)]
    if not missing and not unknown:
        return None
    parts = []
    if missing:
        parts.append("no verbalizer for label(s) " + ", ".join(f"'{m}'" for m in missing))
    if unknown:
        parts.append("verbalizers for unknown label(s) " + ", ".join(f"'{u}'" for u in unknown))
    return "; ".join(parts) + f" (the task's labels: {', '.join(repr(x) for x in labels)})"
