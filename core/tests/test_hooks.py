"""One focused test per hook (a meta-test checks every hook spec has a ``test_hook_<name>``)."""

from __future__ import annotations

import types

import click

from tunestack.api import Contract, Method, MethodSpec, Options, StepOutput, hookimpl
from tunestack.plugins import create_host


def _module(**attrs):
    module = types.ModuleType("inline_plugin")
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_hook_tunestack_register_methods(plugin_host):
    spec = plugin_host.methods["echo"]
    assert spec.name == "echo" and spec.description
    assert plugin_host.method_plugin["echo"].distribution == "tunestack-echo"
    assert {o["name"] for o in spec.describe_options()} >= {"tag", "produces", "fail_in"}


def test_hook_tunestack_register_tasks(plugin_host):
    assert plugin_host.task_plugin["causal-lm"].name == "tasks"
    assert plugin_host.tasks["token-classification"].auto_class == "token-classification"


def test_hook_tunestack_register_commands(cli, monkeypatch):
    @hookimpl
    def tunestack_register_commands(cli):
        @cli.command("hello")
        def hello():
            click.echo("hello from a plugin")

    from tunestack import cli as cli_module
    from tunestack.plugins import create_host

    host = create_host(extra_plugins=[("greeter", _module(tunestack_register_commands=tunestack_register_commands))])
    host.hook.tunestack_register_commands(cli=cli_module.cli)
    try:
        result = cli("hello")
        assert result.exit_code == 0 and "hello from a plugin" in result.output
    finally:
        cli_module.cli.commands.pop("hello", None)


def test_hook_tunestack_validate_stage(plugin_host, make_stack, calls):
    from tunestack.validation import load_plan

    load_plan(
        make_stack(
            stages=[
                {"name": "a", "stack": [{"method": "echo", "tag": "x"}]},
                {"name": "b", "stack": [{"method": "echo", "tag": "y"}]},
            ]
        ),
        plugin_host,
    )
    assert [c for c in calls if c[0] == "validate_stage"] == [
        ("validate_stage", "x"),
        ("validate_stage", "y"),
    ]


class _CausalChooser(Method[Options]):
    @hookimpl
    def tunestack_model_class(self, stage, task):
        return "causal-lm"


def _chooser_plugin():
    @hookimpl
    def tunestack_register_methods(register):
        register(MethodSpec("choose-causal", Options, _CausalChooser, Contract(phases=frozenset({"prepare"}))))

    return _module(tunestack_register_methods=tunestack_register_methods)


def test_hook_tunestack_model_class(tmp_path, make_stack):
    from tunestack.runner import run

    host = create_host(extra_plugins=[("chooser", _chooser_plugin())])
    stack = make_stack(methods=[{"method": "choose-causal"}], epochs=0)
    result = run(stack, out=tmp_path, host=host)
    meta = (result.run_dir / "model" / "tunestack.json").read_text()
    assert '"auto_class": "causal-lm"' in meta


def test_hook_tunestack_transform_examples(run_stack, make_stack):
    import tunestack

    result = run_stack(make_stack(methods=[{"method": "echo", "suffix": " !!"}], epochs=0))
    loaded = tunestack.load(result.run_dir)
    from tunestack.data import Example

    formatted = loaded.transform([Example(text="hi")], "predict")
    assert formatted[0].text == "hi !!"  # the recorded transform formats inputs after reload too


def test_hook_tunestack_prepare(run_stack, make_stack, calls):
    result = run_stack(make_stack(methods=[{"method": "echo", "tag": "p"}], epochs=0))
    assert ("prepare", "p") in calls
    assert result.stages[0]["methods"][0]["reports"] == {"prepared": True}


def test_hook_tunestack_train_step(run_stack, make_stack):
    plain = run_stack(make_stack(methods=[{"method": "echo"}], epochs=1), out=None)
    doubled = run_stack(make_stack(methods=[{"method": "echo", "scale_loss": 2.0}], epochs=1))
    first_plain = plain.stages[0]["training"]["history"][0]["loss"]
    first_doubled = doubled.stages[0]["training"]["history"][0]["loss"]
    assert abs(first_doubled - 2 * first_plain) < 1e-4  # the wrapper changed the loss core back-propagates


def test_hook_tunestack_compress(run_stack, make_stack, calls):
    run_stack(make_stack(methods=[{"method": "echo", "tag": "c"}], epochs=1))
    assert calls.index(("compress", "c")) > calls.index(("train_step", "c"))


def test_hook_tunestack_save(run_stack, make_stack, calls):
    result = run_stack(make_stack(methods=[{"method": "echo", "tag": "s", "transform": True}], epochs=0))
    assert ("save", "s") in calls
    assert (result.run_dir / "model" / "transforms" / "s0-0-echo" / "echo.json").is_file()


def test_hook_tunestack_rebuild(run_stack, make_stack, calls):
    import pytest

    import tunestack
    from tunestack.errors import PluginError

    result = run_stack(make_stack(methods=[{"method": "echo", "tag": "r", "transform": True}], epochs=0))
    calls.clear()
    tunestack.load(result.run_dir)
    assert calls == [("rebuild", "r")]
    (result.run_dir / "model" / "transforms" / "s0-0-echo" / "echo.json").unlink()
    with pytest.raises(PluginError, match=r"plugin 'echo' \(tunestack-echo 0.1.0\) could not rebuild 'echo'"):
        tunestack.load(result.run_dir)


def test_hook_tunestack_evaluate(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "echo", "metric": 0.25}], epochs=0))
    assert result.metrics["s0-0-echo.value"] == 0.25
    assert "accuracy" in result.metrics and "params_total" in result.metrics
    assert StepOutput  # the public type hooks return
