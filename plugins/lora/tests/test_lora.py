"""LoRA on tiny random-init models: counts, what trains, save/reload, plain-peft reload, merge."""

from __future__ import annotations

import json

import pytest
import torch

import tunestack
from tunestack.errors import ModelError
from tunestack.models import build_from_config
from tunestack.testing import changed_parameters as changed
from tunestack.testing import initial_model
from tunestack.testing.stacks import tiny_model_config
from tunestack_lora import LoraOptions, wrap

LABELS = ("negative", "positive")
SAMPLE = ["the film was great and lovely", "the plot was dull", "the cast was superb"]


def logits(model, tokenizer, texts=SAMPLE):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def lora_report(result, stage: int = 0) -> dict:
    return next(m for m in result.stages[stage]["methods"] if m["method"] == "lora")


# -- exact trainable-parameter counts -------------------------------------------------------------


def analytic(family: str, r: int, labels: int = 2) -> int:
    """Σ over adapted layers of r·(in+out), plus the classification head (peft trains it in full)."""
    config = tiny_model_config(family)
    if family == "bert":  # query and value: hidden -> hidden
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        return layers * 2 * r * (hidden + hidden) + (hidden * labels + labels)
    if family == "llama":  # q_proj: hidden -> hidden, v_proj: hidden -> kv_heads * head_dim (GQA)
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
        return layers * (r * (hidden + hidden) + r * (hidden + kv)) + hidden * labels  # score: no bias
    if family == "gpt2":  # c_attn: n_embd -> 3 * n_embd
        hidden, layers = config["n_embd"], config["n_layer"]
        return layers * r * (hidden + 3 * hidden) + hidden * labels  # score: no bias
    raise ValueError(family)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_trainable_params_match_the_analytic_count(run_stack, make_stack, family):
    result = run_stack(make_stack(family=family, methods=[{"method": "lora", "r": 4}]))
    expected = analytic(family, 4)
    reports = lora_report(result)["reports"]
    assert reports["trainable_params"] == expected
    assert result.stages[0]["training"]["trainable_params"] == expected
    total = result.stages[0]["training"]["total_params"]
    assert reports["trainable_fraction"] == pytest.approx(expected / total)
    defaults = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
    assert reports["target_modules"] == defaults[family]
    assert reports["modules_to_save"] == (["classifier"] if family == "bert" else ["score"])
    assert reports["task_type"] == "SEQ_CLS"


