"""Discovery, failure isolation, disabling, strict mode and malformed registrations."""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import types

import pytest

from tunestack.api import Contract, MethodSpec, Options, hookimpl
from tunestack.errors import PluginError
from tunestack.plugins import create_host


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version


class FakeEntryPoint:
    """Stands in for an installed entry point (sqlfluff's MockEntryPoint pattern)."""

    def __init__(self, name: str, value: str, dist: FakeDist, loader) -> None:
        self.name = name
        self.value = value
        self.dist = dist
        self._loader = loader
        self.group = "tunestack"

    def load(self):
        return self._loader()


def _with_entry_points(monkeypatch, extra):
    real = md.entry_points

    def fake(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "tunestack":
            found += extra
        return found

    monkeypatch.setattr(md, "entry_points", fake)


def _broken_import():
    raise ImportError("No module named 'missing_dependency'")


def _module_with(**attrs):
    module = types.ModuleType("fake_plugin_module")
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_builtins_and_test_double_are_discovered_with_versions(plugin_host):
    names = {p.name: p for p in plugin_host.plugins}
    for builtin in ("tasks", "default-step", "measure"):
        assert names[builtin].distribution == "tunestack"
        assert names[builtin].version == md.version("tunestack")
        assert names[builtin].builtin
    assert names["echo"].distribution == "tunestack-echo"
    assert "echo" in plugin_host.methods
    assert set(plugin_host.tasks) >= {"sequence-classification", "token-classification", "causal-lm"}


def test_broken_entry_point_is_reported_and_others_keep_working(monkeypatch):
    _with_entry_points(
        monkeypatch,
        [FakeEntryPoint("broken", "broken_plugin", FakeDist("tunestack-broken", "9.9"), _broken_import)],
    )
    host = create_host()
    broken = host.plugin("broken")
    assert broken is not None and broken.error is not None
    assert "missing_dependency" in broken.error
    assert broken.distribution == "tunestack-broken" and broken.version == "9.9"
    assert "echo" in host.methods  # everything else still loaded


def test_unknown_method_names_the_failed_plugin(monkeypatch):
    _with_entry_points(
        monkeypatch,
        [FakeEntryPoint("ia4", "tunestack_ia4", FakeDist("tunestack-ia4", "0.3.1"), _broken_import)],
    )
    host = create_host()
    message = host.describe_unknown_method("ia4")
    assert "tunestack-ia4 0.3.1" in message and "failed to load" in message and "missing_dependency" in message


def test_strict_mode_reraises(monkeypatch):
    _with_entry_points(
        monkeypatch,
        [FakeEntryPoint("broken", "broken_plugin", FakeDist("tunestack-broken", "1.0"), _broken_import)],
    )
    monkeypatch.setenv("TUNESTACK_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"tunestack-broken 1\.0"):
        create_host()


def test_disable_env_skips_a_plugin_but_not_an_essential_one(monkeypatch):
    monkeypatch.setenv("TUNESTACK_DISABLE_PLUGINS", "echo,tasks")
    host = create_host()
    assert "echo" not in host.methods
    assert host.plugin("echo").disabled
    assert "sequence-classification" in host.tasks  # 'tasks' is essential


def test_malformed_contract_is_reported_naming_the_plugin():
    class Opts(Options):
        pass

    @hookimpl
    def tunestack_register_methods(register):
        register(MethodSpec(name="bad", options=Opts, factory=object, contract="not a contract"))

    host = create_host(
        extra_plugins=[("bad-plugin", _module_with(tunestack_register_methods=tunestack_register_methods))]
    )
    info = host.plugin("bad-plugin")
    assert info.error and "contract" in info.error
    assert "bad" not in host.methods and "echo" in host.methods


def test_options_must_forbid_unknown_keys():
    from pydantic import BaseModel, ConfigDict

    class Loose(Options):
        model_config = ConfigDict(extra="allow")

    @hookimpl
    def tunestack_register_methods(register):
        register(
            MethodSpec(name="loose", options=Loose, factory=object, contract=Contract(phases=frozenset({"prepare"})))
        )

    host = create_host(extra_plugins=[("loose", _module_with(tunestack_register_methods=tunestack_register_methods))])
    assert "extra='forbid'" in host.plugin("loose").error
    assert BaseModel  # the options base is a pydantic model


def test_duplicate_method_name_is_refused():
    class Opts(Options):
        pass

    @hookimpl
    def tunestack_register_methods(register):
        register(
            MethodSpec(name="echo", options=Opts, factory=object, contract=Contract(phases=frozenset({"prepare"})))
        )

    host = create_host(extra_plugins=[("copycat", _module_with(tunestack_register_methods=tunestack_register_methods))])
    assert "already provided by plugin 'echo'" in host.plugin("copycat").error


def test_misspelled_hook_implementation_is_reported():
    @hookimpl
    def tunestack_prepar(model, ctx):  # typo: no such hook
        pass

    host = create_host(extra_plugins=[("typo", _module_with(tunestack_prepar=tunestack_prepar))])
    assert "tunestack_prepar" in host.plugin("typo").error


def test_plugins_json_lists_builtins_test_double_and_broken(monkeypatch, cli):
    _with_entry_points(
        monkeypatch,
        [FakeEntryPoint("broken", "broken_plugin", FakeDist("tunestack-broken", "2.0"), _broken_import)],
    )
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["echo"]["version"] == "0.1.0" and rows["echo"]["methods"] == ["echo"]
    assert rows["tasks"]["builtin"] is True
    assert rows["broken"]["error"] and rows["broken"]["version"] == "2.0"
    table = cli("plugins")
    assert "FAILED" in table.stdout and "echo" in table.stdout


def test_plugin_modules_do_not_import_torch():
    import subprocess

    code = "import sys, tunestack.plugins as p; p.create_host(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
