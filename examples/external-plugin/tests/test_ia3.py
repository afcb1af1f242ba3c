"""Tests of the example external plugin; they use only tunestack's public API and testing kit."""

from __future__ import annotations

import pytest
import torch

import tunestack
from tunestack.errors import StackError
from tunestack.testing.conformance import check_method
from tunestack.validation import load_plan


def test_conformance(tmp_path):
    check_method("ia3", tmp_path, families=("bert", "llama"))


def test_conformance_merged(tmp_path):
    check_method("ia3", tmp_path, options={"merge": True}, families=("bert",))


def test_trains_only_the_scaling_vectors_and_head(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "ia3"}], epochs=6, train={"learning_rate": 5e-2}))
    hidden, inter, layers, labels = 32, 64, 2, 2
    # peft's BERT default: key and value (scaled outputs), and every "output.dense" as feed-forward
    # (scaled inputs): the attention output projection (hidden) and the FFN output projection (inter)
    vectors = layers * (hidden + hidden + hidden + inter)
    head = hidden * labels + labels
    assert result.stages[0]["methods"][0]["reports"]["trainable_params"] == vectors + head
    losses = [h["loss"] for h in result.stages[0]["training"]["history"]]
    assert sum(losses[-6:]) < sum(losses[:6])


def test_adapter_folder_loads_with_plain_peft(run_stack, make_stack):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_stack(make_stack(methods=[{"method": "ia3"}]))
    model_dir = result.run_dir / "model"
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(model_dir), model_dir / "transforms" / "s0-0-ia3"
    ).eval()
    loaded = tunestack.load(result.run_dir)
    batch = loaded.tokenizer(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, loaded.model(**batch).logits, atol=1e-6)


def test_bad_options_are_reported_with_paths(plugin_host, make_stack):
    stack = make_stack(methods=[{"method": "ia3", "feedforward_modules": ["output.dense"]}])
    with pytest.raises(StackError, match=r"stack\[0\]\.feedforward_modules: set target_modules too"):
        load_plan(stack, plugin_host)


def test_cannot_follow_an_unmerged_adapter(plugin_host, make_stack):
    stack = make_stack(
        stages=[{"name": "a", "stack": [{"method": "ia3"}]}, {"name": "b", "stack": [{"method": "ia3"}]}]
    )
    with pytest.raises(StackError, match="merge the earlier adapter first"):
        load_plan(stack, plugin_host)
