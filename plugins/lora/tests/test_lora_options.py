"""Options, contract and validation: all before torch or weights (no model is built here)."""

from __future__ import annotations

import pytest

from tunestack.errors import StackError
from tunestack.testing.conformance import conformance_host
from tunestack.validation import load_plan
from tunestack_lora import ADAPTERS_REASON, FLOAT_REASON, LoraOptions, contract


@pytest.fixture
def host():
    return conformance_host()  # installed plugins plus the echo double


def problems(stack, host) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, host)
    return str(caught.value)


def test_defaults_and_descriptions(host):
    spec = host.methods["lora"]
    rows = {row["name"]: row for row in spec.describe_options()}
    assert set(rows) == {"r", "alpha", "dropout", "target_modules", "bias", "modules_to_save", "merge"}
    assert all(row["description"] for row in rows.values())
    defaults = LoraOptions()
    assert (defaults.r, defaults.alpha, defaults.dropout) == (8, 16.0, 0.05)
    assert defaults.target_modules is None and defaults.bias == "none"
    assert defaults.modules_to_save == [] and defaults.merge is False


def test_unknown_key_and_bad_values_are_reported_with_their_toml_path(host, make_stack):
    text = problems(make_stack(methods=[{"method": "lora", "rank": 4}]), host)
    assert "stack[0].rank" in text and "unknown key" in text
    text = problems(
        make_stack(
            methods=[{"method": "lora", "r": 0, "dropout": 1.0, "bias": "some", "alpha": 0, "target_modules": "query"}]
        ),
        host,
    )
    for path in ("r", "dropout", "bias", "alpha", "target_modules"):
        assert f"stack[0].{path}" in text, (path, text)
    assert "stack[0].target_modules: must be a list of module names or 'all-linear', got 'query'" in text


def test_contract_follows_merge():
    unmerged = contract(LoraOptions())
    assert unmerged.phases == {"prepare", "train"}
    assert unmerged.requires == {"float-weights"} and unmerged.conflicts == {"adapters"}
    assert unmerged.produces == {"adapters", "structural"}
    merged = contract(LoraOptions(merge=True))
    assert merged.phases == {"prepare", "train", "compress"}
    assert merged.produces == frozenset() and merged.conflicts == {"adapters"}
    assert "merge the earlier adapter first" in unmerged.reasons["adapters"]
    assert "quantized" in unmerged.reasons["float-weights"]


def test_target_modules_checked_against_the_architecture(host, make_stack):
    text = problems(
        make_stack(family="bert", methods=[{"method": "lora", "target_modules": ["q_proj", "value"]}]), host
    )
    assert "stack[0].target_modules: 'q_proj' not found in a 'bert' model" in text
    assert "query" in text and "'value'" not in text.split("not found")[0]
    text = problems(make_stack(family="gpt2", methods=[{"method": "lora", "target_modules": ["query"]}]), host)
    assert "'query' not found in a 'gpt2' model" in text and "c_attn" in text
    text = problems(make_stack(family="llama", methods=[{"method": "lora", "target_modules": ["c_attn"]}]), host)
    assert "'c_attn' not found in a 'llama' model" in text and "q_proj" in text
    # dotted suffixes are judged by their last part; valid names and "all-linear" pass
    for family, targets in (
        ("bert", ["attention.self.query", "dense"]),
        ("gpt2", ["c_attn", "c_proj"]),
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("llama", "all-linear"),
    ):
        load_plan(make_stack(family=family, methods=[{"method": "lora", "target_modules": targets}]), host)


def test_other_validation_problems(host, make_stack):
    text = problems(
        make_stack(
            methods=[
                {
                    "method": "lora",
                    "r": 64,
                    "target_modules": ["query", "classifier"],
                    "modules_to_save": ["query"],
                }
            ]
        ),
        host,
    )
    assert "stack[0].r: must be at most the model's hidden size 32, got 64" in text
    assert "stack[0].target_modules: 'classifier' is the task head" in text
    assert "stack[0].modules_to_save: 'query' is also in target_modules" in text
    text = problems(make_stack(methods=[{"method": "lora", "target_modules": []}]), host)
    assert "stack[0].target_modules: is empty" in text
    text = problems(make_stack(stages=[{"name": "z", "epochs": 0, "stack": [{"method": "lora"}]}]), host)
    assert "stage[0].stack[0]: lora only matters in a stage that trains" in text


def test_two_lora_entries_in_one_stage_are_refused(host, make_stack):
    # unmerged first: the contract already refuses (the second would see 'adapters')
    text = problems(make_stack(methods=[{"method": "lora"}, {"method": "lora", "r": 4}]), host)
    assert "stack[1]: 'lora' cannot run on a model that is 'adapters'" in text
    assert ADAPTERS_REASON in text and "'lora' (stack[0]) made it so" in text
    # merged first: the tags allow it, but both adapters would train together in this stage
    text = problems(make_stack(methods=[{"method": "lora", "merge": True}, {"method": "lora", "r": 4}]), host)
    assert "stack[1]: a stage can hold only one 'lora' entry (stack[0] is already one)" in text
    assert "stack[0]:" not in text  # the first entry is fine
    # in separate stages, with the first merged, they validate
    load_plan(
        make_stack(
            stages=[
                {"name": "first", "stack": [{"method": "lora", "merge": True}]},
                {"name": "second", "stack": [{"method": "lora", "r": 4}]},
            ]
        ),
        host,
    )
    text = problems(
        make_stack(
            stages=[
                {"name": "first", "stack": [{"method": "lora"}]},
                {"name": "second", "stack": [{"method": "lora", "r": 4}]},
            ]
        ),
        host,
    )
    assert "stage[1].stack[0]: 'lora' cannot run on a model that is 'adapters'" in text


def test_refused_on_quantized_weights_and_on_other_adapters(host, make_stack):
    quantized = {"method": "echo", "removes": ["float-weights"], "produces": ["quantized"]}
    text = problems(make_stack(methods=[quantized, {"method": "lora", "merge": True}]), host)
    assert "stack[1]: 'lora' needs 'float-weights'" in text and FLOAT_REASON in text
    adapters = {"method": "echo", "produces": ["adapters"]}
    text = problems(make_stack(methods=[adapters, {"method": "lora"}]), host)
    assert "stack[1]: 'lora' cannot run on a model that is 'adapters'" in text
    # after an unmerged lora, nothing may claim float weights are gone silently: tags say adapters
    plan = load_plan(make_stack(methods=[{"method": "lora"}]), host)
    assert plan.stages[0].tags_after == {"float-weights", "adapters", "structural"}
    assert not hasattr(plan.stages[0].methods[0].instance, "tunestack_compress")  # acts in compress only to merge
    plan = load_plan(make_stack(methods=[{"method": "lora", "merge": True}]), host)
    assert plan.stages[0].tags_after == {"float-weights"}
    assert hasattr(plan.stages[0].methods[0].instance, "tunestack_compress")
