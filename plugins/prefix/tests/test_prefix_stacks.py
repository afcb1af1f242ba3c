"""Options, validation and whole tiny runs: training, what changes, save/reload, composition."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tunestack
from tunestack.errors import StackError
from tunestack.testing import changed_parameters as changed
from tunestack.testing import initial_model
from tunestack.validation import load_plan


def problems(plugin_host, stack) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, plugin_host)
    return str(caught.value)


def test_import_is_light():
    code = "import sys, tunestack_prefix; sys.exit(1 if {'torch', 'transformers', 'peft'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- options and validation -----------------------------------------------------------------------------


def test_options_reject_unknown_keys_and_bad_values(plugin_host, make_stack):
    text = problems(plugin_host, make_stack(methods=[{"method": "prefix", "virtual_tokens": 4}]))
    assert "stack[0].virtual_tokens" in text and "unknown key" in text
    text = problems(plugin_host, make_stack(methods=[{"method": "prefix", "num_virtual_tokens": 0, "mode": "soft"}]))
    assert "stack[0].num_virtual_tokens" in text and "stack[0].mode" in text
    text = problems(plugin_host, make_stack(methods=[{"method": "prefix", "init_text": ""}]))
    assert "stack[0].init_text" in text


def test_inconsistent_options_are_problems(plugin_host, make_stack):
    def run(**options):
        return problems(plugin_host, make_stack(methods=[{"method": "prefix", **options}]))

    assert "stack[0].projection: applies to mode = 'prefix' only" in run(mode="prompt", projection=True)
    assert "stack[0].projection_hidden: needs projection = true" in run(projection_hidden=64)
    assert "stack[0].init_text: cannot initialise a reparametrised prefix" in run(
        projection=True, init_text="Classify the sentiment of this review"
    )


def test_impossible_combinations_are_problems(plugin_host, make_stack):
    text = problems(plugin_host, make_stack(task="causal-lm", family="bert", methods=[{"method": "prefix"}]))
    assert "stack[0].mode: prefix mode on a BERT-like encoder ('bert') supports sequence and token" in text
    assert "use mode = 'prompt'" in text
    config = {"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64, "vocab_size": 30522}
    text = problems(plugin_host, make_stack(model={"config": config}, methods=[{"method": "prefix"}]))
    assert "stack[0].mode: prefix mode supports the model types" in text and "not 'distilbert'" in text
    # prompt mode works on it: no problem from the prefix method
    load_plan(make_stack(model={"config": config}, methods=[{"method": "prefix", "mode": "prompt"}]), plugin_host)
    text = problems(
        plugin_host,
        make_stack(family="gpt2", methods=[{"method": "prefix", "mode": "prompt", "num_virtual_tokens": 100}]),
    )
    assert (
        "stack[0].num_virtual_tokens: 100 virtual tokens + data.max_length 32 = 132 positions, but the model has 128"
        in text
    )


def test_stage_must_train(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "z", "epochs": 0, "stack": [{"method": "prefix", "mode": "prompt"}]}])
    assert "stage[0].stack[0]: prompt tuning learns its prompt in training" in problems(plugin_host, stack)


def test_one_prefix_per_model(plugin_host, make_stack):
    text = problems(plugin_host, make_stack(methods=[{"method": "prefix"}, {"method": "prefix", "mode": "prompt"}]))
    assert "stack[1]: 'prefix' cannot run on a model that is 'adapters'" in text
    assert "'prefix' (stack[0]) made it so" in text


def test_contract_refuses_a_prefix_on_an_adapter_model(plugin_host, make_stack):
    stack = make_stack(
        stages=[
            {"name": "a", "stack": [{"method": "prefix", "num_virtual_tokens": 4}]},
            {"name": "b", "stack": [{"method": "prefix", "mode": "prompt"}]},
        ]
    )
    text = problems(plugin_host, stack)
    assert "stage[1].stack[0]" in text and "adapters" in text


# -- whole runs -----------------------------------------------------------------------------------------


def base_of(model):
    """The plain model under the wrapper (for peft: with the trained head copy put in place)."""
    import copy

    from tunestack_prefix import _peft

    return _peft.unwrap(copy.deepcopy(model)) if hasattr(model, "peft_config") else model.base


def falls(history) -> bool:
    losses = [h["loss"] for h in history]
    return sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


CASES = [  # token classification: a frozen tiny random model learns it visibly in 24 steps
    ("bert", "token-classification", {"mode": "prefix"}, {"prefix_kv"}),
    ("bert", "token-classification", {"mode": "prompt", "init_text": "Find the names in this text"}, {"prompt"}),
    (
        "gpt2",
        "token-classification",
        {"mode": "prefix"},
        {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"},
    ),
    ("llama", "token-classification", {"mode": "prompt"}, {"prompt"}),
]


@pytest.mark.parametrize("family, task, options, saved_keys", CASES, ids=[f"{c[0]}-{c[2]['mode']}" for c in CASES])
def test_training_moves_only_the_prefix_and_head(run_stack, make_stack, family, task, options, saved_keys):
    entry = {"method": "prefix", "num_virtual_tokens": 8, **options}
    result = run_stack(make_stack(family=family, task=task, methods=[entry], epochs=4, train={"learning_rate": 3e-2}))
    stage = result.stages[0]
    assert falls(stage["training"]["history"]), stage["training"]["history"]
    assert stage["reload_max_abs_diff"] <= 1e-4

    method = stage["methods"][0]
    assert method["method"] == "prefix" and method["options"]["mode"] == options["mode"]
    reports = method["reports"]
    assert reports["trainable_params"] == result.metrics["params_trainable"]
    assert 0 < reports["trainable_fraction"] < 0.01

    before = initial_model(family, task, result.manifest["labels"])
    loaded = tunestack.load(result.run_dir)
    moved = changed(before, base_of(loaded.model))
    head = {"classifier.weight", "classifier.bias", "score.weight", "score.bias"}
    assert moved and moved <= head, moved  # the frozen body kept every weight

    folder = result.run_dir / "model" / "transforms" / "s0-0-prefix"
    tensors = load_file(str(next(folder.glob("*.safetensors"))))
    assert set(tensors) == saved_keys
    info = json.loads((folder / "prefix_config.json").read_text())
    assert info["num_virtual_tokens"] == 8 and info["mode"] == options["mode"]

    # the base folder is a plain transformers model with the trained head
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification
    plain = auto.from_pretrained(result.run_dir / "model")
    assert changed(before, plain) == moved
    assert len(loaded.predict(["Alice works in Paris"])) == 1


@pytest.mark.parametrize("family, mode", [("gpt2", "prefix"), ("llama", "prompt")])
def test_the_prefix_alone_lowers_the_loss(run_stack, make_stack, family, mode):
    """Causal LM: no head trains, the whole model stays as it was, only the prefix/prompt learns."""
    entry = {"method": "prefix", "mode": mode, "num_virtual_tokens": 8}
    result = run_stack(
        make_stack(family=family, task="causal-lm", methods=[entry], epochs=4, train={"learning_rate": 1e-1})
    )
    history = result.stages[0]["training"]["history"]
    losses = [h["loss"] for h in history]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses
    virtual = 8 * 2 * 2 * (32 if family == "gpt2" else 16) if mode == "prefix" else 8 * 32
    assert result.metrics["params_trainable"] == virtual
    loaded = tunestack.load(result.run_dir).model
    assert changed(initial_model(family, "causal-lm"), base_of(loaded)) == set()
    assert result.metrics["loss"] < 10.3  # eval loss of the reloaded model (untrained: about 10.33)


def test_head_frozen_prefix_moves_from_its_text_init(run_stack, make_stack, tokenizer):
    text = "Find the names in this text"
    entry = {"method": "prefix", "num_virtual_tokens": 6, "train_head": False, "init_text": text}
    result = run_stack(
        make_stack(task="token-classification", methods=[entry], epochs=2, train={"learning_rate": 1e-1})
    )
    assert result.metrics["params_trainable"] == 6 * 2 * 2 * 32
    loaded = tunestack.load(result.run_dir).model
    before = initial_model("bert", "token-classification", result.manifest["labels"])
    assert changed(before, loaded.base) == set()  # not even the head
    from tunestack_prefix._kv import capture_kv

    initial = capture_kv(before, (tokenizer(text)["input_ids"] * 2)[:6])
    assert not torch.allclose(loaded.prefix.kv.detach(), initial, atol=1e-3)


def test_token_classification_prompt_runs_and_evaluates(run_stack, make_stack):
    result = run_stack(
        make_stack(
            task="token-classification", methods=[{"method": "prefix", "mode": "prompt", "num_virtual_tokens": 4}]
        )
    )
    assert result.stages[0]["reload_max_abs_diff"] == 0.0
    assert 0.0 <= result.metrics["token_accuracy"] <= 1.0
    loaded = tunestack.load(result.run_dir)
    assert len(loaded.predict(["Alice works in Paris"])[0]["tags"]) == 4


def test_projection_is_folded_when_saved(run_stack, make_stack):
    entry = {"method": "prefix", "num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}
    result = run_stack(make_stack(methods=[entry]))
    reports = result.stages[0]["methods"][0]["reports"]
    assert reports["prefix_params"] == 4 * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32)
    assert result.stages[0]["reload_max_abs_diff"] <= 1e-6
    folder = result.run_dir / "model" / "transforms" / "s0-0-prefix"
    assert json.loads((folder / "prefix_config.json").read_text())["folded"] is True
    assert set(load_file(str(folder / "prefix.safetensors"))) == {"prefix_kv"}


def test_a_later_stage_reloads_and_keeps_the_prefix(run_stack, make_stack):
    """Stage b starts from stage a's artifact (prefix rebuilt), trains it further, saves it again."""
    stack = make_stack(
        family="gpt2",
        stages=[
            {"name": "a", "stack": [{"method": "prefix", "num_virtual_tokens": 4}]},
            {"name": "b", "epochs": 1, "stack": []},
        ],
    )
    result = run_stack(stack)
    assert [s["status"] for s in result.stages] == ["ok", "ok"]
    assert result.stages[1]["reload_max_abs_diff"] <= 1e-4
    assert [t["method"] for t in result.stages[1]["transforms"]] == ["prefix"]
    assert "adapters" in result.manifest["final_tags"]


def test_contract_refuses_a_prefix_after_an_unmerged_adapter(make_stack):
    from tunestack.testing.conformance import conformance_host  # has the echo probe even if not installed

    host = conformance_host()
    stack = make_stack(methods=[{"method": "echo", "produces": ["adapters"]}, {"method": "prefix"}])
    text = problems(host, stack)
    assert "stack[1]: 'prefix' cannot run on a model that is 'adapters'" in text
    assert "merge an earlier adapter first" in text
    stack = make_stack(methods=[{"method": "echo", "removes": ["float-weights"]}, {"method": "prefix"}])
    assert "stack[1]: 'prefix' needs 'float-weights'" in problems(host, stack)


def test_freeze_before_prefix_composes(run_stack, make_stack):
    pytest.importorskip("tunestack_freeze")
    entries = [
        {"method": "freeze", "embeddings": True},
        {"method": "prefix", "mode": "prompt", "num_virtual_tokens": 4},
    ]
    result = run_stack(make_stack(family="gpt2", methods=entries))
    assert result.status == "complete"
    assert result.metrics["params_trainable"] == 4 * 32 + 32 * 2  # prefix decides: prompt + head
