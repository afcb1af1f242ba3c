"""tunestack: compose fine-tuning, parameter-efficient methods and compression in one TOML stack.

``tunestack.run(stack)`` runs a stack file (or dict) and returns a :class:`RunResult`;
``tunestack.load(run_dir)`` reloads a run's final model with a ``predict`` callable. Plugin
authors import from :mod:`tunestack.api`. Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunestack.quiet import silence_import_noise

__version__ = "0.1.0"
__all__ = ["LoadedModel", "RunResult", "__version__", "load", "run", "validate"]

silence_import_noise()

if TYPE_CHECKING:
    from tunestack.loading import LoadedModel
    from tunestack.runner import RunResult


def run(stack: Any, **kwargs: Any) -> RunResult:
    """Validate and run a stack (path or dict). See :func:`tunestack.runner.run`."""
    from tunestack.runner import run as _run

    return _run(stack, **kwargs)


def load(run_dir: Any, **kwargs: Any) -> LoadedModel:
    """Reload a finished run's final model. See :func:`tunestack.loading.load`."""
    from tunestack.loading import load as _load

    return _load(run_dir, **kwargs)


def validate(stack: Any, overrides: list[str] | None = None) -> Any:
    """Validate a stack without running it; raises StackError listing every problem."""
    from tunestack.plugins import default_host
    from tunestack.validation import load_plan

    return load_plan(stack, default_host(), overrides)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from tunestack.runner import RunResult

        return RunResult
    if name == "LoadedModel":
        from tunestack.loading import LoadedModel

        return LoadedModel
    raise AttributeError(name)
