"""The authoring kit from the outside: scaffold a plugin, install it with `tunestack install`,
run its generated tests, fill in one body, run the conformance check, uninstall."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tunestack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "tunestack"), *args], capture_output=True, text=True, cwd=cwd, env=ENV, check=False
    )


def pytest_in(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
        capture_output=True,
        text=True,
        cwd=folder,
        env=ENV,
        check=False,
    )


FILLED_BODY = '''    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        """Freeze the embeddings (the body a plugin author fills in)."""
        from tunestack.api import embedding_parameter_names

        frozen = embedding_parameter_names(model.model)
        for name, param in model.model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        ctx.report(self, "trainable_params", trainable)
'''


def test_new_plugin_installs_runs_and_passes_its_tests(tmp_path):
    created = tunestack("new-plugin", "shrink-embed", "--dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    root = tmp_path / "tunestack-shrink-embed"
    assert (root / "pyproject.toml").is_file() and (root / "src" / "tunestack_shrink_embed" / "__init__.py").is_file()
    again = tunestack("new-plugin", "shrink-embed", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr

    installed = tunestack("install", "--no-deps", "--no-build-isolation", "-e", str(root))
    try:
        assert installed.returncode == 0, installed.stderr
        methods = json.loads(tunestack("methods", "--json").stdout)
        assert "shrink-embed" in {m["name"] for m in methods}
        plugins = {p["name"]: p for p in json.loads(tunestack("plugins", "--json").stdout)}
        assert (
            plugins["shrink-embed"]["distribution"] == "tunestack-shrink-embed" and not plugins["shrink-embed"]["error"]
        )

        generated = pytest_in(root)
        assert generated.returncode == 0, generated.stdout + generated.stderr
        assert "3 passed" in generated.stdout

        module = root / "src" / "tunestack_shrink_embed" / "__init__.py"
        text = module.read_text()
        start = text.index("    def tunestack_prepare")
        end = text.index("@hookimpl\ndef tunestack_register_methods")
        module.write_text(text[:start] + FILLED_BODY + "\n\n" + text[end:])
        filled = pytest_in(root)
        assert filled.returncode == 0, filled.stdout + filled.stderr
    finally:
        removed = tunestack("uninstall", "tunestack-shrink-embed")
    assert removed.returncode == 0, removed.stderr
    methods = json.loads(tunestack("methods", "--json").stdout)
    assert "shrink-embed" not in {m["name"] for m in methods}


@pytest.mark.parametrize("name", ["Bad Name", "1abc", "x!"])
def test_new_plugin_rejects_bad_names(tmp_path, name):
    result = tunestack("new-plugin", name, "--dir", str(tmp_path))
    assert result.returncode == 2 and "not a valid plugin name" in result.stderr
