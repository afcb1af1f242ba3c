"""What produced a run: versions, machine, data hashes. Recorded in the manifest."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path
from typing import Any

LIBRARIES = (
    "tunestack",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "torch-pruning",
    "neural-compressor",
    "torchao",
    "safetensors",
    "tokenizers",
    "pluggy",
    "pydantic",
    "seqeval",
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def cpu_description() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in {"fma", "f16c"})
            break
    return info


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": library_versions(),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
