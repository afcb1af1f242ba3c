"""Writes reviews_train.tsv and reviews_dev.tsv: short reviews composed from hand-written phrases.

The phrases are this project's own text. Sentences mix a subject, an opinion and a detail; about one
review in six carries a mild contrast ("but"), so the task is learnable but not a keyword lookup.
Run: python examples/data/make_reviews.py
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the new cafe on the corner",
    "this pair of hiking boots",
    "the sequel",
    "our hotel room",
    "the audiobook",
    "the coffee grinder",
    "this thriller",
    "the tasting menu",
    "the museum tour",
    "the phone case",
    "the documentary",
    "the train ride",
    "this board game",
    "the desk lamp",
    "the cooking class",
    "the concert",
    "the rental car",
    "this novel",
    "the yoga studio",
    "the headphones",
    "the bakery",
    "the podcast",
    "the city bike",
    "the animated film",
    "the garden centre",
]
POSITIVE = [
    "was a genuine delight from start to finish",
    "exceeded every expectation we had",
    "felt warm, generous and thoughtfully made",
    "is the best thing I have bought all year",
    "left the whole family smiling",
    "works flawlessly and looks gorgeous",
    "was worth every penny",
    "kept me hooked until the last page",
    "had staff who went out of their way to help",
    "is sturdy, comfortable and beautifully finished",
    "made a rainy weekend feel special",
    "surprised me with how clever and funny it was",
    "delivered exactly what it promised",
    "has become a favourite that I recommend to everyone",
    "was charming, relaxed and great value",
    "was spotless, quiet and wonderfully comfortable",
    "sounded crisp and rich even at low volume",
    "was moving without ever feeling sentimental",
    "arrived early and was packed with care",
    "is a joy to use every single morning",
    "has a cast that is simply brilliant",
    "tasted fresh, bright and perfectly seasoned",
    "ran smoothly and was easy to book",
    "was inspiring and I learned a lot",
    "feels premium and has held up perfectly",
]
NEGATIVE = [
    "was a tedious slog from start to finish",
    "fell apart after a single week",
    "felt cheap, rushed and careless",
    "is the worst purchase I have made all year",
    "left everyone bored and restless",
    "stopped working and support never replied",
    "was a waste of money",
    "lost me halfway through with its clumsy plot",
    "had staff who were rude and dismissive",
    "is flimsy, uncomfortable and badly stitched",
    "turned a nice weekend into a chore",
    "tried hard to be funny and failed every time",
    "did not deliver anything it promised",
    "is something I would warn my friends about",
    "was cramped, noisy and overpriced",
    "was dusty, loud and smelled of smoke",
    "sounded tinny and distorted at any volume",
    "was manipulative and dull",
    "arrived late and badly damaged",
    "is a hassle to use every single morning",
    "has a cast that seems completely lost",
    "tasted stale, greasy and bland",
    "broke down twice and was a nightmare to return",
    "was disorganised and I learned nothing",
    "scratched on day one and looks worn already",
]
DETAILS = [
    "",
    "",
    "",
    " overall",
    " honestly",
    " if I am being fair",
    " to be blunt",
    " in my experience",
    " for the price",
    " this time around",
]
CONTRAST_POS = ["the start was slow, but it", "the box was dented, but it", "I had doubts, but it"]
CONTRAST_NEG = [
    "the trailer looked promising, but it",
    "the photos were lovely, but it",
    "it began well, but it",
]


def review(rng: random.Random, positive: bool) -> str:
    subject = rng.choice(SUBJECTS)
    opinion = rng.choice(POSITIVE if positive else NEGATIVE)
    detail = rng.choice(DETAILS)
    if rng.random() < 1 / 6:
        lead = rng.choice(CONTRAST_POS if positive else CONTRAST_NEG)
        rest = opinion.split(" ", 1)[1] if opinion.startswith("was ") else opinion
        return f"{subject.capitalize()}: {lead} {rest}{detail}."
    return f"{subject.capitalize()} {opinion}{detail}."


def write(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    seen = set()
    while len(lines) <= count:
        positive = rng.random() < 0.5
        text = review(rng, positive)
        if text in seen:
            continue
        seen.add(text)
        lines.append(f"{text}\t{'positive' if positive else 'negative'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "reviews_train.tsv", 320, seed=7)
    write(here / "reviews_dev.tsv", 120, seed=8)
