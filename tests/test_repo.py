"""Meta-tests: generated docs are current, links resolve, every hook is documented and tested,
every plugin folder is a complete distribution, the public API does not lose names."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir())


def hook_names() -> list[str]:
    from tunestack import hookspecs

    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("tunestack_")]


def test_generated_reference_pages_are_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_spec_documents_its_contract(name):
    from tunestack import hookspecs

    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    for arg in inspect.signature(function).parameters:
        assert f":param {arg}:" in doc, f"{name} does not document argument {arg}"
    assert ":returns:" in doc and "Call semantics:" in doc and "Fires" in doc, name
    page = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    signature = f"## {name}({', '.join(inspect.signature(function).parameters)})"
    assert signature in page


def test_every_hook_has_a_test():
    sources = "\n".join(p.read_text(encoding="utf-8") for p in ROOT.glob("core/tests/test_*.py"))
    missing = [n for n in hook_names() if f"def test_hook_{n}(" not in sources]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


def test_markdown_links_resolve():
    broken = []
    pages = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("plugins/*/README.md")]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


@pytest.mark.parametrize("plugin", PLUGINS, ids=[p.name for p in PLUGINS])
def test_plugin_folder_is_a_complete_distribution(plugin):
    meta = tomllib.loads((plugin / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    assert project["name"] == f"tunestack-{plugin.name}"
    entry_points = project["entry-points"]["tunestack"]
    assert entry_points == {plugin.name: f"tunestack_{plugin.name}"}
    assert any(d.startswith("tunestack") for d in project["dependencies"])
    readme = (plugin / "README.md").read_text(encoding="utf-8")
    assert "| option |" in readme and "```toml" in readme, "README needs an options table and an example stack"
    assert list((plugin / "tests").glob("test_*.py")), "no tests"


@pytest.mark.parametrize("plugin", PLUGINS, ids=[p.name for p in PLUGINS])
def test_plugin_is_installed_and_imports_nothing_heavy(plugin):
    code = (
        f"import sys, tunestack_{plugin.name}\n"
        "names = ('torch', 'transformers', 'peft', 'torch_pruning', 'neural_compressor')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"{plugin.name} imports {result.stdout.strip()} at import time"


PUBLIC_API = {
    "hookimpl",
    "MethodSpec",
    "Method",
    "Options",
    "Field",
    "Contract",
    "Phase",
    "PHASES",
    "KNOWN_TAGS",
    "Slot",
    "TaskSpec",
    "ModelHandle",
    "StageContext",
    "StageData",
    "StagePlan",
    "PlannedMethod",
    "StepContext",
    "StepOutput",
    "EvalContext",
    "ValidationContext",
    "TransformRecord",
    "Saved",
    "Example",
    "ExampleList",
    "Stash",
    "StashKey",
    "Layers",
    "transformer_layers",
    "head_parameter_names",
    "embedding_parameter_names",
    "layer_of",
    "count_trainable",
    "Problem",
    "UserError",
    "DataError",
    "ModelError",
    "PluginError",
    "RunFailed",
}


def test_public_api_keeps_its_names():
    import tunestack
    import tunestack.api as api

    missing = sorted(PUBLIC_API - set(api.__all__))
    assert not missing, f"removed from tunestack.api: {missing} (a breaking change for plugins)"
    for name in api.__all__:
        assert hasattr(api, name), name
    assert {"run", "load", "validate"} <= set(tunestack.__all__)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_test_module_names_are_unique_across_the_suite():
    """pytest imports test folders without __init__.py by basename: two equal names break collection."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    seen: dict[str, Path] = {}
    for folder in config["tool"]["pytest"]["ini_options"]["testpaths"]:
        for path in sorted((ROOT / folder).rglob("test_*.py")):
            assert path.name not in seen, f"{path} and {seen[path.name]} share a module name"
            seen[path.name] = path


def test_tutorial_snippets_come_from_files_the_suite_runs():
    text = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    snippets = re.findall(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
    assert len(snippets) >= 8
    for path, code in snippets:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert code in source, f"a snippet of {path} in writing-plugins.md no longer matches the file"


def test_tutorial_commands_work_in_order(tmp_path):
    text = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- commands -->\n```sh\n(.*?)```", text, flags=re.S).group(1)
    bin_dir = Path(sys.executable).parent
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "HOME": str(tmp_path),
        "PIP_NO_BUILD_ISOLATION": "0",  # build with the installed setuptools: no download in tests
        "PIP_NO_DEPS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    script = "set -e\n" + block
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ia3" in result.stdout and ("positive" in result.stdout or "negative" in result.stdout)
    import shutil

    shutil.rmtree(ROOT / "runs" / "ia3-demo", ignore_errors=True)


EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("stack", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_stacks_validate(stack, plugin_host):
    """Every example is valid; the only problem allowed is benchmark data absent beside this checkout."""
    from tunestack.errors import StackError
    from tunestack.validation import load_plan

    shared = Path(os.path.normpath(ROOT.parent / "shared" / "data"))
    try:
        load_plan(stack, plugin_host)
    except StackError as error:
        absent = [p for p in error.problems if p.message.startswith("file not found") and str(shared) in p.message]
        others = [p for p in error.problems if p not in absent]
        assert not others, [str(p) for p in others]
        assert not shared.exists(), "the shared data is there, yet the example does not validate"
