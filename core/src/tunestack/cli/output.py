"""Plain-text tables for the terminal (no extra dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

HEADLINE = ("accuracy", "macro_f1", "entity_f1", "token_accuracy", "perplexity", "loss")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"  # metrics keep 4 digits; ms and MB 1
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def _measured(value: Any) -> Any:
    """Milliseconds and megabytes: one decimal is all a timing on a shared machine can claim."""
    return f"{value:.1f}" if isinstance(value, float) else value


def summary_rows(stages: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    metrics = [s["metrics"] for s in stages]
    headline = [k for k in HEADLINE if any(k in m for m in metrics)]
    latency = sorted({k for m in metrics for k in m if k.startswith("latency_ms_b")}, key=lambda k: int(k[12:]))
    headers = [
        "stage",
        "methods",
        *headline,
        "params",
        "trainable",
        "size_mb",
        *[f"ms@b{k[12:]}" for k in latency],
        "status",
    ]
    rows = []
    for stage, m in zip(stages, metrics):
        methods = (
            ", ".join(x["method"] for x in stage["methods"]) or "(full fine-tuning)"
            if stage.get("train")
            else (", ".join(x["method"] for x in stage["methods"]) or "-")
        )
        rows.append(
            [
                stage["name"],
                methods,
                *[m.get(k) for k in headline],
                m.get("params_total"),
                m.get("params_trainable"),
                _measured(m.get("size_mb")),
                *[_measured(m.get(k)) for k in latency],
                stage["status"],
            ]
        )
    return headers, rows


def print_summary(result: Any) -> None:
    headers, rows = summary_rows(result.stages)
    click.echo("")
    click.echo(table(headers, rows))
    click.echo(f"\nrun folder: {result.run_dir}  ({result.status})")
