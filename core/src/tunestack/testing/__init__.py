"""pytest plugin for tunestack and its plugin authors (auto-loaded through the ``pytest11`` entry point).

Fixtures:

* ``tiny_data`` - a folder of tiny synthetic datasets for every task (:class:`TinyData`);
* ``plugin_host`` - a fresh plugin host with every installed plugin loaded;
* ``run_stack`` - run a stack (dict or TOML text) into a temporary folder, return the RunResult;
* ``make_stack`` - build a complete tiny stack dict around your methods (:func:`tiny_stack`);
* ``cli`` - invoke the ``tunestack`` command line in-process and get a click Result.

The conformance check for a method plugin is :func:`tunestack.testing.conformance.check_method`.
Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tunestack.testing.data import TinyData, write_tiny_data
from tunestack.testing.stacks import (
    FAMILIES,
    TASKS,
    TINY_LABELS,
    changed_parameters,
    initial_model,
    stack_from_toml,
    tiny_model_config,
    tiny_stack,
)

__all__ = [
    "FAMILIES",
    "TASKS",
    "TINY_LABELS",
    "TinyData",
    "changed_parameters",
    "initial_model",
    "tiny_model_config",
    "tiny_stack",
    "write_tiny_data",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def plugin_host() -> Any:
    from tunestack.plugins import create_host

    return create_host()


@pytest.fixture
def make_stack(tiny_data: TinyData) -> Callable[..., dict[str, Any]]:
    def build(**kwargs: Any) -> dict[str, Any]:
        return tiny_stack(tiny_data.folder, **kwargs)

    return build


@pytest.fixture
def run_stack(tmp_path: Path, plugin_host: Any) -> Callable[..., Any]:
    """``run_stack(stack, **options)``: stack is a dict or TOML text; runs under ``tmp_path/runs``."""

    def run(stack: dict[str, Any] | str, **options: Any) -> Any:
        from tunestack.runner import run as run_

        data = stack_from_toml(stack) if isinstance(stack, str) else stack
        options.setdefault("out", tmp_path / "runs")
        options.setdefault("host", plugin_host)
        options.setdefault("base_dir", tmp_path)
        options.setdefault("force", True)
        return run_(data, **options)

    return run


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """``cli("validate", "stack.toml")`` -> click Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from tunestack import cli as cli_module
    from tunestack.plugins import reset_default_host

    reset_default_host()
    if not getattr(cli_module, "_commands_registered", False):
        cli_module._register_commands()
        cli_module._commands_registered = True  # type: ignore[attr-defined]
    runner = CliRunner()

    def invoke(*args: str, **kwargs: Any) -> Any:
        reset_default_host()
        return runner.invoke(
            cli_module.cli, list(args), catch_exceptions=kwargs.pop("catch_exceptions", True), **kwargs
        )

    yield invoke
    reset_default_host()
