"""Behaviour on tiny random-init models: real int8 modules, exact reloads, calibration, fallback, auto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunestack
from tunestack.errors import PluginError

PROBE = ["the film was great and warm", "the plot was dull", "the cast was clever and the score moving"]


def _reports(result, method: str = "int8") -> dict:
    return next(m for m in result.stages[-1]["methods"] if m["method"] == method)["reports"]


def _outputs(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBE, return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None) if "token_type_ids" not in tokenizer.model_input_names else None
    with torch.inference_mode():
        return model(**batch).logits


def _transform_folder(run_dir: Path) -> Path:
    folders = sorted((run_dir / "model" / "transforms").glob("*int8"))
    assert len(folders) == 1, folders
    return folders[0]


def _kind_check(module, kind: str) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from tunestack_int8.kernels import StaticQuantizedLinear

    if kind == "fbgemm-dynamic":
        return type(module) is DynamicLinear and module.weight().dtype == torch.qint8
    if kind == "fbgemm-static":
        return type(module) is StaticQuantizedLinear and module.weight().dtype == torch.qint8
    weight = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear and type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    )


@pytest.mark.parametrize(
    ("family", "backend", "mode", "kind", "count"),
    [
        ("bert", "fbgemm", "dynamic", "fbgemm-dynamic", 13),  # 2 x (q, k, v, o, up, down) + pooler
        ("bert", "torchao", "static", "torchao-static", 13),
        ("gpt2", "fbgemm", "static", "fbgemm-static", 8),  # Conv1D: 2 x (c_attn, c_proj, c_fc, c_proj)
        ("gpt2", "torchao", "dynamic", "torchao-dynamic", 8),
        ("llama", "fbgemm", "dynamic", "fbgemm-dynamic", 14),  # 2 x (q, k, v, o, gate, up, down)
    ],
)
def test_modules_are_really_int8_and_reload_exactly(run_stack, make_stack, family, backend, mode, kind, count):
    result = run_stack(
        make_stack(family=family, methods=[{"method": "int8", "backend": backend, "mode": mode}], epochs=0)
    )
    reports = _reports(result)
    assert reports["backend"] == backend and reports["mode"] == mode
    assert reports["quantized_modules"] == count and reports["quantized_by_kind"] == {kind: count}
    assert 0 < reports["output_change"] < 0.2
    assert result.stages[0]["reload_max_abs_diff"] == 0.0  # deterministic kernels: bit-exact
    first = tunestack.load(result.run_dir)
    model = first.model
    quantized = [n for n, m in model.named_modules() if n and _kind_check(m, kind)]
    assert len(quantized) == count
    head = model.classifier if family == "bert" else model.score
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # the head stays fp32
    if family == "gpt2":
        assert all(n.split(".")[-1] in {"c_attn", "c_proj", "c_fc"} for n in quantized)
    second = tunestack.load(result.run_dir)
    assert torch.equal(_outputs(model, first.tokenizer), _outputs(second.model, second.tokenizer))

    folder = _transform_folder(result.run_dir)
    info = json.loads((folder / "int8.json").read_text())
    assert info["backend"] == backend and info["mode"] == mode and sorted(info["modules"]) == sorted(quantized)
    from safetensors import safe_open

    with safe_open(str(folder / "int8.safetensors"), "pt") as stored:
        keys = set(stored.keys())
        weights = [k for k in keys if k.endswith((".qweight", "._weight_qdata"))]
        int8_keys = [k for k in weights if stored.get_tensor(k).dtype == torch.int8]
    assert len(weights) == len(int8_keys) == count
    with safe_open(str(result.run_dir / "model" / "model.safetensors"), "pt") as base:
        base_keys = set(base.keys())
    assert not {f"{n}.weight" for n in quantized} & base_keys  # claimed: stored once, in int8 form
    assert not [p for p in (result.run_dir / "model").rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]
    record = json.loads((result.run_dir / "model" / "tunestack.json").read_text())["transforms"][0]
    assert record["method"] == "int8" and f"{quantized[0]}.weight" in record["claimed"]


def test_auto_times_the_candidates_and_records_its_choice(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "int8"}], epochs=0))
    reports = _reports(result)
    auto = reports["auto"]
    assert set(auto["candidates"]) == {"fbgemm", "torchao"}
    candidates = auto["candidates"]
    assert all(m["ms"] > 0 and m["ms_batch1"] > 0 and m["speedup"] > 0 for m in candidates.values())
    assert auto["choice"] == max(candidates, key=lambda c: candidates[c]["speedup"]) == reports["backend"]
    assert auto["reason"].startswith(f"fastest eager int8 model on this machine: {auto['choice']}")
    assert auto["fp32_ms"] > 0 and auto["fp32_ms_batch1"] > 0 and auto["batch"] == "8x9"
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    recorded = manifest["stages"][0]["methods"][0]
    assert recorded["options"]["backend"] == "auto" and recorded["reports"]["backend"] == auto["choice"]
    assert recorded["distribution"] == "tunestack-int8"


def test_static_calibration_uses_the_training_batches_and_falls_back_to_eval(run_stack, make_stack, tiny_data):
    from tunestack_int8.kernels import StaticQuantizedLinear

    entry = {"method": "int8", "backend": "fbgemm", "mode": "static", "calibration_batches": 2}
    result = run_stack(make_stack(methods=[entry], epochs=0))
    assert _reports(result)["calibration"] == {"split": "train", "batches": 2, "output_change_batches": 2}
    model = tunestack.load(result.run_dir).model
    layer = model.bert.encoder.layer[0]
    scales = {layer.attention.self.query.input_scale, layer.output.dense.input_scale}
    assert all(isinstance(m, StaticQuantizedLinear) for m in (layer.attention.self.query, layer.output.dense))
    assert len(scales) == 2 and all(s > 0 for s in scales)  # one calibrated range per module

    no_train = make_stack(methods=[entry], epochs=0, data={"train": None, "labels": ["negative", "positive"]})
    fallback = run_stack(no_train)
    assert _reports(fallback)["calibration"] == {"split": "eval", "batches": 2, "output_change_batches": 2}
    assert fallback.stages[0]["reload_max_abs_diff"] == 0.0


def test_max_output_change_keeps_the_sensitive_modules_in_fp32(run_stack, make_stack):
    def run(limit):
        entry = {"method": "int8", "backend": "fbgemm", "max_output_change": limit}
        return run_stack(make_stack(methods=[entry], epochs=0))

    loose = run(1.0)
    changes = _reports(loose)["module_output_change"]
    assert len(changes) == 13 and _reports(loose)["fp32_kept"] == {} and _reports(loose)["fp32_kept_for_total"] == []
    ordered = sorted(changes.values())
    limit = (ordered[-2] + ordered[-3]) / 2  # the two most sensitive modules fail on their own
    strict = run(limit)
    reports = _reports(strict)
    alone = {n for n, c in changes.items() if c > limit}
    assert len(alone) == 2 and alone <= set(reports["fp32_kept"])
    # then modules return to fp32, most sensitive first, until the whole model is within the limit
    returned = reports["fp32_kept_for_total"]
    assert set(reports["fp32_kept"]) == alone | set(returned)
    assert returned == sorted(returned, key=lambda n: -changes[n])
    assert all(
        changes[n] >= max((c for m, c in changes.items() if m not in reports["fp32_kept"]), default=0) for n in returned
    )
    assert reports["output_change"] <= limit < _reports(loose)["output_change"]
    assert reports["quantized_modules"] == 13 - len(reports["fp32_kept"]) >= 1
    model = tunestack.load(strict.run_dir).model
    for name in reports["fp32_kept"]:
        module = model.get_submodule(name)
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert strict.stages[0]["reload_max_abs_diff"] == 0.0

    with pytest.raises(Exception, match="keeps every module in fp32, so nothing would be quantized") as caught:
        run(1e-12)
    assert not isinstance(caught.value, PluginError)  # a user error, not a plugin crash


def test_embeddings_shrink_the_model_and_reload_exactly(run_stack, make_stack):
    from torch.ao.nn.quantized import Embedding as QuantizedEmbedding

    entry = {"method": "int8", "backend": "fbgemm", "modules": ["linear", "embedding"]}
    result = run_stack(make_stack(methods=[entry], epochs=0))
    reports = _reports(result)
    assert reports["quantized_by_kind"] == {"fbgemm-dynamic": 13, "fbgemm-embedding": 3}
    assert reports["weights_bytes_after"] < 0.35 * reports["weights_bytes_before"]  # 30522 x 32 embedding table
    model = tunestack.load(result.run_dir).model
    assert isinstance(model.bert.embeddings.word_embeddings, QuantizedEmbedding)
    assert result.stages[0]["reload_max_abs_diff"] == 0.0
    assert result.metrics["size_mb"] < 0.4 * 4.0  # what ships: the run folder's safetensors


def test_latency_and_size_are_reported_unless_latency_is_off(run_stack, make_stack):
    timed = {"latency": True, "latency_batch_sizes": [1], "latency_warmup": 0, "latency_repeats": 1}
    result = run_stack(make_stack(methods=[{"method": "int8", "backend": "fbgemm"}], epochs=0, eval=timed))
    reports = _reports(result)
    assert reports["latency_ms_before"] > 0 and reports["latency_ms_after"] > 0
    assert reports["speedup"] == pytest.approx(reports["latency_ms_before"] / reports["latency_ms_after"], rel=0.01)
    assert reports["latency_batch"] == "8x9"
    assert reports["weights_bytes_before"] > reports["weights_bytes_after"] > 0
    quiet = run_stack(make_stack(methods=[{"method": "int8", "backend": "fbgemm"}], epochs=0))
    assert "latency_ms_after" not in _reports(quiet) and "weights_bytes_after" in _reports(quiet)


def test_full_fine_tuning_then_int8_in_one_stage(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "int8", "backend": "fbgemm"}], epochs=2))
    history = result.stages[0]["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert _reports(result)["quantized_modules"] == 13 and result.metrics["accuracy"] >= 0.5
    assert result.manifest["final_tags"] == ["quantized"]


def test_lora_merged_then_int8_in_the_same_stage(run_stack, make_stack):
    pytest.importorskip("tunestack_lora")
    result = run_stack(
        make_stack(methods=[{"method": "lora", "merge": True}, {"method": "int8", "backend": "fbgemm"}], epochs=1)
    )
    assert _reports(result, "lora")["merged"] is True
    assert [t["method"] for t in result.stages[0]["transforms"]] == ["int8"]
    assert _reports(result)["quantized_modules"] == 13
    model = tunestack.load(result.run_dir).model
    assert "lora" not in " ".join(n for n, _ in model.named_modules())
    assert result.stages[0]["reload_max_abs_diff"] == 0.0


def test_prune_then_int8_quantizes_the_pruned_shapes(run_stack, make_stack):
    pytest.importorskip("tunestack_prune")
    entries = [{"method": "prune", "ffn_ratio": 0.5}, {"method": "int8", "backend": "fbgemm"}]
    result = run_stack(make_stack(methods=entries, epochs=0))
    model = tunestack.load(result.run_dir).model
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 32
    assert _reports(result)["quantized_modules"] == 13
    assert result.stages[0]["reload_max_abs_diff"] == 0.0


def test_neural_compressor_calibrates_without_leaving_nc_workspace(run_stack, make_stack, tmp_path, monkeypatch):
    pytest.importorskip("neural_compressor")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    entry = {"method": "int8", "backend": "neural-compressor", "mode": "static"}
    result = run_stack(make_stack(methods=[entry], epochs=0))
    reports = _reports(result)
    assert reports["backend"] == "neural-compressor" and "fallback" not in reports
    assert reports["calibrated_by"]["library"] == "neural-compressor"
    assert reports["quantized_by_kind"] == {"fbgemm-static": 13}
    assert result.stages[0]["reload_max_abs_diff"] == 0.0
    assert Path.cwd() == cwd
    assert not list(cwd.iterdir()) and not list(tmp_path.rglob("nc_workspace"))


def test_when_neural_compressor_cannot_calibrate_fbgemm_does_and_says_so(run_stack, make_stack, monkeypatch):
    from tunestack_int8 import inc

    def refuse(*args, **kwargs):
        raise inc.IncUnavailable("torch.export of the model failed: simulated")

    monkeypatch.setattr(inc, "calibrate", refuse)
    result = run_stack(make_stack(methods=[{"method": "int8", "backend": "neural-compressor"}], epochs=0))
    reports = _reports(result)
    assert reports["backend"] == "fbgemm" and reports["quantized_by_kind"] == {"fbgemm-dynamic": 13}
    assert reports["fallback"]["from"] == "neural-compressor" and "simulated" in reports["fallback"]["reason"]


def test_a_cli_run_prints_no_third_party_noise(make_stack, tmp_path):
    import subprocess
    import sys

    from tunestack.stack import dump_toml

    pytest.importorskip("neural_compressor")
    stack = make_stack(methods=[{"method": "int8", "backend": "neural-compressor", "mode": "static"}], epochs=0)
    path = tmp_path / "stack.toml"
    path.write_text(dump_toml(stack), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "tunestack", "run", str(path), "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for noise in ("Failed to load", "[WARNING]", "register_constant", "nc_workspace", "Traceback"):
        assert noise not in output, output[-3000:]
    assert not list(tmp_path.rglob("nc_workspace"))
