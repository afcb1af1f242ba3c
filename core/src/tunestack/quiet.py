"""Keep third-party import noise out of users' terminals (torchao's loader, torch pytree notices)."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torch.utils._pytree", "torchao", "neural_compressor", "accelerate.utils.other")


class ErrorsOnly(logging.Filter):
    """Drops records below ERROR. A filter, not a level: some libraries reset their logger's level
    when imported (neural-compressor does), but keep its filters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def silence_import_noise() -> None:
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if not any(isinstance(f, ErrorsOnly) for f in logger.filters):
            logger.addFilter(ErrorsOnly())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
