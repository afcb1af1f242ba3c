"""Metric arithmetic in plain Python (tested against hand-computed values)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def accuracy(gold: Sequence[Any], pred: Sequence[Any]) -> float:
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def per_label_report(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Precision, recall, F1 and support per label, with micro, macro and weighted averages.

    The layout of scikit-learn's ``classification_report``, which is how CoNLL-2003 token-level
    results are usually quoted.
    """
    names = list(labels) if labels is not None else sorted(set(gold) | set(pred))
    support = Counter(gold)
    predicted = Counter(pred)
    correct = Counter(g for g, p in zip(gold, pred) if g == p)
    rows: dict[str, Any] = {}
    for name in names:
        tp = correct[name]
        precision = tp / predicted[name] if predicted[name] else 0.0
        recall = tp / support[name] if support[name] else 0.0
        rows[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": support[name],
        }
    total = sum(support[n] for n in names)
    tp_all = sum(correct[n] for n in names)
    pred_all = sum(predicted[n] for n in names)
    micro_p = tp_all / pred_all if pred_all else 0.0
    micro_r = tp_all / total if total else 0.0
    rows["micro avg"] = {
        "precision": micro_p,
        "recall": micro_r,
        "f1": _f1(micro_p, micro_r),
        "support": total,
    }
    present = [rows[n] for n in names]
    if present:
        rows["macro avg"] = {
            key: sum(r[key] for r in present) / len(present) for key in ("precision", "recall", "f1")
        } | {"support": total}
        rows["weighted avg"] = {
            key: (sum(r[key] * r["support"] for r in present) / total if total else 0.0)
            for key in ("precision", "recall", "f1")
        } | {"support": total}
    return rows


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    report = per_label_report(gold, pred, labels)
    return float(report["macro avg"]["f1"]) if "macro avg" in report else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def format_report(report: dict[str, Any]) -> str:
    """The per-label report as an aligned text table."""
    width = max([len(k) for k in report] + [12])
    lines = [f"{'':>{width}}  precision    recall        f1   support"]
    for name, row in report.items():
        if name == "micro avg":
            lines.append("")
        lines.append(
            f"{name:>{width}}  {row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f} {row['support']:9d}"
        )
    return "\n".join(lines)
