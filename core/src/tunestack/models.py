"""Loading models and tokenizers from every kind of source, safely.

Only safetensors weights are read (``use_safetensors=True``) and ``trust_remote_code`` stays off
unless the stack asks for it, so a model folder can never run code or unpickle objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tunestack.errors import ModelError
from tunestack.sources import SourceRef, packaged_model_dir

AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load chatter (newly initialised heads are expected here)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    previous_level = logging.getLogger("transformers").level
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
        logging.getLogger("transformers").setLevel(previous_level)


def auto_class(name: str) -> Any:
    import transformers

    if name not in AUTO_CLASSES:
        raise ModelError(f"unknown model class '{name}' (known: {', '.join(AUTO_CLASSES)})")
    return getattr(transformers, AUTO_CLASSES[name])


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(where: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = Path(where)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"no usable tokenizer in {where}: none of {', '.join(TOKENIZER_FILES)} is there; "
            'set model.tokenizer to a folder that has one (or "minilm")'
        )
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"no usable tokenizer in {where}: {_first_line(error)}") from None
    if len(tokenizer) < 10:
        raise ModelError(f"no usable tokenizer in {where}: its vocabulary has {len(tokenizer)} entries")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"the tokenizer in {where} is not a fast tokenizer (tokenizer.json); tunestack needs one")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def tokenizer_source(ref: SourceRef, explicit: str | None, base_dir: Path) -> str | Path:
    if explicit:
        if explicit.lower() in {"minilm", "all-minilm-l6-v2"}:
            return packaged_model_dir(explicit.lower())
        path = Path(explicit).expanduser()
        path = path if path.is_absolute() else base_dir / path
        return path if path.exists() else explicit
    if ref.kind == "config":
        return packaged_model_dir("minilm")
    if ref.model_dir is not None:
        return ref.model_dir
    return ref.text


def load_pretrained(
    where: str | Path,
    class_name: str,
    kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    allowed_missing: Sequence[str] = (),
) -> Any:
    """Load weights with the auto-class; only safetensors; missing weights are an error.

    ``allowed_missing`` are keys a transform stored itself (quantized weights): they are
    restored by ``tunestack_rebuild``.
    """
    cls = auto_class(class_name)
    folder = Path(where)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is not a model folder: it has no config.json")
        if not any(folder.glob("*.safetensors")) and not allowed_missing:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            extra = f" (found {', '.join(pickles)}: pickled weights are not loaded)" if pickles else ""
            raise ModelError(f"{folder} holds no safetensors weights{extra}")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                str(where),
                use_safetensors=True if folder.exists() else None,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **(kwargs or {}),
            )
    except ValueError as error:
        text = _first_line(error)
        if "trust_remote_code" in text:
            raise ModelError(
                f"{where} needs custom code to load; set model.trust_remote_code = true only if you trust it"
            ) from None
        raise ModelError(f"cannot load {where} as {class_name}: {text}") from None
    except (OSError, KeyError, TypeError, RuntimeError) as error:
        raise ModelError(f"cannot load {where} as {class_name}: {_first_line(error)}") from None
    missing = set(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise ModelError(f"{where}: weights do not fit the config: {_sample([str(m) for m in mismatched])}")
    if folder.exists() and allowed_missing is not None:
        unexpected_missing = {k for k in missing if k not in set(allowed_missing)} - _head_keys(
            model, class_name, where
        )
        if unexpected_missing:
            raise ModelError(f"{where}: weights missing from the folder: {_sample(sorted(unexpected_missing))}")
    return model


def _head_keys(model: Any, class_name: str, where: str | Path) -> set[str]:
    """Keys a fresh task head may lack when a base model is loaded with a task class."""
    folder = Path(where)
    marker = folder / "tunestack.json"
    if marker.exists():
        return set()  # a tunestack artifact must be complete
    names = set()
    for name, _ in model.named_parameters():
        top = name.split(".")[0]
        if top in {"classifier", "score", "lm_head", "cls", "qa_outputs", "pooler"} or ".pooler." in name:
            names.add(name)
    return names


def build_from_config(config: dict[str, Any], class_name: str, kwargs: dict[str, Any] | None = None) -> Any:
    """A random-init model from a config table (tests and plugin authors use tiny ones)."""
    from transformers import AutoConfig

    values = dict(config)
    model_type = values.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **values, **(kwargs or {}))
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"model.config: {_first_line(error)}") from None
    cls = auto_class(class_name)
    try:
        with quiet_transformers():
            return cls.from_config(hf_config)
    except ValueError as error:
        raise ModelError(f"model.config: a '{model_type}' model cannot do {class_name}: {_first_line(error)}") from None


def fit_tokenizer(model: Any, tokenizer: Any) -> None:
    """Make the model and tokenizer agree on the vocabulary size and the pad token."""
    vocab = len(tokenizer)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.num_embeddings < vocab:
        model.resize_token_embeddings(vocab)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config is not None and not getattr(config, "type_vocab_size", 0):
        # a BERT tokenizer on a GPT-2/Llama model: token types would be added as word embeddings
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]


def offline_default() -> None:
    """Hub ids work online; tests and CI set HF_HUB_OFFLINE=1 so nothing is ever fetched."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _sample(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
