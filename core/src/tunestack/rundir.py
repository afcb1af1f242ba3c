"""The run folder's life: checks before anything runs, an incomplete folder while it runs, an
atomic rename when it ends. A finished run is never overwritten without ``force``."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tunestack.errors import RunExistsError, RunFailed, UserError

INCOMPLETE = "INCOMPLETE"


class RunFolder:
    def __init__(self, final: Path, resume: bool, force: bool, main: bool = True) -> None:
        if final.name in {"", ".", ".."}:
            raise UserError(f"'{final}' cannot be a run folder name")
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.resume = resume
        self.force = force
        self.main = main

    def begin(self) -> bool:
        """Check what exists and prepare the working folder. Returns True when resuming."""
        if self.final.exists() and not self.force:
            if self.resume:
                raise RunExistsError(f"{self.final} is already complete; nothing to resume (use --force to run again)")
            raise RunExistsError(f"{self.final} already exists; use --force to replace it or --out to write elsewhere")
        resuming = False
        if self.partial.exists():
            if self.resume:
                resuming = True
            elif self.force:
                if self.main:
                    shutil.rmtree(self.partial)
            else:
                raise RunExistsError(
                    f"an unfinished run is in {self.partial}; use --resume to continue it or --force to start over"
                )
        elif self.resume:
            raise RunExistsError(f"nothing to resume: {self.partial} does not exist")
        if self.main:
            try:
                self.partial.mkdir(parents=True, exist_ok=True)
                self.mark_incomplete("running")
            except OSError as error:
                raise disk_error(error, self.partial) from None
        return resuming

    def mark_incomplete(self, reason: str) -> None:
        if not self.main or not self.partial.exists():
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with contextlib.suppress(OSError):
            (self.partial / INCOMPLETE).write_text(f"{stamp} {reason}\n", encoding="utf-8")

    def write_json(self, name: str, data: Any) -> None:
        if not self.main:
            return
        write_json_atomic(self.partial / name, data)

    def finish(self) -> Path:
        """Make the run visible under its final name in one rename (old run replaced only now)."""
        if not self.main:
            return self.final
        (self.partial / INCOMPLETE).unlink(missing_ok=True)
        try:
            if self.final.exists():
                backup = self.final.with_name(self.final.name + ".replaced")
                if backup.exists():
                    shutil.rmtree(backup)
                self.final.rename(backup)
                self.partial.rename(self.final)
                shutil.rmtree(backup)
            else:
                self.partial.rename(self.final)
        except OSError as error:
            self.mark_incomplete(f"could not finish: {error}")
            raise disk_error(error, self.final) from None
        return self.final


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise disk_error(error, path) from None


def disk_error(error: OSError, where: Path) -> RunFailed:
    if error.errno == errno.ENOSPC:
        return RunFailed(f"the disk is full while writing {where}; free space and run again with --resume")
    return RunFailed(f"cannot write {where}: {error.strerror or error}")
