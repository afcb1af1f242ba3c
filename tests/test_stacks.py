"""Whole stacks across plugins on tiny models: the compositions users reach for."""

from __future__ import annotations

import pytest
import torch

import tunestack
from tunestack.errors import StackError
from tunestack.testing.stacks import tiny_model_config
from tunestack.validation import load_plan

DIVISIBLE = {"config": tiny_model_config("bert", num_attention_heads=4, hidden_size=32, intermediate_size=64)}


def test_lora_merge_prune_kd_int8_in_one_file(run_stack, make_stack):
    stack = make_stack(
        model=DIVISIBLE,
        stages=[
            {"name": "teacher", "epochs": 2},
            {"name": "adapt", "stack": [{"method": "lora", "r": 4, "merge": True}]},
            {
                "name": "shrink",
                "stack": [{"method": "kd", "teacher": "stage:teacher"}, {"method": "prune", "ratio": 0.5}],
            },
            {"name": "quantize", "epochs": 0, "stack": [{"method": "int8", "mode": "dynamic", "backend": "fbgemm"}]},
        ],
    )
    result = run_stack(stack)
    assert [s["status"] for s in result.stages] == ["ok"] * 4
    assert all(s["reload_max_abs_diff"] is not None and s["reload_max_abs_diff"] <= 1e-4 for s in result.stages)
    assert result.manifest["final_tags"] == ["pruned", "quantized", "structural"]
    shrink = {m["method"]: m["reports"] for m in result.stages[2]["methods"]}
    assert shrink["prune"]["params_after"] < shrink["prune"]["params_before"]
    assert result.stages[3]["methods"][0]["reports"]["quantized_modules"] > 0
    loaded = tunestack.load(result.run_dir)
    assert type(loaded.model.bert.encoder.layer[0].intermediate.dense).__module__.startswith("torch.ao")
    assert loaded.predict(["the film was great"])[0]["label"] in {"positive", "negative"}


def test_adapter_with_kd_on_a_student(run_stack, make_stack):
    stack = make_stack(
        stages=[
            {"name": "teacher", "epochs": 2},
            {
                "name": "student",
                "stack": [
                    {"method": "kd", "student": {"from_teacher": True, "keep_layers": [1]}},
                    {"method": "adapter", "variant": "pfeiffer"},
                ],
            },
        ]
    )
    result = run_stack(stack)
    loaded = tunestack.load(result.run_dir)
    assert loaded.model.config.num_hidden_layers == 1
    assert result.stages[1]["transforms"][0]["method"] == "adapter"
    history = result.stages[1]["training"]["history"]
    assert "kd_soft_loss" in history[0]


def test_freeze_then_lora(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "lora", "r": 2}, {"method": "freeze", "layers": 1}], epochs=1))
    reports = {m["method"]: m["reports"] for m in result.stages[0]["methods"]}
    assert reports["freeze"]["trainable_params"] < reports["lora"]["trainable_params"]


@pytest.mark.parametrize(
    ("methods", "reason"),
    [
        (
            [{"method": "int8"}, {"method": "prune", "ratio": 0.5}],
            r"'prune' needs 'float-weights'.*but 'int8' \(stack\[0\]\) removed it",
        ),
        ([{"method": "lora"}, {"method": "prune", "ratio": 0.5}], "cannot run on a model that is 'adapters'"),
        ([{"method": "adapter"}, {"method": "int8"}], "cannot run on a model that is 'adapters'"),
        (
            [{"method": "int8"}, {"method": "lora"}],
            r"'lora' needs 'float-weights'.*but 'int8' \(stack\[0\]\) removed it",
        ),
    ],
)
def test_impossible_orders_of_real_methods_are_refused(plugin_host, make_stack, methods, reason):
    with pytest.raises(StackError, match=reason):
        load_plan(make_stack(model=DIVISIBLE, methods=methods), plugin_host)


def test_merged_lora_matches_the_unmerged_model(run_stack, make_stack, tmp_path):
    unmerged = run_stack(make_stack(methods=[{"method": "lora", "r": 4}]), out=tmp_path / "a")
    merged = run_stack(make_stack(methods=[{"method": "lora", "r": 4, "merge": True}]), out=tmp_path / "b")
    a, b = tunestack.load(unmerged.run_dir), tunestack.load(merged.run_dir)
    batch = a.tokenizer(["the film was great", "the plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(a.model(**batch).logits, b.model(**batch).logits, atol=1e-4)
