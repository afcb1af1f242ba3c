from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunestack
from tunestack.api import ModelHandle, Slot
from tunestack.context import TransformRecord
from tunestack.errors import StackError
from tunestack.models import build_from_config
from tunestack.testing import changed_parameters as changed
from tunestack.testing import initial_model
from tunestack.testing.conformance import check_method, conformance_host
from tunestack.validation import load_plan
from tunestack_adapter import CONTRACT, NOT_MERGEABLE, Adapter, AdapterOptions
from tunestack_adapter.modules import ATTRIBUTE, BottleneckAdapter, find_point

FAMILIES = ("bert", "gpt2", "llama")
HIDDEN = 32  # every tiny model
DEPTH = 2


# -- helpers ---------------------------------------------------------------------------------------


def batch(seed: int = 1, size: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # some padding
    ids[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class Reports:
    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def report(self, method: object, key: str, value: object) -> None:
        self.values[key] = value


def prepare(model, **options):
    """Run the plugin's own prepare hook on ``model``; return (method, handle, reports)."""
    method = Adapter(AdapterOptions(**options), Slot("adapter", "stack[0]", "main", 0, 0))
    handle = ModelHandle(model=model, tokenizer=None, task=None, labels=[], auto_class="sequence-classification")
    reports = Reports()
    method.tunestack_prepare(model=handle, ctx=reports)
    return method, handle, reports


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or batch())).logits


def head_size(model) -> int:
    from tunestack.api import head_parameter_names

    names = head_parameter_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def analytic(adapters: int, r: int, d: int = HIDDEN) -> int:
    return adapters * (2 * d * r + r + d)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_conformance_sequence_classification(tmp_path, variant):
    report = check_method("adapter", tmp_path, options={"variant": variant, "reduction_factor": 4}, families=FAMILIES)
    for family in FAMILIES:
        assert f"runs, reloads and predicts on {family}/sequence-classification" in report.passed


def test_conformance_token_classification_and_causal_lm(tmp_path):
    report = check_method(
        "adapter",
        tmp_path,
        options={"variant": "houlsby", "reduction_factor": 8, "non_linearity": "gelu"},
        families=("gpt2",),
        tasks=("token-classification", "causal-lm"),
    )
    assert "runs, reloads and predicts on gpt2/token-classification" in report.passed
    assert "runs, reloads and predicts on gpt2/causal-lm" in report.passed


# -- behaviour on the modules ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_untrained_adapters_leave_outputs_bit_identical(family, variant):
    model = initial_model(family)
    reference = logits(model)
    prepare(model, variant=variant, reduction_factor=4, non_linearity="gelu")
    assert any(ATTRIBUTE in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), reference)


def test_every_non_linearity_is_identity_at_init_and_residual_false_is_not():
    for act in ("relu", "gelu", "swish", "tanh"):
        y = torch.randn(3, 5, 16)
        adapter = BottleneckAdapter(16, 4, act)
        assert torch.equal(adapter(y), y)
    without = BottleneckAdapter(16, 4, "relu", residual=False)
    assert torch.equal(without(torch.randn(2, 16)), torch.zeros(2, 16))
    model = initial_model("bert")
    reference = logits(model)
    prepare(model, residual=False)
    assert not torch.allclose(logits(model), reference)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("options", "adapters", "r"),
    [
        ({"variant": "houlsby", "reduction_factor": 4}, 2 * DEPTH, 8),
        ({"variant": "pfeiffer", "reduction_factor": 4}, DEPTH, 8),
        ({"variant": "houlsby", "reduction_factor": 16, "layers": [1]}, 2, 2),
        ({"variant": "pfeiffer", "reduction_factor": 1000}, DEPTH, 1),  # at least 1
    ],
)
def test_trainable_count_is_exact(family, options, adapters, r):
    model = initial_model(family)
    head = head_size(model)
    assert head > 0
    total_before = sum(p.numel() for p in model.parameters())
    _, handle, reports = prepare(model, **options)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == analytic(adapters, r) + head
    assert reports.values["trainable_params"] == trainable
    assert reports.values["adapter_params"] == analytic(adapters, r)
    assert reports.values["num_adapters"] == adapters
    assert reports.values["bottleneck_size"] == r
    total = total_before + analytic(adapters, r)
    assert reports.values["trainable_fraction"] == pytest.approx(trainable / total)
    points = handle.transforms[0].state["points"]
    assert len(points) == adapters and {p["bottleneck"] for p in points} == {r}


