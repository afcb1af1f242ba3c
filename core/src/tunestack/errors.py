"""Error types. Each carries the exit code the CLI uses, so no caller has to map them again.

User errors (exit 2) are bad input: a stack file, a data file, a model folder, an existing run.
Run failures (exit 1) happen after the input was accepted: NaN loss, a failed gate, a plugin that
raised. Neither prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stack, located by its TOML path (``stage[1].stack[0].ratio``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class TunestackError(Exception):
    """Base class: a failure the CLI reports as one clear message."""

    exit_code = 1


class UserError(TunestackError):
    """The input is wrong; nothing was run or written."""

    exit_code = 2


class StackError(UserError):
    """A stack file has one or more problems; all of them are listed."""

    def __init__(self, problems: Iterable[Problem], source: str = "stack") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{source}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(UserError):
    """A data file cannot be used; the message names the file and, where known, the line."""


class ModelError(UserError):
    """A model source cannot be loaded for the requested task."""


class RunExistsError(UserError):
    """The output folder already holds a run and neither --force nor --resume was given."""


class PluginError(TunestackError):
    """A plugin failed: while loading (strict mode) or inside one of its hooks."""


class RunFailed(TunestackError):
    """The run started but could not finish (NaN loss, failed gate, a hook that raised)."""


class Interrupted(TunestackError):
    """Stopped by SIGINT/SIGTERM; a checkpoint was kept and ``--resume`` continues."""

    exit_code = 130
