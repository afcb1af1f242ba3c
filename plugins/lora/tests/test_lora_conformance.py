"""The conformance kit: every family and task, unmerged and merged."""

from __future__ import annotations

from tunestack.testing.conformance import check_method

FAMILIES = ("bert", "gpt2", "llama")
TASKS = ("sequence-classification", "token-classification", "causal-lm")


def test_conformance_unmerged(tmp_path):
    report = check_method("lora", tmp_path, options={"r": 4}, families=FAMILIES, tasks=TASKS)
    for task in TASKS:
        for family in FAMILIES:
            assert f"runs, reloads and predicts on {family}/{task}" in report.passed


def test_conformance_merged(tmp_path):
    report = check_method("lora", tmp_path, options={"r": 4, "merge": True}, families=FAMILIES, tasks=TASKS)
    assert "runs, reloads and predicts on llama/causal-lm" in report.passed
    assert len([c for c in report.passed if c.startswith("runs, reloads")]) == 9
