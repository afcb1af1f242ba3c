"""``tunestack new-plugin NAME``: a complete method plugin distribution whose tests pass as generated.

The generated method is a working no-op with every hook a method usually needs, documented, so an
author fills in one body (``prepare``) and keeps the conformance check green.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from tunestack.errors import UserError

PYPROJECT = Template("""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tunestack-$name"
version = "0.1.0"
description = "tunestack method plugin: $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["tunestack>=$core_version"]

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.tunestack]
$name = "$module"

[tool.setuptools.packages.find]
where = ["src"]
""")

MODULE = Template('''"""The ``$name`` method for tunestack.

Fill in ``tunestack_prepare`` (or ``tunestack_compress``) with what the method does; declare in
CONTRACT what it needs and produces so tunestack can refuse impossible orders before running.
Import torch and friends inside hooks, never at module level: ``tunestack plugins`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from tunestack.api import (
    Contract,
    Field,
    Method,
    MethodSpec,
    ModelHandle,
    Options,
    Problem,
    StageContext,
    StagePlan,
    ValidationContext,
    hookimpl,
)


class ${cls}Options(Options):
    """Options of one ``$name`` entry in a stack; unknown keys are rejected."""

    scale: float = Field(1.0, gt=0, description="an example option: replace with your method's settings")


CONTRACT = Contract(
    phases=frozenset({"prepare"}),
    requires=frozenset({"float-weights"}),
    reasons={"float-weights": "$name works on floating-point weights"},
)


class $cls(Method[${cls}Options]):
    """One ``$name`` entry of a stack; tunestack registers it only while its stage runs."""

    @hookimpl
    def tunestack_validate_stage(self, stage: StagePlan, ctx: ValidationContext) -> list[Problem]:
        """Checks that need the stack or the model's config (ctx.model_config), before any weights load."""
        return []

    @hookimpl
    def tunestack_prepare(self, model: ModelHandle, ctx: StageContext) -> None:
        """Change ``model.model`` before training. This is the body to fill in.

        If you insert modules or wrap the model, call ``model.record_transform(self, state)`` and
        implement ``tunestack_save``/``tunestack_rebuild`` so the run folder reloads exactly.
        """
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        ctx.report(self, "trainable_params", trainable)


@hookimpl
def tunestack_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="$name",
            options=${cls}Options,
            factory=$cls,
            contract=CONTRACT,
            description="$name: describe what the method does in one line",
        )
    )
''')

TESTS = Template('''"""Tests for the $name plugin; they run with only tunestack and this plugin installed."""

from __future__ import annotations

import pytest

from tunestack.errors import StackError
from tunestack.testing.conformance import check_method
from tunestack.validation import load_plan


def test_conformance(tmp_path):
    report = check_method("$name", tmp_path, families=("bert",))
    assert "runs, reloads and predicts on bert/sequence-classification" in report.passed


def test_unknown_option_is_rejected(plugin_host, make_stack):
    with pytest.raises(StackError, match=r"stack\\[0\\]\\.scal: unknown key; did you mean 'scale'\\?"):
        load_plan(make_stack(methods=[{"method": "$name", "scal": 2}]), plugin_host)


def test_runs_in_a_stack(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "$name"}]))
    assert result.status == "complete"
    assert result.stages[0]["methods"][0]["reports"]["trainable_params"] > 0
''')

README = Template("""# tunestack-$name

A method plugin for [tunestack](https://pypi.org/project/tunestack/).

```sh
pip install -e .          # or: tunestack install tunestack-$name
tunestack methods $name   # shows its options
```

## Options

| option | type | default | description |
| --- | --- | --- | --- |
| `scale` | float | `1.0` | an example option: replace with your method's settings |

## Example stack

```toml
[model]
source = "minilm"

[data]
train = "train.tsv"
eval = "dev.tsv"

[[stack]]
method = "$name"
scale = 1.0
```

## Contract

Acts in `prepare`; requires floating-point weights.

## Tests

```sh
pytest tests
```
""")


def plugin_names(name: str) -> tuple[str, str, str]:
    """(method name, module name, class name) for a plugin name like ``my-method``."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", name):
        raise UserError(f"'{name}' is not a valid plugin name: use lower-case letters, digits and dashes")
    method = name.replace("_", "-")
    module = "tunestack_" + method.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", method))
    return method, module, cls


def write_plugin(name: str, folder: Path, core_version: str) -> Path:
    method, module, cls = plugin_names(name)
    root = folder / f"tunestack-{method}"
    if root.exists():
        raise UserError(f"{root} already exists; choose another --dir or name")
    values = {"name": method, "module": module, "cls": cls, "core_version": core_version}
    files = {
        root / "pyproject.toml": PYPROJECT.substitute(values),
        root / "src" / module / "__init__.py": MODULE.substitute(values),
        root / "tests" / f"test_{module}.py": TESTS.substitute(values),
        root / "README.md": README.substitute(values),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
