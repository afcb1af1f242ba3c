"""Stack files: every problem at once with its TOML path, before torch is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunestack.errors import StackError
from tunestack.stack import dump_toml, parse_key_path, parse_toml
from tunestack.validation import load_plan


def write(tmp_path: Path, text: str, name: str = "stack.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(stack, host, **kwargs) -> list[str]:
    with pytest.raises(StackError) as caught:
        load_plan(stack, host, **kwargs)
    return [str(p) for p in caught.value.problems]


FIVE_MISTAKES = """
    seed = -1
    [model]
    task = "sequence-clasification"
    [data]
    max_length = "long"
    [train]
    epocs = 2
    [[stack]]
    method = "ecko"
"""


def test_five_mistakes_are_all_reported_with_paths(tmp_path, plugin_host):
    found = problems_of(write(tmp_path, FIVE_MISTAKES), plugin_host)
    joined = "\n".join(found)
    assert "seed: must be >= 0, got -1" in joined
    assert "model.task: unknown task 'sequence-clasification'; did you mean 'sequence-classification'?" in joined
    assert "data.max_length:" in joined
    assert "train.epocs: unknown key; did you mean 'epochs'?" in joined
    assert "stack[0].method: unknown method 'ecko'; did you mean 'echo'?" in joined
    assert "installed methods:" in joined
    assert len(found) == 5


def test_cli_validate_exit_2_and_no_traceback(tmp_path, cli):
    result = cli("validate", str(write(tmp_path, FIVE_MISTAKES)))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.count("\n  - ") == 5


def test_valid_stack_validates(tmp_path, cli, tiny_data):
    path = write(
        tmp_path,
        f"""
        [model]
        [model.config]
        model_type = "bert"
        hidden_size = 32
        num_hidden_layers = 1
        num_attention_heads = 2
        intermediate_size = 32
        [data]
        train = "{tiny_data.sentiment_train}"
        [[stack]]
        method = "echo"
    """,
    )
    result = cli("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "valid (1 stage(s), 1 method(s))" in result.output


def test_toml_syntax_error_has_line_and_column(tmp_path, plugin_host):
    path = write(tmp_path, "seed = 1\n[train\nepochs = 2\n")
    found = problems_of(path, plugin_host)
    assert len(found) == 1 and f"{path}:2:" in found[0] and "TOML syntax error" in found[0]


def test_method_option_errors_have_the_method_path(tmp_path, plugin_host, make_stack):
    stack = make_stack(
        stages=[
            {"name": "one", "stack": [{"method": "echo", "scale_loss": "x"}]},
            {"name": "two", "stack": [{"method": "echo", "tagg": "y"}, {"tag": "no method"}]},
        ]
    )
    found = problems_of(stack, plugin_host)
    assert any(p.startswith("stage[0].stack[0].scale_loss:") for p in found)
    assert "stage[1].stack[0].tagg: unknown key; did you mean 'tag'?" in found
    assert any(p.startswith("stage[1].stack[1].method: required key is missing") for p in found)


def test_requires_is_checked(plugin_host, make_stack):
    stack = make_stack(requires=["tunestack-echo>=99", "tunestack-nonexistent"])
    found = problems_of(stack, plugin_host)
    assert found == [
        "requires: missing required plugins: tunestack-echo>=99 (installed: 0.1.0), "
        "tunestack-nonexistent (not installed)"
    ]


def test_missing_data_file_is_reported(plugin_host, make_stack, tmp_path):
    stack = make_stack(data={"train": str(tmp_path / "nope.tsv")})
    assert any(p.startswith("data.train: file not found") for p in problems_of(stack, plugin_host))


def test_impossible_order_is_rejected_with_reason(plugin_host, make_stack):
    stack = make_stack(
        methods=[
            {
                "method": "echo",
                "tag": "int8-like",
                "produces": ["quantized"],
                "removes": ["float-weights"],
                "forbids_after": ["structural"],
            },
            {
                "method": "echo",
                "tag": "prune-like",
                "requires": ["float-weights"],
                "produces": ["structural"],
            },
        ]
    )
    found = problems_of(stack, plugin_host)
    assert "stack[1]: 'echo' needs 'float-weights', but 'echo' (stack[0]) removed it" in found
    assert any(
        "cannot follow 'echo' (stack[0]): nothing 'structural' may come after it (echo says so)" in p for p in found
    )


def test_contracts_flow_across_stages(plugin_host, make_stack):
    stack = make_stack(
        stages=[
            {"name": "adapt", "stack": [{"method": "echo", "produces": ["adapters"]}]},
            {"name": "shrink", "stack": [{"method": "echo", "conflicts": ["adapters"]}]},
        ]
    )
    found = problems_of(stack, plugin_host)
    assert found == [
        "stage[1].stack[0]: 'echo' cannot run on a model that is 'adapters'; 'echo' (stage[0].stack[0]) made it so"
    ]


def test_train_only_method_in_a_stage_without_training(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "zero", "epochs": 0, "stack": [{"method": "echo", "phases": ["train"]}]}])
    assert problems_of(stack, plugin_host) == [
        "stage[0].stack[0]: 'echo' only acts while training, but stage[0] has epochs = 0"
    ]


def test_method_that_needs_training_in_a_stage_without_training(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "z", "epochs": 0, "stack": [{"method": "echo", "needs_training": True}]}])
    assert problems_of(stack, plugin_host) == [
        "stage[0].stack[0]: 'echo' only acts while training, but stage[0] has epochs = 0"
    ]


def test_method_validation_hook_reports_problems(plugin_host, make_stack):
    stack = make_stack(methods=[{"method": "echo", "problem": "ratio too large for 4 heads"}])
    assert problems_of(stack, plugin_host) == ["stack[0].problem: ratio too large for 4 heads"]


def test_overrides(plugin_host, make_stack):
    stack = make_stack(methods=[{"method": "echo", "tag": "a"}])
    plan = load_plan(stack, plugin_host, overrides=["train.epochs=3", "stack[0].tag=b", "data.max_length=16"])
    assert plan.stages[0].train.epochs == 3
    assert plan.stages[0].methods[0].options.tag == "b"
    assert plan.stack.data.max_length == 16
    bad = problems_of(stack, plugin_host, overrides=["stage[4].epochs=1", "nonsense", "train.epochs=-1"])
    assert any(p.startswith("--set stage[4].epochs") for p in bad)
    assert any("'nonsense' must look like key=value" in p for p in bad)
    assert any(p.startswith("train.epochs: must be >= 0") for p in bad)


def test_stage_training_keys_override_train_section(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "a", "learning_rate": 0.1}, {"name": "b", "epochs": 0}], train={"epochs": 2})
    plan = load_plan(stack, plugin_host)
    assert plan.stages[0].train.learning_rate == 0.1 and plan.stages[0].train.epochs == 2
    assert plan.stages[1].trains is False


def test_stack_and_stage_together_is_an_error(plugin_host, make_stack):
    stack = make_stack(methods=[], stages=[{"name": "a"}])
    stack["stack"] = []
    assert any("not both" in p for p in problems_of(stack, plugin_host))


def test_model_folder_that_is_not_a_model(tmp_path, plugin_host, make_stack):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    stack = make_stack(model={"source": str(folder), "config": None})
    assert problems_of(stack, plugin_host) == [f"model.source: {folder} is not a model folder: it has no config.json"]


def test_resolved_stack_round_trips_through_toml(plugin_host, make_stack):
    plan = load_plan(make_stack(methods=[{"method": "echo", "tag": 'quote " and \\ slash'}]), plugin_host)
    resolved = plan.resolved()

    def without_none(value):
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [without_none(v) for v in value]
        return value

    assert parse_toml(dump_toml(resolved), "resolved") == without_none(resolved)
    assert resolved["stage"][0]["stack"][0]["scale_loss"] == 1.0  # defaults filled


def test_key_paths():
    assert parse_key_path("stage[1].stack[0].ratio") == ["stage", 1, "stack", 0, "ratio"]
    with pytest.raises(ValueError):
        parse_key_path("stage[x]")


def test_validate_does_not_import_torch(tmp_path, tiny_data):
    path = write(
        tmp_path,
        f"""
        [model]
        source = "minilm"
        [data]
        train = "{tiny_data.sentiment_train}"
        [[stack]]
        method = "echo"
    """,
    )
    code = (
        f"import sys\nfrom tunestack.cli import main\nsys.argv=['tunestack','validate',{str(path)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "valid" in out.stdout and "TORCH False" in out.stdout, out.stdout + out.stderr
