"""Small deterministic datasets for tests: sentiment (TSV), NER (CoNLL and JSONL), text (JSONL).

The texts are synthetic and separable, so a tiny random-init model learns them in a few steps.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

POSITIVE = ["good", "great", "lovely", "superb", "fine", "brilliant", "warm", "funny", "clever", "moving"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "flat", "tedious", "clumsy", "stale"]
NOUNS = ["film", "story", "cast", "script", "ending", "score", "plot", "pace"]
PEOPLE = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah"]
PLACES = ["Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Quito"]
ORGS = ["Acme", "Globex", "Initech", "Umbrella"]


@dataclass(frozen=True)
class TinyData:
    """Paths of the tiny datasets of one folder, by task."""

    folder: Path

    @property
    def sentiment_train(self) -> Path:
        return self.folder / "sentiment_train.tsv"

    @property
    def sentiment_eval(self) -> Path:
        return self.folder / "sentiment_eval.tsv"

    @property
    def ner_train(self) -> Path:
        return self.folder / "ner_train.conll"

    @property
    def ner_eval(self) -> Path:
        return self.folder / "ner_eval.conll"

    @property
    def ner_jsonl(self) -> Path:
        return self.folder / "ner.jsonl"

    @property
    def lm_train(self) -> Path:
        return self.folder / "lm_train.jsonl"

    @property
    def lm_eval(self) -> Path:
        return self.folder / "lm_eval.jsonl"

    def files(self, task: str) -> tuple[Path, Path]:
        return {
            "sequence-classification": (self.sentiment_train, self.sentiment_eval),
            "token-classification": (self.ner_train, self.ner_eval),
            "causal-lm": (self.lm_train, self.lm_eval),
        }[task]


def sentiment_rows(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = POSITIVE if i % 2 else NEGATIVE
        label = "positive" if i % 2 else "negative"
        rows.append((f"the {rng.choice(NOUNS)} was {rng.choice(words)} and {rng.choice(words)}", label))
    return rows


def ner_sentences(count: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
        tokens = [person, "works", "for", org, "in", place, "."]
        tags = ["B-PER", "O", "O", "B-ORG", "O", "B-LOC", "O"]
        if rng.random() < 0.5:
            tokens = ["Yesterday", *tokens]
            tags = ["O", *tags]
        sentences.append((tokens, tags))
    return sentences


def lm_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        if i % 2:
            rows.append({"prompt": f"Review: the {rng.choice(NOUNS)} was", "completion": f" {rng.choice(POSITIVE)}"})
        else:
            rows.append({"text": f"the {rng.choice(NOUNS)} was {rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}"})
    return rows


def write_tiny_data(folder: Path, train: int = 48, eval: int = 16, seed: int = 0) -> TinyData:
    folder.mkdir(parents=True, exist_ok=True)
    data = TinyData(folder)
    for path, rows in (
        (data.sentiment_train, sentiment_rows(train, seed)),
        (data.sentiment_eval, sentiment_rows(eval, seed + 1)),
    ):
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows), encoding="utf-8")
    for path, sentences in (
        (data.ner_train, ner_sentences(train, seed)),
        (data.ner_eval, ner_sentences(eval, seed + 1)),
    ):
        blocks = ["-DOCSTART- -X- -X- O\n"]
        for tokens, tags in sentences:
            blocks.append("".join(f"{t} NN O {g}\n" for t, g in zip(tokens, tags)))
        path.write_text("\n".join(blocks), encoding="utf-8")
    data.ner_jsonl.write_text(
        "".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in ner_sentences(eval, seed + 2)),
        encoding="utf-8",
    )
    for path, rows_lm in ((data.lm_train, lm_rows(train, seed)), (data.lm_eval, lm_rows(eval, seed + 1))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_lm), encoding="utf-8")
    return data