def test_bias_extra_modules_and_all_linear_counts(run_stack, make_stack):
    model = initial_model("bert")
    hidden = 32
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and "classifier" not in n)
    result = run_stack(make_stack(methods=[{"method": "lora", "r": 4, "bias": "all"}]))
    assert lora_report(result)["reports"]["trainable_params"] == analytic("bert", 4) + biases

    result = run_stack(make_stack(methods=[{"method": "lora", "r": 4, "modules_to_save": ["pooler"]}]))
    reports = lora_report(result)["reports"]
    assert reports["trainable_params"] == analytic("bert", 4) + hidden * hidden + hidden
    assert reports["modules_to_save"] == ["classifier", "pooler"]

    result = run_stack(make_stack(family="llama", methods=[{"method": "lora", "r": 2, "target_modules": "all-linear"}]))
    reports = lora_report(result)["reports"]
    assert reports["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    h, inter, kv = 32, 64, 16
    per_layer = 2 * ((h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))
    assert reports["trainable_params"] == 2 * per_layer + h * 2


# -- what trains, what is saved --------------------------------------------------------------------


def test_loss_goes_down_and_only_lora_and_the_head_change(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    options = {"r": 4, "alpha": 8, "dropout": 0.0}
    result = run_stack(make_stack(methods=[{"method": "lora", **options}], epochs=4, train={"learning_rate": 5e-2}))
    losses = [h["loss"] for h in result.stages[0]["training"]["history"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    recorded = lora_report(result)
    assert recorded["options"] == LoraOptions(**options).model_dump(mode="json")
    assert recorded["options"]["r"] == 4 and recorded["plugin"] == "lora"
    assert recorded["distribution"] == "tunestack-lora"

    initial = initial_model("bert")
    # the base saved in the run folder: only the head differs from the initial model
    base = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert changed(initial, base) == {"classifier.weight", "classifier.bias"}
    # the rebuilt model: base layers untouched, LoRA B matrices trained (they start at zero)
    loaded = tunestack.load(result.run_dir).model
    state = loaded.state_dict()
    for name, tensor in initial.state_dict().items():
        if name.startswith("classifier."):
            continue
        key = f"base_model.model.{name}"
        if key not in state:  # adapted layers keep their weight under base_layer
            key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], tensor), name
    lora_b = [t for n, t in state.items() if "lora_B" in n]
    assert len(lora_b) == 4 and all(t.abs().sum() > 0 for t in lora_b)


def test_adapter_folder_reloads_with_plain_peft(run_stack, make_stack):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_stack(make_stack(methods=[{"method": "lora", "r": 4, "alpha": 8}], epochs=2))
    assert result.stages[0]["reload_max_abs_diff"] <= 1e-6
    folder = result.run_dir / "model" / "transforms" / "s0-0-lora"
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["query", "value"])
    meta = json.loads((result.run_dir / "model" / "tunestack.json").read_text())
    assert [t["method"] for t in meta["transforms"]] == ["lora"]
    assert meta["transforms"][0]["state"]["target_modules"] == ["query", "value"]

    loaded = tunestack.load(result.run_dir)
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model"), folder
    )
    ours = logits(loaded.model, loaded.tokenizer)
    assert torch.equal(logits(plain, loaded.tokenizer), ours)
    # and the adapter matters: the bare base gives other logits
    bare = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert not torch.allclose(logits(bare, loaded.tokenizer), ours, atol=1e-6)


# -- merge -----------------------------------------------------------------------------------------