def test_train_head_false_trains_only_the_adapters():
    model = initial_model("llama")
    prepare(model, variant="pfeiffer", reduction_factor=4, train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ATTRIBUTE}." in n for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == analytic(DEPTH, 8)


@pytest.mark.parametrize(
    ("family", "points"),
    [
        ("bert", {"attention.output.dense", "output.dense"}),
        ("gpt2", {"attn.c_proj", "mlp.c_proj"}),
        ("llama", {"self_attn.o_proj", "mlp.down_proj"}),
    ],
)
def test_insertion_points_per_family(family, points):
    model = initial_model(family)
    _, handle, _ = prepare(model, variant="houlsby", layers=[1])
    modules = {p["module"] for p in handle.transforms[0].state["points"]}
    assert {m.split(".1.", 1)[1] for m in modules} == points
    _, pfeiffer, _ = prepare(initial_model(family), variant="pfeiffer", layers=[0])
    (only,) = pfeiffer.transforms[0].state["points"]
    assert only["point"] == "ffn" and only["layer"] == 0


OTHER_LAYOUTS = {
    "distilbert": ({"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}, {"attention.out_lin", "ffn.lin2"}),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, {"self_attn.out_proj", "fc2"}),
    "gpt_neox": ({"intermediate_size": 64}, {"attention.dense", "mlp.dense_4h_to_h"}),
    "phi": ({"intermediate_size": 64}, {"self_attn.dense", "mlp.fc2"}),
    "bloom": ({"n_layer": 2, "n_head": 4}, {"self_attention.dense", "mlp.dense_4h_to_h"}),
}


@pytest.mark.parametrize("model_type", sorted(OTHER_LAYOUTS))
def test_other_layouts_are_found_and_start_as_identity(model_type):
    extra, points = OTHER_LAYOUTS[model_type]
    config = {"model_type": model_type, "vocab_size": 1000, **extra}
    if model_type not in ("distilbert", "bloom"):
        config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    else:
        config.setdefault("hidden_size", 32)
    torch.manual_seed(0)
    model = build_from_config(config, "sequence-classification", {"num_labels": 2, "pad_token_id": 0}).eval()
    reference = logits(model)
    _, handle, reports = prepare(model, variant="houlsby", reduction_factor=4)
    found = {p["module"].split(".0.", 1)[1] for p in handle.transforms[0].state["points"] if p["layer"] == 0}
    assert found == points
    assert reports.values["num_adapters"] == 4
    assert torch.equal(logits(model), reference)


def test_unknown_block_layout_is_a_clear_error():
    block = torch.nn.Module()
    block.mixer = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"cannot find the attention output projection.*mixer"):
        find_point(block, "attn")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_alone_lower_the_loss(family):
    model = initial_model(family)
    prepare(model, variant="houlsby", reduction_factor=4, train_head=False)
    inputs = {**batch(2, size=8), "labels": torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 1e-3, losses  # deterministic: fixed batch, eval mode
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


def test_save_peels_the_adapters_and_rebuild_restores_them(tmp_path):
    base = initial_model("gpt2")
    model = copy.deepcopy(base)
    method, handle, _ = prepare(model, variant="houlsby", reduction_factor=4)
    with torch.no_grad():  # a trained-looking adapter, so identity cannot hide a lost weight
        for name, param in model.named_parameters():
            if ATTRIBUTE in name:
                param.normal_(std=0.1)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(base))
    clone = copy.deepcopy(model)  # hooks must follow the copy's own adapters
    assert torch.equal(logits(clone), adapted)

    record = handle.transforms[0]
    record = TransformRecord.from_json(json.loads(json.dumps(record.to_json())))  # as stored on disk
    saved = method.tunestack_save(model=model, folder=tmp_path, record=record)
    assert set(saved.model.state_dict()) == set(base.state_dict())
    assert torch.equal(logits(saved.model), logits(base))  # plain projections again
    assert saved.claimed == set()

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapters.safetensors"))
    assert len(tensors) == 4 * 4 and all(f".{ATTRIBUTE}." in k for k in tensors)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    assert meta["variant"] == "houlsby" and len(meta["points"]) == 4
    assert {p["module"] for p in meta["points"]} >= {"transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj"}

    fresh = Adapter(method.options, method.slot)  # core rebuilds with a new instance
    rebuilt = fresh.tunestack_rebuild(model=copy.deepcopy(base), folder=tmp_path, record=record)
    assert torch.equal(logits(rebuilt), adapted)


# -- whole stacks --------------------------------------------------------------------------------


def test_stack_trains_only_adapters_and_head_and_reloads_exactly(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    model = initial_model("bert")
    expected = analytic(2 * DEPTH, 8) + head_size(model)
    options = {"method": "adapter", "variant": "houlsby", "reduction_factor": 4}
    result = run_stack(make_stack(methods=[options], epochs=2))
    stage = result.stages[0]
    reports = stage["methods"][0]["reports"]
    assert reports["trainable_params"] == expected == result.metrics["params_trainable"]
    assert reports["num_adapters"] == 4 and reports["bottleneck_size"] == 8
    assert stage["methods"][0]["method"] == "adapter"
    assert stage["methods"][0]["options"]["variant"] == "houlsby"
    assert stage["methods"][0]["options"]["reduction_factor"] == 4
    assert stage["reload_max_abs_diff"] is not None and stage["reload_max_abs_diff"] <= 1e-6
    assert "adapters" in stage["tags_after"] and "structural" in stage["tags_after"]

    loaded = tunestack.load(result.run_dir).model
    moved = changed(model, loaded)
    assert moved and all(n.startswith("classifier.") for n in moved), moved
    ups = [p for n, p in loaded.named_parameters() if n.endswith(f"{ATTRIBUTE}.up.weight")]
    assert len(ups) == 4 and all(p.abs().sum() > 0 for p in ups)  # trained away from zero

    folder = result.run_dir / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    assert set(plain.state_dict()) == set(model.state_dict())  # a plain HF model: no adapter keys
    assert torch.equal(plain.classifier.weight, loaded.classifier.weight)  # the trained head is in the base
    inputs = batch()
    inputs.pop("attention_mask")
    assert not torch.allclose(logits(plain, inputs), logits(loaded, inputs))
    transform = folder / "transforms" / "s0-0-adapter"
    assert sorted(p.name for p in transform.iterdir()) == ["adapters.json", "adapters.safetensors"]


def test_composes_with_freeze(run_stack, make_stack, plugin_host):
    if "freeze" not in plugin_host.methods:
        pytest.skip("the freeze plugin is not installed")
    head = head_size(initial_model("bert"))
    adapter = {"method": "adapter", "variant": "houlsby", "reduction_factor": 4}
    after = run_stack(make_stack(methods=[adapter, {"method": "freeze", "layers": 1}], epochs=1))
    # freeze after adapter: the bottom layer's adapters are frozen with it
    assert after.metrics["params_trainable"] == analytic(2, 8) + head
    assert after.stages[0]["reload_max_abs_diff"] <= 1e-6
    before = run_stack(make_stack(methods=[{"method": "freeze", "embeddings": True}, adapter], epochs=1))
    # freeze before adapter: the adapter freezes the whole base anyway
    assert before.metrics["params_trainable"] == analytic(4, 8) + head


def test_adapters_stack_across_stages(run_stack, make_stack):
    model = initial_model("bert")
    result = run_stack(
        make_stack(
            stages=[
                {"name": "task", "stack": [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4}]},
                {
                    "name": "more",
                    "stack": [{"method": "adapter", "variant": "pfeiffer", "reduction_factor": 8, "layers": [1]}],
                },
            ],
            epochs=1,
        )
    )
    second = result.stages[1]
    assert second["reload_max_abs_diff"] <= 1e-6
    assert result.metrics["params_trainable"] == analytic(1, 4) + head_size(model)  # earlier adapters frozen
    loaded = tunestack.load(result.run_dir).model
    proj = loaded.bert.encoder.layer[1].output.dense
    assert hasattr(proj, ATTRIBUTE) and hasattr(proj, f"{ATTRIBUTE}_2")
    assert [t["method"] for t in second["transforms"]] == ["adapter", "adapter"]


def test_adapter_after_a_lora_stage_trains_adapters_and_head(run_stack, make_stack, plugin_host):
    if "lora" not in plugin_host.methods:
        pytest.skip("the lora plugin is not installed")
    model = initial_model("bert")
    result = run_stack(
        make_stack(
            stages=[
                {"name": "lora", "stack": [{"method": "lora"}]},
                {"name": "adapter", "stack": [{"method": "adapter", "reduction_factor": 4}]},
            ],
            epochs=1,
        )
    )
    second = result.stages[1]
    reports = second["methods"][0]["reports"]
    # the head hides inside the peft wrapper (modules_to_save); it must still train
    assert reports["head_params"] == head_size(model) > 0
    assert result.metrics["params_trainable"] == analytic(2 * DEPTH, 8) + head_size(model)
    assert second["reload_max_abs_diff"] <= 1e-6


# -- contract and validation -----------------------------------------------------------------------


def test_contract():
    assert CONTRACT.phases == {"prepare", "train"}
    assert CONTRACT.requires == {"float-weights"}
    assert CONTRACT.produces == {"adapters", "structural"}
    assert "cannot be merged" in CONTRACT.reasons["adapters"]


@pytest.mark.parametrize("tag", ["quantized", "pruned"])
def test_quantizing_or_pruning_after_an_adapter_is_refused_with_the_reason(make_stack, tag):
    host = conformance_host()  # has `echo` to stand in for int8 / prune
    stack = make_stack(methods=[{"method": "adapter"}, {"method": "echo", "tag": "compressor", "produces": [tag]}])
    with pytest.raises(StackError) as caught:
        load_plan(stack, host)
    text = str(caught.value)
    assert "stack[1]: 'echo' cannot follow 'adapter' (stack[0])" in text
    assert NOT_MERGEABLE in text


def test_adapter_needs_float_weights(make_stack):
    host = conformance_host()
    stack = make_stack(methods=[{"method": "echo", "removes": ["float-weights"]}, {"method": "adapter"}])
    with pytest.raises(StackError, match=r"stack\[1\]: 'adapter' needs 'float-weights'"):
        load_plan(stack, host)


def test_an_adapters_method_earlier_in_the_same_stage_is_refused(make_stack):
    host = conformance_host()
    stack = make_stack(methods=[{"method": "echo", "produces": ["adapters"]}, {"method": "adapter"}])
    with pytest.raises(StackError, match=r"stack\[1\]: 'adapter' freezes everything already in the model"):
        load_plan(stack, host)
    twice = make_stack(methods=[{"method": "adapter"}, {"method": "adapter", "layers": [0]}])
    with pytest.raises(StackError, match=r"'adapter' \(stack\[0\]\) adds in the same stage would never train"):
        load_plan(twice, host)


def test_validation_problems(plugin_host, make_stack):
    stack = make_stack(stages=[{"name": "z", "epochs": 0, "stack": [{"method": "adapter", "layers": [0, 5, 7]}]}])
    with pytest.raises(StackError) as caught:
        load_plan(stack, plugin_host)
    text = str(caught.value)
    assert "stage[0].stack[0]: adapters start as the identity and only change by training" in text
    assert "stage[0].stack[0].layers: the model has 2 layers (0-1); layer 5, 7 does not exist" in text
    assert load_plan(make_stack(methods=[{"method": "adapter", "layers": [1, 0]}]), plugin_host)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("variant", "lora", "stack[0].variant: must be 'houlsby' or 'pfeiffer'"),
        ("reduction_factor", 0, "stack[0].reduction_factor: must be >= 1"),
        ("non_linearity", "sigmoid", "stack[0].non_linearity: must be"),
        ("residual", "yes please", "stack[0].residual"),
        ("layers", [], "stack[0].layers: is empty"),
        ("layers", [1, 1], "stack[0].layers: lists layer 1 more than once"),
        ("layers", [-1], "stack[0].layers: layer indices count from 0"),
        ("layers", 1, "stack[0].layers"),
    ],
)
def test_bad_option_values(plugin_host, make_stack, option, value, message):
    with pytest.raises(StackError) as caught:
        load_plan(make_stack(methods=[{"method": "adapter", option: value}]), plugin_host)
    assert message in str(caught.value)


def test_importing_the_plugin_imports_no_torch():
    code = "import sys, tunestack_adapter; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_example_stacks_validate(plugin_host):
    examples = Path(__file__).resolve().parents[3] / "examples"
    files = sorted(examples.glob("*adapter*.toml"))
    if not files or not (examples / "../../shared/data/sst2").is_dir():
        pytest.skip("the example stacks or the shared SST-2/CoNLL data are not beside this checkout")
    for path in files:
        plan = load_plan(path, plugin_host)
        assert [m.name for m in plan.stages[0].methods] == ["adapter"], path
