"""Whole runs on tiny random-init models: order, stages, reload, resume, gates, run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunestack
from tunestack.errors import DataError, PluginError, RunExistsError, RunFailed
from tunestack.runner import GateFailed


def test_hook_call_order_follows_the_stack(run_stack, make_stack, calls):
    stack = make_stack(methods=[{"method": "echo", "tag": t} for t in ("first", "second", "third")])
    run_stack(stack)
    for hook in ("prepare", "train_step", "compress", "evaluate", "transform_examples:train"):
        observed = [tag for name, tag in calls if name == hook]
        assert observed == ["first", "second", "third"], (hook, observed)
    prepare = calls.index(("prepare", "first"))
    assert prepare < calls.index(("train_step", "first")) < calls.index(("compress", "first"))


def test_single_stage_run_writes_a_complete_run_folder(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "echo", "metric": 0.5}], epochs=3))
    run_dir = result.run_dir
    assert result.status == "complete"
    for name in (
        "manifest.json",
        "metrics.json",
        "log.jsonl",
        "stack.resolved.toml",
        "model/config.json",
        "model/model.safetensors",
        "model/tunestack.json",
        "model/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pkl"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 0
    assert {d["split"] for d in manifest["data"]} == {"train", "eval"} and len(manifest["data"][0]["sha256"]) == 64
    method = manifest["stages"][0]["methods"][0]
    assert (
        method["method"] == "echo" and method["distribution"] == "tunestack-echo" and method["options"]["metric"] == 0.5
    )
    assert method["reports"] == {"prepared": True}
    assert manifest["environment"]["libraries"]["torch"]
    metrics = result.metrics
    assert metrics["s0-0-echo.value"] == 0.5  # method metrics are namespaced by slot
    assert metrics["accuracy"] > 0.9  # the tiny data is separable
    assert metrics["params_trainable"] == metrics["params_total"] > 0
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and "train" in events


def test_reload_reproduces_outputs(run_stack, make_stack, tiny_data):
    import torch

    result = run_stack(make_stack(methods=[{"method": "echo", "transform": True}]))
    assert result.stages[0]["reload_max_abs_diff"] <= 1e-5
    loaded = tunestack.load(result.run_dir)
    again = tunestack.load(result.run_dir)
    batch = loaded.tokenizer(["the film was great", "the plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded.model(**batch).logits, again.model(**batch).logits, atol=1e-6)
    metrics = loaded.evaluate(latency=False)
    assert metrics["accuracy"] == result.metrics["accuracy"]
    predictions = loaded.predict(["the film was great and lovely"])
    assert predictions[0]["label"] in {"positive", "negative"}


def test_two_stage_stack_feeds_and_records_each_stage(run_stack, make_stack, calls):
    stack = make_stack(
        stages=[
            {"name": "adapt", "stack": [{"method": "echo", "tag": "a", "transform": True}]},
            {"name": "shrink", "epochs": 0, "stack": [{"method": "echo", "tag": "b", "transform": True}]},
        ]
    )
    result = run_stack(stack)
    assert [s["name"] for s in result.stages] == ["adapt", "shrink"]
    assert result.stages[1]["training"] is None
    assert [r["method"] for r in result.stages[1]["transforms"]] == ["echo", "echo"]
    # the second stage starts from the first stage's artifact, rebuilt from its record
    assert calls.index(("rebuild", "a")) < calls.index(("prepare", "b"))
    assert ("train_step", "b") not in calls
    saves = [tag for name, tag in calls if name == "save"]
    assert saves[-2:] == ["b", "a"]  # peeled in reverse record order
    assert (result.run_dir / "stages" / "00-adapt" / "model" / "tunestack.json").is_file()


def test_existing_run_is_not_overwritten_without_force(run_stack, make_stack):
    stack = make_stack(methods=[])
    first = run_stack(stack)
    stamp = (first.run_dir / "manifest.json").read_text()
    with pytest.raises(RunExistsError, match="--force"):
        run_stack(stack, force=False)
    assert (first.run_dir / "manifest.json").read_text() == stamp
    second = run_stack(stack, force=True)
    assert second.run_dir == first.run_dir


def test_failing_plugin_is_named_and_run_left_incomplete(run_stack, make_stack):
    with pytest.raises(PluginError, match=r"plugin 'echo' \(tunestack-echo 0.1.0\) failed in tunestack_prepare"):
        run_stack(make_stack(methods=[{"method": "echo", "fail_in": "prepare"}]))


def test_failing_evaluate_plugin_is_isolated(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "echo", "fail_in": "evaluate"}]))
    assert "accuracy" in result.metrics
    assert "echo" in json.dumps(result.metrics["errors"])


def test_gate_failure_keeps_previous_stage(run_stack, make_stack):
    stack = make_stack(
        stages=[
            {"name": "train", "stack": [{"method": "echo", "tag": "t"}]},
            {
                "name": "hurt",
                "epochs": 1,
                "learning_rate": 5.0,
                "gate": {"metric": "accuracy", "min_retention": 0.99},
                "stack": [{"method": "echo", "tag": "h"}],
            },
        ],
        train={"epochs": 3},
    )
    with pytest.raises(GateFailed) as caught:
        run_stack(stack)
    result = caught.value.result
    assert result.status == "gate-failed"
    assert result.manifest["final_stage"] == "train"
    loaded = tunestack.load(result.run_dir)
    assert loaded.evaluate(latency=False)["accuracy"] == result.stages[0]["metrics"]["accuracy"]


def test_nan_loss_stops_with_a_clear_error(run_stack, make_stack):
    stack = make_stack(methods=[{"method": "echo", "scale_loss": float("nan")}])
    with pytest.raises(RunFailed, match="the loss became nan at step 0"):
        run_stack(stack)


def test_data_errors_name_file_and_line(run_stack, make_stack, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nfine\tpositive\nragged row\tpositive\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:3: expected 2 columns"):
        run_stack(make_stack(data={"train": str(bad)}))
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("text\tlabel\nsomething\tneutral\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{unseen}:2: label 'neutral' does not occur"):
        run_stack(make_stack(data={"eval": str(unseen)}))


def test_run_is_reproducible_by_seed(run_stack, make_stack, tmp_path):
    stack = make_stack(methods=[])
    a = run_stack(stack, out=tmp_path / "a")
    b = run_stack(stack, out=tmp_path / "b")
    assert a.stages[0]["training"]["history"] == b.stages[0]["training"]["history"]


def _start(stack_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tunestack", "run", str(stack_file), "--out", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_step(log: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError("the run ended before it could be interrupted: " + process.stderr.read())
        if log.exists():
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "train" and event["step"] >= step:
                    return
        time.sleep(0.02)
    raise AssertionError("no progress")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    """One uninterrupted reference run shared by the interruption tests."""
    from tunestack.stack import dump_toml
    from tunestack.testing.stacks import tiny_stack

    folder = tmp_path_factory.mktemp("reference")
    stack = tiny_stack(tiny_data.folder, methods=[], train={"epochs": 12, "checkpoint_every": 2, "log_every": 1})
    stack_file = folder / "stack.toml"
    stack_file.write_text(dump_toml(stack), encoding="utf-8")
    reference = subprocess.run(
        [sys.executable, "-m", "tunestack", "run", str(stack_file), "--out", str(folder / "ref"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert reference.returncode == 0, reference.stderr
    return stack_file, folder / "ref" / "tiny"


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, uninterrupted, how):
    import torch

    stack_file, reference_dir = uninterrupted
    out = tmp_path / "runs"
    process = _start(stack_file, out)
    _wait_for_step(out / "tiny.partial" / "log.jsonl", 5, process)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    partial = out / "tiny.partial"
    assert not (out / "tiny").exists(), "an interrupted run must not look complete"
    assert (partial / "INCOMPLETE").is_file()
    assert (partial / "stages" / "00-main" / "checkpoint" / "progress.json").is_file()
    if how != "SIGKILL":
        assert process.returncode == 130 and "--resume" in stderr and "Traceback" not in stderr

    refused = subprocess.run(
        [sys.executable, "-m", "tunestack", "run", str(stack_file), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = _start(stack_file, out, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    done = json.loads((out / "tiny" / "manifest.json").read_text())
    assert done["stages"][0]["training"]["resumed_from_step"] > 0
    ref = json.loads((reference_dir / "manifest.json").read_text())
    assert done["stages"][0]["metrics"]["accuracy"] == ref["stages"][0]["metrics"]["accuracy"]
    assert done["stages"][0]["training"]["final_loss"] == pytest.approx(
        ref["stages"][0]["training"]["final_loss"], abs=1e-6
    )
    a, b = tunestack.load(out / "tiny"), tunestack.load(reference_dir)
    batch = a.tokenizer(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(a.model(**batch).logits, b.model(**batch).logits, atol=1e-5)
