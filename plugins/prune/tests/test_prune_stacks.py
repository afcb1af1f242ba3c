"""prune inside real (tiny) runs: conformance, recovery training, compress-only, adapters, kd."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import tunestack
from tunestack.api import Contract, Field, Method, MethodSpec, Options, hookimpl
from tunestack.errors import ModelError, StackError
from tunestack.models import auto_class
from tunestack.plugins import create_host
from tunestack.testing.conformance import check_method
from tunestack.validation import load_plan

LABELS = ("negative", "positive")
SAMPLE = ["the film was great and lovely", "the plot was dull", "the cast was superb"]


def logits(model, tokenizer, texts=SAMPLE):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def bert_params(hidden: int, ffn: int, layers: int = 2, vocab: int = 30522, positions: int = 128) -> int:
    """BertForSequenceClassification with two labels, by formula."""
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden  # word, position, type + LayerNorm
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, output + LayerNorm
    feed_forward = (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * hidden
    pooler, classifier = hidden * hidden + hidden, hidden * 2 + 2
    return embeddings + layers * (attention + feed_forward) + pooler + classifier


def method_record(result, stage: int = 0, name: str = "prune"):
    return next(m for m in result.stages[stage]["methods"] if m["method"] == name)


def test_conformance_sequence_classification(tmp_path):
    report = check_method("prune", tmp_path, options={"ratio": 0.5}, families=("bert", "gpt2", "llama"))
    for family in ("bert", "gpt2", "llama"):
        assert f"runs, reloads and predicts on {family}/sequence-classification" in report.passed


def test_conformance_causal_lm_with_taylor_importance(tmp_path):
    report = check_method(
        "prune",
        tmp_path,
        options={"ratio": 0.5, "importance": "taylor", "calibration_batches": 2},
        families=("gpt2", "llama"),
        tasks=("causal-lm",),
    )
    assert "runs, reloads and predicts on llama/causal-lm" in report.passed
    manifest = json.loads((tmp_path / "runs" / "conformance-prune-gpt2-causal-lm" / "manifest.json").read_text())
    reports = next(m for m in manifest["stages"][0]["methods"] if m["method"] == "prune")["reports"]
    assert reports["importance"] == "taylor" and reports["calibration_batches"] == 2
    assert reports["engine"] == "native"  # torch-pruning cannot do GPT-2
    assert reports["shape_after"]["heads"] == 2 and reports["shape_after"]["hidden"] == 16


def test_prune_in_prepare_then_training_recovers_and_reloads_with_the_stock_class(run_stack, make_stack):
    stack = make_stack(
        methods=[{"method": "prune", "ratio": 0.5, "iterative_steps": 2}],
        epochs=4,
        eval={"latency": True, "latency_batch_sizes": [1, 2], "latency_repeats": 1, "latency_warmup": 0},
    )
    result = run_stack(stack)
    record = method_record(result)
    reports = record["reports"]
    assert record["options"]["ratio"] == 0.5 and sorted(record["contract"]["produces"]) == ["pruned", "structural"]
    assert reports["phase"] == "prepare" and reports["engine"] == "depgraph"  # auto: BERT heads + FFN
    assert reports["shape_before"] == {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 4, "head_dim": 8, "ffn": 64}
    assert reports["shape_after"] == {"layers": 2, "hidden": 16, "heads": 2, "kv_heads": 2, "head_dim": 8, "ffn": 32}
    assert [s["heads"] for s in reports["steps"]] == [3, 2] and [s["hidden"] for s in reports["steps"]] == [24, 16]
    assert reports["params_after"] < reports["params_before"] and reports["macs_ratio"] < 0.6
    assert {"latency_ms_b1_before", "latency_ms_b2_before", "latency_ms_b1_after", "latency_ms_b2_after"} <= set(
        reports
    )
    # training after pruning recovers: the loss goes down
    history = result.stages[0]["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    # everything trains after pruning: the count is the analytic size of the pruned BERT
    assert result.stages[0]["training"]["trainable_params"] == bert_params(hidden=16, ffn=32) == reports["params_after"]
    assert reports["params_before"] == bert_params(hidden=32, ffn=64)
    # the run folder is a plain Hugging Face model: the stock class reloads it, identical outputs
    folder = result.run_dir / "model"
    meta = json.loads((folder / "tunestack.json").read_text())
    assert meta["transforms"] == [] and "pruned" in meta["tags"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]) == (16, 2, 32)
    plain = auto_class("sequence-classification").from_pretrained(folder)
    loaded = tunestack.load(result.run_dir)
    assert torch.equal(logits(plain, loaded.tokenizer), logits(loaded.model, loaded.tokenizer))
    metrics = result.stages[0]["metrics"]
    assert metrics["s0-0-prune.macs"] == reports["macs_after"] and metrics["params_total"] == reports["params_after"]
    assert result.stages[0]["reload_max_abs_diff"] == 0.0


def test_compress_only_stage_cuts_the_trained_model_and_changes_nothing_else(run_stack, make_stack, plugin_host):
    stages = [
        {"name": "teacher", "epochs": 1, "stack": []},
        {"name": "cut", "epochs": 0, "stack": [{"method": "prune", "ffn_ratio": 0.5, "engine": "native"}]},
    ]
    result = run_stack(make_stack(stages=stages))
    reports = method_record(result, 1)["reports"]
    assert reports["phase"] == "compress" and reports["engine"] == "native"
    assert "latency_ms_b1_before" not in reports  # [eval] latency = false
    trained = auto_class("sequence-classification").from_pretrained(result.run_dir / "stages" / "00-teacher" / "model")
    pruned = auto_class("sequence-classification").from_pretrained(result.run_dir / "model")
    before, after = trained.state_dict(), pruned.state_dict()
    assert before.keys() == after.keys()
    cut = {k for k in before if before[k].shape != after[k].shape}
    assert cut == {
        f"bert.encoder.layer.{i}.{name}"
        for i in range(2)
        for name in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight")
    }
    assert all(torch.equal(before[k], after[k]) for k in before if k not in cut)
    for i in range(2):  # the kept neurons are rows of the trained weights, in order
        up_before = before[f"bert.encoder.layer.{i}.intermediate.dense.weight"]
        up_after = after[f"bert.encoder.layer.{i}.intermediate.dense.weight"]
        rows = [j for j in range(64) if any(torch.equal(up_before[j], r) for r in up_after)]
        assert len(rows) == 32 and torch.equal(up_before[rows], up_after)
    assert result.stages[1]["training"] is None
    # a later stack starting from this run validates against the pruned config.json
    again = make_stack(methods=[{"method": "prune", "ffn_ratio": 0.75}])
    again["model"] = {"source": str(result.run_dir), "task": "sequence-classification"}
    load_plan(again, plugin_host)  # FFN 32 -> 8
    again["stack"] = [{"method": "prune", "head_ratio": 0.4}]
    with pytest.raises(StackError, match=r"0\.4 of 4 heads leaves 2\.4"):
        load_plan(again, plugin_host)


def test_when_compress_in_a_training_stage_prunes_after_training(run_stack, make_stack):
    result = run_stack(make_stack(methods=[{"method": "prune", "ffn_ratio": 0.5, "when": "compress"}], epochs=1))
    reports = method_record(result)["reports"]
    assert reports["phase"] == "compress"
    assert result.stages[0]["training"]["trainable_params"] == bert_params(hidden=32, ffn=64)  # trained unpruned
    assert result.metrics["params_total"] == reports["params_after"] == bert_params(hidden=32, ffn=32)


def test_llama_gqa_heads_in_a_run_use_the_native_engine(run_stack, make_stack):
    result = run_stack(
        make_stack(family="llama", methods=[{"method": "prune", "head_ratio": 0.5, "gqa_mode": "queries"}])
    )
    reports = method_record(result)["reports"]
    assert reports["engine"] == "native" and reports["shape_after"]["kv_heads"] == 2
    assert reports["shape_after"]["heads"] == 2
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 8)


# -- adapters -------------------------------------------------------------------------------------------


class Wrapped(torch.nn.Module):
    """A module transformers does not know: stands in for an unmerged adapter."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class InsertOptions(Options):
    where: str = Field("classifier", description="top-level module to wrap")


