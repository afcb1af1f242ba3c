from __future__ import annotations

import json

from tunestack.compare import compare_runs, pareto_front


def _runs(run_stack, make_stack, tmp_path):
    settings = {"latency": True, "latency_batch_sizes": [1, 32], "latency_repeats": 1, "latency_warmup": 0}
    a = run_stack(make_stack(methods=[], epochs=2, eval=settings), out=tmp_path / "a")
    b = run_stack(make_stack(methods=[{"method": "echo"}], epochs=0, eval=settings), out=tmp_path / "b")
    return a, b


def test_compare_table_matches_each_runs_metrics(run_stack, make_stack, tmp_path, cli):
    a, b = _runs(run_stack, make_stack, tmp_path)
    rows = compare_runs([a.run_dir, b.run_dir])
    for row, run in zip(rows, (a, b)):
        final = json.loads((run.run_dir / "metrics.json").read_text())["final"]
        assert row.metric == final["accuracy"]
        assert row.params_total == final["params_total"]
        assert row.size_mb == final["size_mb"]
        assert row.latency_b1 == final["latency_ms_b1"] and row.latency_b32 == final["latency_ms_b32"]
    assert rows[0].retention == 1.0
    assert rows[1].retention == rows[1].metric / rows[0].metric
    assert rows[0].methods == "full-ft" and rows[1].methods == "echo"
    assert rows[0].train_examples_per_s > 0 and rows[1].train_examples_per_s is None

    plot = tmp_path / "pareto.png"
    result = cli("compare", str(a.run_dir), str(b.run_dir), "--plot", str(plot), "--markdown")
    assert result.exit_code == 0, result.output
    assert "| run | methods | metric |" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(plot)).shape[2] in (3, 4)


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, cli):
    result = cli("compare", str(tmp_path))
    assert result.exit_code == 2 and "not a finished tunestack run" in result.output


def test_pareto_front():
    points = [(10.0, 0.9), (5.0, 0.85), (20.0, 0.95), (12.0, 0.88), (5.0, 0.80)]
    assert pareto_front(points) == [1, 0, 2]
    assert pareto_front([(1.0, 3.0), (2.0, 1.0)], higher_is_better=False) == [0, 1]
