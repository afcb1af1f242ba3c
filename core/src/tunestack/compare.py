"""Side-by-side comparison of finished runs: one table and a Pareto picture.

Reads only each run's ``manifest.json`` and ``metrics.json``, so it works on any run folder,
including runs made with third-party methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.errors import UserError

HEADLINE = {"sequence-classification": "accuracy", "token-classification": "entity_f1", "causal-lm": "perplexity"}
LOWER_IS_BETTER = {"perplexity", "loss"}


@dataclass
class RunRow:
    name: str
    path: Path
    task: str
    methods: str
    metric_name: str
    metric: float | None
    params_total: int | None
    params_trainable: int | None
    size_mb: float | None
    latency_b1: float | None
    latency_b32: float | None
    train_examples_per_s: float | None
    retention: float | None = None


def read_run(path: Path, metric: str | None = None) -> RunRow:
    manifest_file = path / "manifest.json"
    metrics_file = path / "metrics.json"
    if not manifest_file.is_file() or not metrics_file.is_file():
        raise UserError(f"{path} is not a finished tunestack run (no manifest.json/metrics.json)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))["final"]
    task = manifest.get("task", "")
    name = metric or HEADLINE.get(task, "accuracy")
    stages = manifest.get("stages", [])
    methods = " -> ".join(
        "+".join(m["method"] for m in s.get("methods", [])) or ("full-ft" if s.get("training") else "-") for s in stages
    )
    trainable = max((s.get("training") or {}).get("trainable_params", 0) for s in stages) if stages else None
    speeds = [(s.get("training") or {}).get("examples_per_s") for s in stages if s.get("training")]
    value = metrics.get(name)
    return RunRow(
        name=manifest.get("name", path.name),
        path=path,
        task=task,
        methods=methods,
        metric_name=name,
        metric=float(value) if isinstance(value, int | float) else None,
        params_total=metrics.get("params_total"),
        params_trainable=trainable,
        size_mb=metrics.get("size_mb"),
        latency_b1=metrics.get("latency_ms_b1"),
        latency_b32=metrics.get("latency_ms_b32"),
        train_examples_per_s=speeds[0] if speeds else None,
    )


def compare_runs(paths: list[Path], baseline: Path | None = None, metric: str | None = None) -> list[RunRow]:
    rows = [read_run(p, metric) for p in paths]
    base = read_run(baseline, metric) if baseline is not None else (rows[0] if rows else None)
    if base is not None and base.metric:
        for row in rows:
            if row.metric is None:
                continue
            row.retention = base.metric / row.metric if row.metric_name in LOWER_IS_BETTER else row.metric / base.metric
    return rows


COLUMNS = ("run", "methods", "metric", "retention", "params", "trainable", "size_mb", "ms@b1", "ms@b32", "train ex/s")


def table_rows(rows: list[RunRow]) -> list[list[Any]]:
    return [
        [
            r.name,
            r.methods,
            f"{r.metric_name}={r.metric:.4f}" if r.metric is not None else "-",
            f"{r.retention:.1%}" if r.retention is not None else "-",
            r.params_total,
            r.params_trainable,
            r.size_mb,
            r.latency_b1,
            r.latency_b32,
            round(r.train_examples_per_s, 1) if r.train_examples_per_s else None,
        ]
        for r in rows
    ]


def markdown(rows: list[RunRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(rows):
        lines.append(
            "| " + " | ".join("-" if c is None else (f"{c:,}" if isinstance(c, int) else str(c)) for c in row) + " |"
        )
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of points no other point beats on both latency (lower) and metric."""
    front = []
    for i, (lat, val) in enumerate(points):
        dominated = False
        for j, (lat2, val2) in enumerate(points):
            if i == j:
                continue
            better = val2 >= val if higher_is_better else val2 <= val
            strictly = (lat2 < lat) or (val2 > val if higher_is_better else val2 < val)
            if lat2 <= lat and better and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda k: points[k][0])


def _label_points(fig: Any, ax: Any, xs: list[float], ys: list[float], names: list[str]) -> None:
    """Label each point where its text overlaps no label placed before it (nearby runs crowd)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)  # labels stay inside the axes
    placed: list[Any] = []
    steps = [4, -10, 14, -20, 24, -30, 34, -40, 44, -50, 54, -60, 64, -70]
    candidates = [(5, dy, "left") for dy in steps] + [(-5, dy, "right") for dy in steps]

    def clash(box: Any) -> float:
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        overlap = sum(
            max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
            for o in placed
        )
        return overlap + (0.0 if inside else 1e9)

    for x, y, name in sorted(zip(xs, ys, names), key=lambda p: (-p[1], p[0])):
        best: tuple[float, Any] | None = None
        for dx, dy, align in candidates:
            arrow = {"arrowstyle": "-", "lw": 0.4, "color": "gray"} if (dx, dy) != (5, 4) else None
            note = ax.annotate(
                name, (x, y), textcoords="offset points", xytext=(dx, dy), ha=align, fontsize=7, arrowprops=arrow
            )
            score = clash(_text_box(note, renderer))
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, note)
            else:
                note.remove()
            if score == 0:
                break
        assert best is not None
        placed.append(_text_box(best[1], renderer))


def _text_box(note: Any, renderer: Any) -> Any:
    """The label's own box, without its leader line."""
    from matplotlib.text import Text

    note.update_positions(renderer)  # an annotation places its text only when drawn
    return Text.get_window_extent(note, renderer)


def plot(rows: list[RunRow], path: Path, latency: str = "b32") -> Path:
    """Metric against CPU latency; marker area follows file size; the Pareto frontier is drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install 'tunestack[plot]')") from None
    usable = [r for r in rows if r.metric is not None and getattr(r, f"latency_{latency}") is not None]
    if not usable:
        raise UserError(f"no run has both a metric and a latency at {latency} to plot")
    xs = [float(getattr(r, f"latency_{latency}")) for r in usable]
    ys = [float(r.metric) for r in usable]  # type: ignore[arg-type]
    sizes = [max(20.0, 4.0 * float(r.size_mb or 1.0)) for r in usable]
    higher = usable[0].metric_name not in LOWER_IS_BETTER
    front = pareto_front(list(zip(xs, ys)), higher)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter(xs, ys, s=sizes, alpha=0.6, color="tab:blue", edgecolors="black", linewidths=0.5)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", linestyle="--", label="Pareto frontier")
    ax.set_xlabel(f"CPU latency, batch {latency[1:]} (ms, median)")
    ax.set_ylabel(usable[0].metric_name)
    ax.set_title("quality vs latency (marker area ~ model size on disk)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()  # before labelling: the labels are placed in the final layout
    _label_points(fig, ax, xs, ys, [r.name for r in usable])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
