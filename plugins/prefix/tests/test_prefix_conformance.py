"""tunestack's conformance check for both modes on every family and task they support."""

from __future__ import annotations

import pytest

from tunestack.testing.conformance import check_method

CLASSIFICATION = ("sequence-classification", "token-classification")


@pytest.mark.parametrize("mode", ["prefix", "prompt"])
def test_conformance_classification(tmp_path, mode):
    options = {"mode": mode, "num_virtual_tokens": 4}
    report = check_method("prefix", tmp_path, options=options, tasks=CLASSIFICATION)
    for family in ("bert", "gpt2", "llama"):
        for task in CLASSIFICATION:
            assert f"runs, reloads and predicts on {family}/{task}" in report.passed


@pytest.mark.parametrize("mode", ["prefix", "prompt"])
def test_conformance_causal_lm(tmp_path, mode):
    families = ("gpt2", "llama") if mode == "prefix" else ("gpt2", "llama", "bert")
    options = {"mode": mode, "num_virtual_tokens": 4, "init_text": "Once upon a time"}
    report = check_method("prefix", tmp_path, options=options, families=families, tasks=("causal-lm",))
    assert "runs, reloads and predicts on gpt2/causal-lm" in report.passed


def test_conformance_with_projection(tmp_path):
    options = {"num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}
    report = check_method("prefix", tmp_path, options=options, families=("bert", "gpt2"))
    assert "runs, reloads and predicts on gpt2/sequence-classification" in report.passed
