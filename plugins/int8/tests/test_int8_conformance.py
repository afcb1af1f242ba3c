from __future__ import annotations

from tunestack.testing.conformance import check_method


def test_conformance_default_backend(tmp_path):
    report = check_method("int8", tmp_path, families=("bert", "gpt2", "llama"))
    assert "runs, reloads and predicts on gpt2/sequence-classification" in report.passed
    assert "runs, reloads and predicts on llama/sequence-classification" in report.passed
