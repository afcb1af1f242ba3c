"""Keep third-party import noise out of users' terminals (torchao's loader, torch pytree notices)."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torch.utils._pytree", "torchao", "neural_compressor", "accelerate.utils.other")


def silence_import_noise() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
