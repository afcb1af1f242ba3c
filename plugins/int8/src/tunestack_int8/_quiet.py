"""Keep torchao's and neural-compressor's import chatter and work files away from the user.

torchao logs "Failed to load ..._C_*.so" (CUDA-only extensions) and a torch pytree notice when
imported; neural-compressor logs at import and during prepare/convert, and writes ``nc_workspace/``
into the current directory. Everything here is imported lazily, inside the hooks. (Core already
filters neural-compressor's records below ERROR when tunestack is imported, for every plugin: peft
imports neural-compressor while wrapping LoRA layers.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "neural_compressor", "torch._dynamo", "torch._inductor")
NOISY_MESSAGES = (
    r".*TypedStorage is deprecated.*",
    r".*torch\.ao\.quantization is deprecated.*",
    r".*quantize_per_tensor.*deprecated.*",
    r".*_stable_hash_for_caching.*",
    r".*To copy construct from a tensor.*",
)


def silence() -> None:
    """Raise the noisy loggers to ERROR and filter the known deprecation notices (idempotent)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in NOISY_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
    warnings.filterwarnings("ignore", module=r"torchao(\..*)?")


def import_torchao() -> None:
    """Import torchao quietly (its loader warns about CUDA-only extensions on CPU machines)."""
    silence()
    import torchao  # noqa: F401

    silence()


@contextlib.contextmanager
def neural_compressor_session() -> Iterator[Path]:
    """Import and run neural-compressor inside a private working directory, quietly.

    INC reads ``LOGLEVEL`` once, when its logger is first built (at import), and writes
    ``./nc_workspace`` relative to the current directory: both are contained here. Yields the
    temporary directory; it is removed afterwards. The current directory is process-wide, so this
    must not run concurrently with code that relies on it.
    """
    silence()
    previous_level = os.environ.get("LOGLEVEL")
    previous_cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tunestack-int8-inc-") as work:
        os.environ["LOGLEVEL"] = "ERROR"
        os.chdir(work)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from neural_compressor.common import set_workspace

                set_workspace(os.path.join(work, "nc_workspace"))
                # its errors are turned into the plugin's own message, so silence them too
                logging.getLogger("neural_compressor").setLevel(logging.CRITICAL)
                yield Path(work)
        finally:
            os.chdir(previous_cwd)
            if previous_level is None:
                os.environ.pop("LOGLEVEL", None)
            else:
                os.environ["LOGLEVEL"] = previous_level
