"""The benchmark suite: every row of bench/rows.py, the overhead measurement and compute efficiency.

    python bench/run.py            # full suite (SST-2 8,000 train examples x 2 epochs, CoNLL subset)
    python bench/run.py --quick    # a subset on smaller data, for a first look
    python bench/run.py --only sst2-lora --only sst2-int8-dynamic
    python bench/run.py --report   # rebuild results.md and pareto.png from results.json

Writes bench/results/{results.json, results.md, pareto.png} and the run folders under
bench/results/runs/. Rows already in results.json are skipped unless --rerun is given, so an
interrupted suite continues where it stopped. Never run two benchmarks at once on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rows import FULL, QUICK, QUICK_ROWS, ROWS, Row  # noqa: E402
from tunestack.errors import Interrupted  # noqa: E402

HEADLINE = {"sst2": "accuracy", "conll": "entity_f1"}


def machine() -> dict[str, Any]:
    import torch

    from tunestack.provenance import cpu_description, library_versions

    return {
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def row_record(row: Row, result: Any) -> dict[str, Any]:
    metrics = result.metrics
    stages = result.stages
    trained = [s["training"] for s in stages if s.get("training")]
    record = {
        "row": row.name,
        "task": row.task,
        "group": row.group,
        "target": row.target,
        "run_dir": str(result.run_dir),
        "metric": HEADLINE[row.task],
        "value": metrics.get(HEADLINE[row.task]),
        "params_total": metrics.get("params_total"),
        "params_trainable": max((t["trainable_params"] for t in trained), default=0),
        "size_mb": metrics.get("size_mb"),
        "latency_ms_b1": metrics.get("latency_ms_b1"),
        "latency_ms_b32": metrics.get("latency_ms_b32"),
        "train_examples_per_s": trained[-1]["examples_per_s"] if trained else None,
        "train_tokens_per_s": trained[-1]["tokens_per_s"] if trained else None,
        "train_seconds": sum(t["seconds"] for t in trained),
        "learning_rate": max((s["train"]["learning_rate"] for s in stages if s.get("train")), default=None),
        "methods": [[m["method"] for m in s["methods"]] for s in stages],
        "reports": {m["key"]: m["reports"] for s in stages for m in s["methods"] if m["reports"]},
        "repeats": row.repeats,
    }
    if row.task == "conll":
        record["tag_report"] = metrics.get("tag_report")
        record["eval_tokens"] = metrics.get("eval_tokens")
    return record


def run_row(row: Row, settings: Any, runs_dir: Path, done: dict[str, Any]) -> dict[str, Any]:
    import tunestack

    needed = {name: Path(done[name]["run_dir"]) for name in row.needs}
    stack = row.stack(settings, needed)
    started = time.time()
    result = tunestack.run(stack, out=runs_dir, force=True, progress=False)
    record = row_record(row, result)
    record["wall_seconds"] = round(time.time() - started, 1)
    return record


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from results.json")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead", action="store_true", help="measure the overhead and GEMM peak again, only")
    parser.add_argument("--docs", action="store_true", help="also update docs/benchmarks.md")
    parser.add_argument("--latency-pass", action="store_true", help="redo the side-by-side latency pass")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": {}}
    results["settings"] = settings.__dict__
    results.setdefault("machine", machine())

    if not args.report:
        # --latency-pass and --overhead alone redo just that part; with --only, the rows come first
        do_rows = bool(args.only) or not (args.latency_pass or args.overhead)
        do_overhead = args.overhead or (
            not args.skip_overhead and not args.only and (args.rerun or "overhead" not in results)
        )
        do_latency = args.latency_pass or (not args.only and not args.overhead)

        def save() -> None:
            results_file.write_text(json.dumps(results, indent=2, default=str))

        rows = [r for r in ROWS if (not args.quick or r.name in QUICK_ROWS) and (not args.only or r.name in args.only)]
        suite_started = time.time()
        for row in rows if do_rows else []:
            if row.name in results["rows"] and not args.rerun:
                print(f"= {row.name}: done earlier", flush=True)
                continue
            missing = [n for n in row.needs if n not in results["rows"]]
            if missing:
                print(f"! {row.name}: skipped, needs {missing}", flush=True)
                continue
            print(f"> {row.name} ...", flush=True)
            try:
                record = run_row(row, settings, out / "runs", results["rows"])
            except Interrupted:
                raise  # Ctrl-C or SIGTERM stops the suite; the rows done so far are in results.json
            except Exception as error:  # record and keep going: one broken row must not lose the others
                results.setdefault("errors", {})[row.name] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
                save()
                continue
            results.get("errors", {}).pop(row.name, None)
            results["rows"][row.name] = record
            print(f"  {record['metric']}={record['value']}  {record['wall_seconds']} s", flush=True)
            save()
        if do_overhead:
            import overhead

            print("> overhead ...", flush=True)
            results.setdefault("overhead_runs", [results["overhead"]] if "overhead" in results else [])
            results["overhead"] = overhead.measure(out / "runs")
            results["overhead"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            results["overhead_runs"].append(results["overhead"])  # every measurement is shown
            results["gemm_peak_gflops"] = round(overhead.gemm_peak_gflops(), 1)
        if do_latency:
            import latency

            print("> side-by-side latency pass ...", flush=True)
            results["latency"] = latency.side_by_side(results["rows"])
        results["suite_seconds"] = round(results.get("suite_seconds", 0) + time.time() - suite_started, 1)
        results["machine"] = machine()
        save()

    import report

    report.write(results, out)
    print(f"wrote {out / 'results.md'}")
    if args.docs:
        report.update_docs(results, out, HERE.parent / "docs")
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
