"""A 2-process CPU run under Accelerate, started with torchrun (what DESIGN.md documents)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunestack
from tunestack.stack import dump_toml


@pytest.mark.distributed
def test_two_process_run_trains_saves_once_and_reloads(tmp_path, make_stack, run_stack):
    stack = make_stack(methods=[], epochs=2)
    stack_file = tmp_path / "stack.toml"
    stack_file.write_text(dump_toml(stack), encoding="utf-8")
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "tunestack",
            "run",
            str(stack_file),
            "--out",
            str(tmp_path / "ddp"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # only the main process reports
    run_dir = tmp_path / "ddp" / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["processes"] == 2
    training = manifest["stages"][0]["training"]
    assert training["steps"] == 2 * 3  # 48 examples / 2 processes / batch 8, two epochs
    assert manifest["stages"][0]["reload_max_abs_diff"] <= 1e-5

    single = run_stack(stack)  # same artifact format from one process
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in (root / "model").rglob("*") if p.is_file())  # noqa: E731
    assert files(run_dir) == files(single.run_dir)
    loaded = tunestack.load(run_dir)
    batch = loaded.tokenizer(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