def test_merge_gives_plain_weights_with_the_unmerged_outputs(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    options = {"method": "lora", "r": 4, "dropout": 0.0}
    unmerged = run_stack({**make_stack(methods=[options], epochs=2), "name": "unmerged"})
    merged = run_stack({**make_stack(methods=[{**options, "merge": True}], epochs=2), "name": "merged"})
    assert merged.manifest["final_tags"] == ["float-weights"]
    reports = lora_report(merged)["reports"]
    assert reports["merged"] is True and reports["merge_max_abs_diff"] < 1e-4
    folder = merged.run_dir / "model"
    assert not (folder / "transforms").exists()
    assert json.loads((folder / "tunestack.json").read_text())["transforms"] == []

    loaded_merged = tunestack.load(merged.run_dir)
    loaded_unmerged = tunestack.load(unmerged.run_dir)
    tokenizer = loaded_merged.tokenizer
    stock = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(stock).__name__ == "BertForSequenceClassification"
    reference = logits(loaded_unmerged.model, tokenizer)  # the adapter before merging
    assert torch.allclose(logits(stock, tokenizer), reference, atol=1e-4, rtol=0)
    assert torch.allclose(logits(loaded_merged.model, tokenizer), reference, atol=1e-4, rtol=0)
    # the merge really folded a trained update into the adapted weights
    moved = changed(initial_model("bert"), stock)
    assert {"bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"} <= moved
    assert not any(".key." in n or ".dense." in n for n in moved)


def test_second_lora_in_a_later_stage_after_merging_the_first(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    result = run_stack(
        make_stack(
            stages=[
                {"name": "first", "stack": [{"method": "lora", "r": 4, "merge": True}]},
                {"name": "second", "stack": [{"method": "lora", "r": 2, "target_modules": ["key"]}]},
            ]
        )
    )
    assert result.status == "complete" and [s["status"] for s in result.stages] == ["ok", "ok"]
    second = lora_report(result, 1)["reports"]
    assert second["trainable_params"] == 2 * 2 * (32 + 32) + 66 and second["target_modules"] == ["key"]
    assert result.manifest["final_tags"] == ["adapters", "float-weights", "structural"]
    # the final base holds the merged first adapter (query/value moved); the second adapter is separate
    base = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    moved = changed(initial_model("bert"), base)
    assert "bert.encoder.layer.1.attention.self.value.weight" in moved
    assert not any(".key." in n for n in moved)
    meta = json.loads((result.run_dir / "model" / "tunestack.json").read_text())
    assert [t["slot"]["stage"] for t in meta["transforms"]] == ["second"]
    assert (result.run_dir / "model" / "transforms" / "s1-0-lora" / "adapter_model.safetensors").is_file()


def test_unmerged_adapter_carries_into_a_later_stage(run_stack, make_stack):
    result = run_stack(
        make_stack(
            stages=[
                {"name": "tune", "stack": [{"method": "lora", "r": 4}]},
                {"name": "more", "epochs": 1, "stack": []},
            ]
        )
    )
    assert result.stages[1]["reload_max_abs_diff"] <= 1e-6
    # the rebuilt adapter keeps training in the later stage (LoRA and head only)
    assert result.stages[1]["training"]["trainable_params"] == analytic("bert", 4)
    meta = json.loads((result.run_dir / "model" / "tunestack.json").read_text())
    assert [t["slot"]["stage"] for t in meta["transforms"]] == ["tune"]


# -- errors at prepare ------------------------------------------------------------------------------


def test_names_are_checked_when_the_model_is_known(run_stack, make_stack):
    with pytest.raises(ModelError, match=r"stack\[0\]\.modules_to_save: 'nope' match no module"):
        run_stack(make_stack(methods=[{"method": "lora", "modules_to_save": ["nope"]}]))
    model = initial_model("bert")
    with pytest.raises(
        ModelError,
        match=r"x\.target_modules: 'q_proj' match no module of BertForSequenceClassification; adaptable .*query",
    ):
        wrap(model, LoraOptions(target_modules=["q_proj"]), "SEQ_CLS", "x")


def test_model_types_without_defaults():
    # distilbert: peft has no default; the plugin supplies q_lin/v_lin
    torch.manual_seed(0)
    distil = build_from_config(
        {"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64},
        "sequence-classification",
        {"num_labels": 2},
    )
    wrapped = wrap(distil, LoraOptions(r=2), "SEQ_CLS", "x")
    assert sorted(wrapped.peft_config["default"].target_modules) == ["q_lin", "v_lin"]
    # mpnet: nobody has a default: a clear message naming the option and the candidates
    mpnet = build_from_config(
        {
            "model_type": "mpnet",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        },
        "sequence-classification",
        {"num_labels": 2},
    )
    with pytest.raises(
        ModelError, match=r"x\.target_modules: peft has no default target modules for model type 'mpnet'"
    ):
        wrap(mpnet, LoraOptions(), "SEQ_CLS", "x")


def test_refuses_a_model_that_already_has_an_adapter():
    wrapped = wrap(initial_model("bert"), LoraOptions(r=2), "SEQ_CLS", "x")
    with pytest.raises(ModelError, match="already carries a peft adapter"):
        wrap(wrapped, LoraOptions(r=2), "SEQ_CLS", "y")


# -- composition with a real method ----------------------------------------------------------------


def test_freeze_after_lora_keeps_only_the_upper_adapters_trainable(run_stack, make_stack, plugin_host):
    if "freeze" not in plugin_host.methods:
        pytest.skip("tunestack-freeze is not installed")
    result = run_stack(make_stack(methods=[{"method": "lora", "r": 4}, {"method": "freeze", "layers": 1}]))
    # freeze sees the PeftModel: the LoRA matrices of layer 0 freeze, layer 1 and the head train
    assert result.stages[0]["training"]["trainable_params"] == 2 * 4 * (32 + 32) + 66
    state = tunestack.load(result.run_dir).model.state_dict()
    layer0 = [t for n, t in state.items() if "layer.0." in n and "lora_B" in n]
    layer1 = [t for n, t in state.items() if "layer.1." in n and "lora_B" in n]
    assert layer0 and all(t.abs().sum() == 0 for t in layer0)  # never trained: still zero
    assert layer1 and all(t.abs().sum() > 0 for t in layer1)
