"""Reading data files: TSV, CSV, JSONL and CoNLL columns. Errors name the file and the line.

Torch-free: tasks turn these examples into tensors.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunestack.errors import DataError

FORMATS = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".conll": "conll",
    ".txt": "conll",
}


@dataclass
class Example:
    """One example of any task; each task uses the fields it needs."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""  # "file:line", for error messages
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Example:
        return replace(self, **changes)


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"{path}: cannot tell the format from the extension '{path.suffix}'; set data.format")
    return found


def read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "convert the file to UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text.replace("\r\n", "\n")


def read_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a TSV/CSV (with a header) or JSONL file, each with its 1-based line number."""
    text = read_text(path)
    if fmt == "jsonl":
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
            yield number, record
        return
    if fmt not in {"tsv", "csv"}:
        raise DataError(f"{path}: format '{fmt}' holds no table rows")
    if fmt == "tsv":  # GLUE-style TSV has no quoting
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    header = [h.strip() for h in header]
    for row in reader:
        number = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}")
        yield number, dict(zip(header, row))


def read_conll(path: Path, tag_column: int = -1) -> Iterator[tuple[int, list[str], list[str]]]:
    """Sentences of a CoNLL column file (``token POS chunk TAG``), skipping ``-DOCSTART-``."""
    text = read_text(path)
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped:
            if tokens:
                yield start, tokens, tags
            tokens, tags = [], []
            continue
        columns = stripped.split()
        if columns[0] == "-DOCSTART-":
            continue
        if len(columns) < 2:
            raise DataError(f"{path}:{number}: a CoNLL line needs a token and a tag, got '{stripped}'")
        try:
            tag = columns[tag_column]
        except IndexError:
            raise DataError(f"{path}:{number}: no column {tag_column} in '{stripped}'") from None
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        yield start, tokens, tags


def field_value(record: dict[str, Any], name: str, path: Path, number: int) -> Any:
    if name not in record:
        known = ", ".join(sorted(record))
        raise DataError(f"{path}:{number}: no field '{name}' (fields: {known}); set the field name in [data]")
    return record[name]
