from __future__ import annotations

import pytest
import torch

import tunestack
from tunestack.errors import StackError
from tunestack.testing import changed_parameters as changed
from tunestack.testing import initial_model
from tunestack.testing.conformance import check_method
from tunestack.validation import load_plan


def test_conformance(tmp_path):
    report = check_method("freeze", tmp_path, options={"embeddings": True, "layers": 1})
    assert "runs, reloads and predicts on llama/sequence-classification" in report.passed


def test_validation_problems(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "z", "epochs": 0, "stack": [{"method": "freeze", "layers": 5}]}])
    with pytest.raises(StackError) as caught:
        load_plan(stack, plugin_host)
    text = str(caught.value)
    assert "freeze only matters in a stage that trains" in text
    assert "stage[0].stack[0].layers: the model has 2 layers, cannot freeze 5" in text
    with pytest.raises(StackError, match="nothing to freeze"):
        load_plan(make_stack(methods=[{"method": "freeze"}]), plugin_host)


def test_trainable_count_is_exact_and_only_unfrozen_weights_change(run_stack, make_stack):
    model = initial_model("bert")
    hidden, inter, vocab = 32, 64, 30522
    embeddings = vocab * hidden + 128 * hidden + 2 * hidden + 2 * hidden  # word, position, type, LayerNorm
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * inter + inter) + (inter * hidden + hidden)
    total = sum(p.numel() for p in model.parameters())
    result = run_stack(make_stack(methods=[{"method": "freeze", "embeddings": True, "layers": 1}], epochs=2))
    reports = result.stages[0]["methods"][0]["reports"]
    assert reports["trainable_params"] == total - embeddings - layer
    assert result.metrics["params_trainable"] == total - embeddings - layer
    history = result.stages[0]["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    final = tunestack.load(result.run_dir).model
    moved = changed(model, final)
    assert moved and not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in moved)
    assert any(n.startswith("bert.encoder.layer.1.") for n in moved) and "classifier.weight" in moved


def test_bitfit_trains_only_biases_and_head(run_stack, make_stack):
    model = initial_model("bert")
    result = run_stack(make_stack(methods=[{"method": "freeze", "bitfit": True}], epochs=2))
    biases = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier")
    )
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert result.metrics["params_trainable"] == biases + head
    moved = changed(model, tunestack.load(result.run_dir).model)
    assert moved and all(n.endswith(".bias") or n.startswith("classifier") for n in moved)


def test_bitfit_on_llama_adds_zero_biases_that_reload_with_the_stock_class(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    result = run_stack(make_stack(family="llama", methods=[{"method": "freeze", "bitfit": True}], epochs=2))
    assert result.metrics["params_trainable"] > 0
    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert plain.config.attention_bias and plain.model.layers[0].self_attn.q_proj.bias is not None
    loaded = tunestack.load(result.run_dir)
    batch = loaded.tokenizer(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, loaded.model(**batch).logits, atol=1e-6)


def test_named_modules(run_stack, make_stack):
    model = initial_model("bert")
    result = run_stack(make_stack(methods=[{"method": "freeze", "modules": ["bert.encoder.layer.*.attention.*"]}]))
    moved = changed(model, tunestack.load(result.run_dir).model)
    assert moved and not any(".attention." in n for n in moved)
