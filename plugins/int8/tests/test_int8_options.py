"""Options, validation problems and the contract: everything checked before torch is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunestack.errors import StackError
from tunestack.validation import load_plan


def _problems(stack, host) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, host)
    return str(caught.value)


def test_importing_the_plugin_imports_no_torch():
    code = "import sys, tunestack_int8; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_defaults_and_contract(plugin_host):
    spec = plugin_host.methods["int8"]
    options = spec.options.model_validate({})
    assert (options.mode, options.backend, options.modules, options.calibration_batches) == (
        "dynamic",
        "auto",
        ["linear"],
        8,
    )
    assert options.max_output_change is None and options.compile is False
    contract = spec.contract_for(options)
    assert contract.phases == {"compress"}
    assert contract.requires == {"float-weights"} and contract.conflicts == {"adapters"}
    assert contract.produces == {"quantized"} and contract.removes == {"float-weights"}
    assert contract.forbids_after == {"structural", "quantized"}
    assert "merge adapters first" in contract.reasons["adapters"]
    assert all(f.description for f in spec.options.model_fields.values())


@pytest.mark.parametrize(
    ("entry", "path", "fragment"),
    [
        ({"mode": "fast"}, "stack[0].mode", "dynamic"),
        ({"backend": "onnx"}, "stack[0].backend", "neural-compressor"),
        ({"calibration_batches": 0}, "stack[0].calibration_batches", "must be >= 1, got 0"),
        ({"max_output_change": 0}, "stack[0].max_output_change", "must be > 0"),
        ({"modules": []}, "stack[0].modules", "at least one module type"),
        ({"modules": ["conv"]}, "stack[0].modules", "linear"),
        ({"granularity": "row"}, "stack[0].granularity", "unknown key"),
    ],
)
def test_bad_option_values_are_reported_with_their_toml_path(plugin_host, make_stack, entry, path, fragment):
    text = _problems(make_stack(methods=[{"method": "int8", **entry}], epochs=0), plugin_host)
    assert path in text and fragment in text


def test_model_and_backend_dependent_problems(plugin_host, make_stack):
    text = _problems(
        make_stack(
            methods=[{"method": "int8", "backend": "neural-compressor", "modules": ["linear", "embedding"]}],
            epochs=0,
        ),
        plugin_host,
    )
    assert "stack[0].modules: neural-compressor 3.x has no int8 embedding kernel" in text
    text = _problems(make_stack(methods=[{"method": "int8", "backend": "fbgemm", "compile": True}]), plugin_host)
    assert "stack[0].compile: torch.compile applies to backend = 'torchao' only" in text
    # embeddings are fine where the fbgemm embedding kernel serves them; compile is fine on torchao
    for entry in (
        {"modules": ["linear", "embedding"]},
        {"backend": "torchao", "compile": True, "modules": ["embedding"]},
    ):
        load_plan(make_stack(methods=[{"method": "int8", **entry}], epochs=0), plugin_host)


def test_static_without_any_data_is_refused(plugin_host, make_stack):
    stack = make_stack(methods=[{"method": "int8", "mode": "static", "backend": "fbgemm"}], epochs=0)
    stack["data"] = {"labels": ["negative", "positive"], "max_length": 32}
    text = _problems(stack, plugin_host)
    assert "stack[0].mode: static quantization calibrates activation ranges: give data.train" in text
    stack["stack"] = [{"method": "int8", "backend": "fbgemm"}]  # dynamic fbgemm needs no data
    load_plan(stack, plugin_host)


def test_a_later_stage_that_trains_the_int8_model_is_refused(plugin_host, make_stack):
    stages = [
        {"name": "q", "epochs": 0, "stack": [{"method": "int8"}]},
        {"name": "tune", "epochs": 1},
    ]
    text = _problems(make_stack(stages=stages), plugin_host)
    assert "stage[1].epochs: stage 'tune' trains the model that int8 (stage[0].stack[0]) quantized" in text
    stages[1]["epochs"] = 0
    load_plan(make_stack(stages=stages), plugin_host)


def test_nothing_structural_or_quantized_may_follow(plugin_host, make_stack):
    if "echo" not in plugin_host.methods:
        pytest.skip("the echo test double is not installed")
    prune_like = {"method": "echo", "produces": ["structural", "pruned"], "requires": ["float-weights"]}
    text = _problems(make_stack(methods=[{"method": "int8"}, prune_like], epochs=0), plugin_host)
    assert "stack[1]: 'echo' needs 'float-weights'" in text and "'int8' (stack[0]) removed it" in text
    assert "'echo' cannot follow 'int8' (stack[0]): nothing 'structural' may come after it" in text
    assert "nothing structural after INT8: weights are no longer float" in text
    text = _problems(make_stack(methods=[{"method": "int8"}, {"method": "int8"}], epochs=0), plugin_host)
    assert "stack[1]: 'int8' needs 'float-weights'" in text and "nothing 'quantized' may come after it" in text
    # across stages too
    stages = [
        {"name": "q", "epochs": 0, "stack": [{"method": "int8"}]},
        {"name": "cut", "epochs": 0, "stack": [{"method": "echo", "produces": ["structural"]}]},
    ]
    assert "nothing 'structural' may come after it" in _problems(make_stack(stages=stages), plugin_host)


def test_the_real_prune_after_int8_is_refused(plugin_host, make_stack):
    pytest.importorskip("tunestack_prune")
    text = _problems(make_stack(methods=[{"method": "int8"}, {"method": "prune", "ratio": 0.5}], epochs=0), plugin_host)
    assert "stack[1]: 'prune' needs 'float-weights'" in text and "'int8' (stack[0]) removed it" in text
    assert "'prune' cannot follow 'int8' (stack[0]): nothing 'structural' may come after it" in text


def test_unmerged_adapters_before_int8_are_refused(plugin_host, make_stack):
    if "echo" in plugin_host.methods:
        adapter_like = {"method": "echo", "produces": ["adapters", "structural"]}
        text = _problems(make_stack(methods=[adapter_like, {"method": "int8"}]), plugin_host)
        assert "stack[1]: 'int8' cannot run on a model that is 'adapters'" in text
        assert "merge adapters first (e.g. lora merge = true)" in text
    pytest.importorskip("tunestack_lora")
    text = _problems(make_stack(methods=[{"method": "lora"}, {"method": "int8"}]), plugin_host)
    assert "stack[1]: 'int8' cannot run on a model that is 'adapters'" in text
    stages = [
        {"name": "adapt", "epochs": 1, "stack": [{"method": "lora"}]},
        {"name": "q", "epochs": 0, "stack": [{"method": "int8"}]},
    ]
    assert "stage[1].stack[0]: 'int8' cannot run on a model that is 'adapters'" in _problems(
        make_stack(stages=stages), plugin_host
    )
    # merged adapters are plain weights again
    load_plan(make_stack(methods=[{"method": "lora", "merge": True}, {"method": "int8"}]), plugin_host)


def test_prune_with_unmerged_adapters_before_int8_is_refused(plugin_host, make_stack):
    pytest.importorskip("tunestack_prune")
    pytest.importorskip("tunestack_lora")
    stages = [
        {"name": "adapt", "epochs": 1, "stack": [{"method": "lora"}]},
        {"name": "cut", "epochs": 0, "stack": [{"method": "prune", "ratio": 0.5}, {"method": "int8"}]},
    ]
    text = _problems(make_stack(stages=stages), plugin_host)
    assert "stage[1].stack[1]: 'int8' cannot run on a model that is 'adapters'" in text
    # prune that merges the adapters first leaves float weights for int8
    stages[1]["stack"][0]["merge_adapters"] = True
    load_plan(make_stack(stages=stages), plugin_host)
