from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = ("negative", "positive")
TAGS = ("O", "B-PER", "I-PER", "B-LOC")
AUTO = {"seq": "sequence-classification", "token": "token-classification", "causal": "causal-lm"}


def build(family: str, kind: str = "seq", attn: str | None = None):
    """The tiny model a tiny stack starts from (same seed and config), in eval mode."""
    import torch

    from tunestack.models import build_from_config
    from tunestack.testing.stacks import tiny_model_config

    torch.manual_seed(0)
    labels = TAGS if kind == "token" else LABELS
    kwargs = (
        {}
        if kind == "causal"
        else {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    )
    config = tiny_model_config(family)
    model = build_from_config(config, AUTO[kind], kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # what core's fit_tokenizer does with the MiniLM tokenizer
    if attn is not None:
        model.set_attn_implementation(attn)
    return model.eval()


@pytest.fixture
def make_model():
    """``make_model(family, kind="seq", attn=None)``: the tiny model a tiny stack starts from."""
    return build


@pytest.fixture(scope="session")
def tokenizer():
    from tunestack.models import load_tokenizer
    from tunestack.sources import packaged_model_dir

    return load_tokenizer(packaged_model_dir("minilm"))


@pytest.fixture
def batch(tokenizer):
    """A right-padded batch of three texts (the last ones shorter than the first)."""
    texts = ["the film was a lovely and clever story", "dull plot", "great cast"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))
