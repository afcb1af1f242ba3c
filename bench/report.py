"""Turns results.json into results.md (tables with every target next to its measurement) and a Pareto plot."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

MINILM_NON_EMBEDDING = 10_650_000  # 22.71M total - 11.92M embeddings + head (performance-anchors.md, Sec. 2)
MINILM_LAYERS, MINILM_WIDTH = 6, 384
CONLL_TEST_TAGS = {
    "B-LOC": 1668,
    "B-MISC": 702,
    "B-ORG": 1661,
    "B-PER": 1617,
    "I-LOC": 257,
    "I-MISC": 216,
    "I-ORG": 835,
    "I-PER": 1156,
    "O": 38323,
}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits if abs(value) < 10 else 1}f}"  # metrics keep 4 digits; ms and rates 1
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def best_of_grid(rows: dict[str, Any], name: str) -> tuple[dict[str, Any] | None, str]:
    """The best row among ``name`` and its learning-rate variants, and a note of every rate tried."""
    tried = {key: row for key, row in rows.items() if key == name or key.startswith(name + "-lr")}
    if not tried:
        return None, ""
    best = max(tried.values(), key=lambda row: row["value"] if row["value"] is not None else -1.0)
    note = ", ".join(f"{_rate(row):g}: {row['value']:.4f}" for row in sorted(tried.values(), key=_rate))
    return best, note


def _rate(row: dict[str, Any]) -> float:
    """The row's learning rate (older results lack the field: read it from the run's resolved stack)."""
    if row.get("learning_rate"):
        return float(row["learning_rate"])
    import tomllib

    resolved = Path(row["run_dir"]) / "stack.resolved.toml"
    if resolved.exists():
        stages = tomllib.loads(resolved.read_text(encoding="utf-8")).get("stage", [])
        return float(max((s.get("learning_rate", 0.0) for s in stages), default=0.0))
    return 0.0


def adaptation(
    rows: dict[str, Any], base_name: str, names: list[str], bars: dict[str, float], split: str = "dev"
) -> str:
    base, _ = best_of_grid(rows, base_name)
    out = []
    for name in [base_name, *names]:
        r, tried = best_of_grid(rows, name)
        if r is None:
            continue
        retention = _ratio(r["value"], base["value"]) if base else None
        bar = bars.get(name)
        share = _ratio(r["params_trainable"], r["params_total"])
        out.append(
            [
                name,
                r["value"],
                f"{retention:.2%}" if retention else "-",
                f"{share:.2%}" if share else "-",
                r["params_trainable"],
                r["train_examples_per_s"],
                tried,
                f">= {bar:.0%}" if bar else "baseline",
                _met(retention >= bar if (bar and retention) else None),
            ]
        )
    headers = [
        "row",
        "metric",
        "retention",
        "trainable %",
        "trainable",
        "train ex/s",
        f"learning rates tried: {split} metric",
        "target",
        "",
    ]
    return _table(headers, out)


def compression(rows: dict[str, Any], base_name: str, names: list[str]) -> str:
    base = rows.get(base_name)  # compression is measured against the very run it started from
    out = []
    for name in names:
        r = rows.get(name)
        if r is None or base is None:
            continue
        delta = (r["value"] - base["value"]) * 100
        retention = _ratio(r["value"], base["value"])
        b1 = _ratio(base["latency_ms_b1"], r["latency_ms_b1"])
        b32 = _ratio(base["latency_ms_b32"], r["latency_ms_b32"])
        size = _ratio(r["size_mb"], base["size_mb"])
        macs = None
        for report in r.get("reports", {}).values():
            if "macs_after" in report and "macs_before" in report:
                macs = _ratio(report["macs_before"], report["macs_after"])
        ok = None
        speed = min(b1 or 0, b32 or 0)  # a speed target holds at batch 1 and at batch 32
        if name in {"sst2-int8-dynamic", "sst2-int8-static", "sst2-int8-torchao-compiled"}:
            ok = delta >= -0.5 and speed >= 1.6
        elif name == "sst2-prune40-kd":
            ok = (retention or 0) >= 0.98 and speed >= 1.5
        elif name == "sst2-kd-student":
            nokd = rows.get("sst2-student-nokd")
            ok = (retention or 0) >= 0.97 and speed >= 1.8 and (nokd is None or r["value"] > nokd["value"])
        elif name in {"sst2-stack-lora-prune-int8", "sst2-stack-lora-prune-int8-emb"}:
            ok = (retention or 0) >= 0.96 and speed >= 2.5 and (size or 9) <= 0.35
        out.append(
            [
                name,
                r["value"],
                f"{delta:+.2f}",
                f"{retention:.2%}" if retention else "-",
                f"{b1:.2f}x" if b1 else "-",
                f"{b32:.2f}x" if b32 else "-",
                f"{size:.3f}x" if size else "-",
                f"{macs:.2f}x" if macs else "-",
                r["params_total"],
                r["target"],
                _met(ok),
            ]
        )
    return _table(
        [
            "row",
            "metric",
            "Δ points",
            "retention",
            "speed-up b1",
            "speed-up b32",
            "size",
            "MACs ratio",
            "params",
            "target",
            "",
        ],
        out,
    )


def conll_tags(rows: dict[str, Any], name: str) -> str:
    r = rows.get(name)
    if r is None or not r.get("tag_report"):
        return ""
    report = r["tag_report"]
    lines = [
        _table(
            ["tag", "precision", "recall", "f1", "support"],
            [[tag, v["precision"], v["recall"], v["f1"], v["support"]] for tag, v in report.items()],
        )
    ]
    supports = {tag: report[tag]["support"] for tag in CONLL_TEST_TAGS if tag in report}
    ok = supports == CONLL_TEST_TAGS and report.get("micro avg", {}).get("support") == 46435
    lines.append(f"\nSupports equal the CoNLL-2003 test set's tag counts (46,435 tokens): **{'yes' if ok else 'NO'}**.")
    return "\n".join(lines)


def prompt_sweep(rows: dict[str, Any]) -> str:
    import statistics

    out = []
    zero = rows.get("sst2-prompt-zeroshot")
    full, _ = best_of_grid(rows, "sst2-full-ft")
    if zero:
        out.append(["zero-shot", f"{zero['value']:.4f}", "-", 1])
    means = []
    for k in (4, 16, 64):
        values = [rows[n]["value"] for n in (f"sst2-prompt-k{k}-s{s}" for s in (0, 1, 2)) if n in rows]
        if not values:
            continue
        mean = statistics.mean(values)
        means.append(mean)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append([f"k = {k}", f"{mean:.4f}", f"{spread:.4f}", len(values)])
    if not out:
        return ""
    out.append(["majority class", "0.5092", "-", "-"])
    if full:
        out.append(["full fine-tuning", f"{full['value']:.4f}", "-", 1])
    rises = all(b >= a for a, b in itertools.pairwise(means))
    above_zero = bool(zero and means) and min(means) >= zero["value"]
    table = _table(["setting", "accuracy", "std", "draws"], out)
    return (
        table
        + f"\n\nMean accuracy rises with k (4 -> 16 -> 64): **{'yes' if rises else 'no'}**; "
        + f"every k above zero-shot: **{'yes' if above_zero else 'no'}**."
    )


def repeatability(rows: dict[str, Any]) -> str:
    """Each repeat row next to the row it repeats: the metric must be equal, timings within noise."""
    out = []
    for name, again in rows.items():
        first = rows.get(again.get("repeats", ""))
        if again["group"] != "repeat" or first is None:
            continue
        for label, key in (
            ("metric", "value"),
            ("train examples/s", "train_examples_per_s"),
            ("latency b1 (ms)", "latency_ms_b1"),
            ("latency b32 (ms)", "latency_ms_b32"),
        ):
            a, b = first.get(key), again.get(key)
            change = f"{(b - a) / a:+.2%}" if isinstance(a, int | float) and isinstance(b, int | float) and a else "-"
            out.append([label, a, b, change])
        out.append(["metric identical", "", "", "**yes**" if first["value"] == again["value"] else "**no**"])
        header = ["", f"`{first['row']}`", f"`{name}`", "change"]
        return _table(header, out)
    return ""


def efficiency(results: dict[str, Any]) -> str:
    peak = results.get("gemm_peak_gflops")
    rows = []
    for name, frozen in (("sst2-full-ft", False), ("sst2-lora", True)):
        r, _ = best_of_grid(results["rows"], name)
        if r is None or not r.get("train_tokens_per_s") or not peak:
            continue
        attention = 2 * MINILM_LAYERS * 64 * MINILM_WIDTH
        forward = 2 * MINILM_NON_EMBEDDING + attention
        per_token = forward * (2 if frozen else 3)
        achieved = r["train_tokens_per_s"] * per_token / 1e9
        rows.append(
            [
                r["row"],
                round(r["train_tokens_per_s"], 1),
                f"{per_token / 1e6:.1f}",
                f"{achieved:.1f}",
                f"{peak:.1f}",
                f"{achieved / peak:.1%}",
            ]
        )
    if not rows:
        return ""
    return _table(["row", "train tokens/s", "MFLOP/token", "achieved GFLOP/s", "GEMM peak GFLOP/s", "of peak"], rows)


def write(results: dict[str, Any], out: Path) -> None:
    rows = {name: dict(row) for name, row in results["rows"].items()}
    side_by_side = results.get("latency", {}).get("rows", {})
    for name, row in rows.items():  # prefer the side-by-side pass: all rows timed in one process, in turn
        if name in side_by_side:
            row["latency_ms_b1"] = side_by_side[name].get("b1", row["latency_ms_b1"])
            row["latency_ms_b32"] = side_by_side[name].get("b32", row["latency_ms_b32"])
    parts = []
    parts.append("### SST-2: adaptation methods (dev accuracy)\n")
    parts.append(
        adaptation(
            rows,
            "sst2-full-ft",
            ["sst2-lora", "sst2-adapter-houlsby", "sst2-adapter-pfeiffer", "sst2-prefix", "sst2-bitfit"],
            {
                "sst2-lora": 0.99,
                "sst2-adapter-houlsby": 0.99,
                "sst2-adapter-pfeiffer": 0.99,
                "sst2-prefix": 0.97,
                "sst2-bitfit": 0.98,
            },
        )
    )
    prompt = [
        [n, rows[n]["value"], rows[n]["target"]] for n in ("sst2-prompt-zeroshot", "sst2-prompt-16shot") if n in rows
    ]
    if prompt:
        parts.append("\n### SST-2: prompts without gradient updates (majority class: 50.9%)\n")
        zero = rows.get("sst2-prompt-zeroshot", {}).get("value")
        for p in prompt:
            ok = (p[1] >= 0.659) if p[0].endswith("zeroshot") else (zero is not None and p[1] > zero)
            p.append(_met(ok))
        parts.append(_table(["row", "accuracy", "target", ""], prompt))
    sweep = prompt_sweep(rows)
    if sweep:
        parts.append("\n### SST-2: few-shot prompts, k examples per class, 3 draws each (mean ± std)\n")
        parts.append(sweep)
    parts.append("\n### SST-2: compression and distillation (vs the fine-tuned model)\n")
    parts.append(
        compression(
            rows,
            "sst2-full-ft",
            [
                "sst2-int8-dynamic",
                "sst2-int8-static",
                "sst2-int8-torchao-compiled",
                "sst2-prune40-only",
                "sst2-prune40-kd",
                "sst2-student-nokd",
                "sst2-kd-student",
                "sst2-stack-lora-prune-int8",
                "sst2-stack-lora-prune-int8-emb",
                "sst2-stack-kd-lora-int8",
            ],
        )
    )
    parts.append("\n### CoNLL-2003 (test set, entity-level F1 with seqeval)\n")
    parts.append(
        adaptation(
            rows,
            "conll-full-ft",
            ["conll-lora", "conll-adapter"],
            {"conll-lora": 0.98, "conll-adapter": 0.98},
            split="test",
        )
    )
    parts.append("\n" + compression(rows, "conll-full-ft", ["conll-int8-dynamic"]))
    tags = conll_tags(rows, "conll-full-ft")
    if tags:
        parts.append("\nToken-level report of `conll-full-ft` on the test set:\n\n" + tags)
    overheads = results.get("overhead_runs") or ([results["overhead"]] if results.get("overhead") else [])
    if overheads:
        parts.append("\n### Framework overhead (LoRA r=8, batch 32 x 64 tokens, same process, interleaved)\n")
        parts.append(
            _table(
                ["measured", "hand-written peft + torch step (ms)", "tunestack step (ms)", "ratio", "target", ""],
                [
                    [
                        overhead.get("measured_at", "first suite run"),
                        overhead["hand_step_ms"],
                        overhead["tunestack_step_ms"],
                        f"{overhead['ratio']:.3f}",
                        "<= 1.03",
                        _met(overhead["ratio"] <= 1.03),
                    ]
                    for overhead in overheads
                ],
            )
        )
    again = repeatability(rows)
    if again:
        parts.append("\n### Reproducibility: one row run twice in the same suite (same seed)\n")
        parts.append(again)
    eff = efficiency(results)
    if eff:
        parts.append("\n### Compute efficiency (training, useful tokens, against a 1024^3 fp32 GEMM)\n")
        parts.append(eff)
    errors = results.get("errors")
    if errors:
        parts.append("\n### Rows that failed\n")
        parts.append(_table(["row", "error"], [[k, v.replace("|", "/")[:300]] for k, v in errors.items()]))
    (out / "results.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    _plot(rows, out)


def _plot(rows: dict[str, Any], out: Path) -> None:
    from tunestack.compare import compare_runs, plot

    main = [
        n for n, r in rows.items() if r["task"] == "sst2" and r["group"] not in ("lr-grid", "prompt-sweep", "repeat")
    ]
    best = [best_of_grid(rows, name)[0] for name in main]  # one point a method: its best learning rate
    paths = [Path(r["run_dir"]) for r in best if r is not None and Path(r["run_dir"]).exists()]
    if len(paths) >= 2:
        plot(compare_runs(paths), out / "pareto.png", latency="b32")


def update_docs(results: dict[str, Any], out: Path, docs: Path) -> None:
    """Put the tables, the plot and where they come from into docs/benchmarks.md."""
    import shutil

    machine = results.get("machine", {})
    cpu = machine.get("cpu", {})
    libraries = machine.get("libraries", {})
    figure = docs / "img" / "benchmarks-pareto.png"
    if (out / "pareto.png").exists():
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "pareto.png", figure)
    hours = results.get("suite_seconds", 0) / 3600
    settings = results.get("settings", {})
    lines = [
        f"Measured on {machine.get('date', '?')} with `python bench/run.py` (settings: SST-2 "
        f"{settings.get('sst2_train')} training examples x {settings.get('sst2_epochs')} epochs; CoNLL-2003 "
        f"{settings.get('conll_train')} training sentences x {settings.get('conll_epochs')} epochs; seed "
        f"{settings.get('seed')}).",
        f"Machine: {cpu.get('model', '?')}, {cpu.get('cores', '?')} cores ({', '.join(cpu.get('flags', []))}), "
        f"torch threads {machine.get('torch_threads', '?')}. The suite's training and evaluation took "
        f"{hours:.1f} h of wall time in total.",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libraries.items())) + ".",
        "",
        "Latencies and speed-ups come from the side-by-side pass (every final model timed in turn, "
        f"{results.get('latency', {}).get('rounds', '?')} rounds, median), not from each run's own measurement.",
        "",
        (out / "results.md").read_text(encoding="utf-8").strip(),
        "",
        "![accuracy against CPU latency at batch 32; marker area follows the model's size on disk]"
        "(img/benchmarks-pareto.png)",
    ]
    page = docs / "benchmarks.md"
    text = page.read_text(encoding="utf-8")
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    page.write_text(before + start + "\n" + "\n".join(lines) + "\n" + end + after, encoding="utf-8")