class Insert(Method[InsertOptions]):
    @hookimpl
    def tunestack_prepare(self, model, ctx) -> None:
        setattr(model.model, self.options.where, Wrapped(getattr(model.model, self.options.where)))


@hookimpl
def tunestack_register_methods(register) -> None:
    register(
        MethodSpec(
            name="insert-adapter",
            options=InsertOptions,
            factory=Insert,
            contract=Contract(phases=frozenset({"prepare"}), produces=frozenset({"adapters"})),
        )
    )


def test_modules_prune_cannot_merge_are_refused_at_run_time(tmp_path, make_stack):
    from tunestack.runner import run

    host = create_host(extra_plugins=[("insert-adapter", sys.modules[__name__])])
    stack = make_stack(methods=[{"method": "insert-adapter"}, {"method": "prune", "ratio": 0.5}], epochs=0)
    with pytest.raises(StackError, match="merge the adapters first"):
        load_plan(stack, host)
    stack["stack"][1]["merge_adapters"] = True
    with pytest.raises(
        ModelError, match=r"stack\[1\]: prune needs a plain transformers model, but the model holds Wrapped"
    ):
        run(stack, out=tmp_path / "runs", host=host, base_dir=tmp_path)


def test_prune_merges_a_real_lora_from_an_earlier_stage(run_stack, make_stack, plugin_host):
    pytest.importorskip("tunestack_lora")
    stages = [
        {"name": "tune", "epochs": 1, "stack": [{"method": "lora", "r": 4}]},
        {"name": "cut", "epochs": 1, "stack": [{"method": "prune", "ratio": 0.5}]},
    ]
    with pytest.raises(StackError) as caught:
        load_plan(make_stack(stages=stages), plugin_host)
    assert "'prune' cannot run on a model that is 'adapters'" in str(caught.value)
    assert "merge the adapters first (e.g. lora merge = true) or set merge_adapters = true" in str(caught.value)
    stages[1]["stack"][0]["merge_adapters"] = True
    result = run_stack(make_stack(stages=stages))
    reports = method_record(result, 1)["reports"]
    assert reports["merged_adapters"] == ["stage[0].stack[0]"]
    assert (
        result.stages[1]["transforms"] == []
        and result.stages[1]["training"]["trainable_params"] == reports["params_after"]
    )
    meta = json.loads((result.run_dir / "model" / "tunestack.json").read_text())
    assert meta["transforms"] == [] and "adapters" not in meta["tags"]
    plain = auto_class("sequence-classification").from_pretrained(result.run_dir / "model")
    loaded = tunestack.load(result.run_dir)
    assert torch.equal(logits(plain, loaded.tokenizer), logits(loaded.model, loaded.tokenizer))


def test_kd_with_the_unpruned_input_as_teacher(run_stack, make_stack):
    pytest.importorskip("tunestack_kd")
    result = run_stack(
        make_stack(
            stages=[
                {"name": "teacher", "epochs": 1, "stack": []},
                {
                    "name": "student",
                    "epochs": 2,
                    "stack": [{"method": "kd", "teacher": "input"}, {"method": "prune", "ratio": 0.5}],
                },
            ]
        )
    )
    assert method_record(result, 1)["reports"]["phase"] == "prepare"
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert config["hidden_size"] == 16
