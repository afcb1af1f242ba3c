from __future__ import annotations

import json
import math

import pytest
import torch

import tunestack
from tunestack.api import Contract, Method, MethodSpec, Options, hookimpl
from tunestack.errors import StackError, UserError
from tunestack.testing import initial_model
from tunestack.testing.conformance import check_method, conformance_host
from tunestack.testing.stacks import tiny_model_config, tiny_stack
from tunestack.validation import load_plan
from tunestack_kd import losses
from tunestack_kd.runtime import layer_pairs
from tunestack_kd.student import keep_layers

LABELS = ("negative", "positive")
DEPTH_KEY = {"bert": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


def kd_reports(result, stage: int = -1) -> dict:
    return next(m["reports"] for m in result.stages[stage]["methods"] if m["method"] == "kd")


def losses_of(result, stage: int = -1) -> list[float]:
    return [entry["loss"] for entry in result.stages[stage]["training"]["history"]]


def problems(stack, host) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, host)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------
# The conformance kit
# ------------------------------------------------------------------------------------------------


def test_conformance(tmp_path):
    report = check_method(
        "kd",
        tmp_path,
        options={"student": {"from_teacher": True, "keep_layers": [0]}},
        families=("bert", "gpt2", "llama"),
    )
    assert "runs, reloads and predicts on llama/sequence-classification" in report.passed
    assert "runs, reloads and predicts on gpt2/sequence-classification" in report.passed


# ------------------------------------------------------------------------------------------------
# The loss, by hand
# ------------------------------------------------------------------------------------------------


def _softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(teacher_row, student_row, t):
    p, q = _softmax(teacher_row, t), _softmax(student_row, t)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_kd_loss_equals_a_hand_computed_value():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.5, 0.5, -0.5]]
    task, alpha, temperature = 0.7, 0.3, 2.0
    soft = temperature**2 * (_kl(teacher[0], student[0], 2.0) + _kl(teacher[1], student[1], 2.0)) / 2
    expected = alpha * task + (1 - alpha) * soft

    total, got_soft = losses.kd_loss(
        torch.tensor(task), torch.tensor(student), torch.tensor(teacher), alpha, temperature
    )
    assert got_soft.item() == pytest.approx(soft, rel=1e-6)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert soft > 0.1  # the example is not degenerate
    # alpha = 1: the task loss itself; alpha = 0: the soft term alone
    task_loss = torch.tensor(task)
    assert losses.kd_loss(task_loss, torch.tensor(student), torch.tensor(teacher), 1.0, 2.0)[0] is task_loss
    assert losses.kd_loss(torch.tensor(task), torch.tensor(student), torch.tensor(teacher), 0.0, 2.0)[
        0
    ].item() == pytest.approx(soft, rel=1e-6)
    # the gradient reaches the student only
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    losses.soft_kl(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_token_positions_are_masked_like_the_task_loss():
    torch.manual_seed(1)
    student = torch.randn(1, 4, 3)
    teacher = torch.randn(1, 4, 3)
    labels = torch.tensor([[-100, 2, -100, 0]])  # [CLS], first subword, later subword, word
    attention = torch.tensor([[1, 1, 1, 1]])
    s, t, mask = losses.align_logits(student, teacher, labels, attention, causal=False)
    got = losses.soft_kl(s, t, 1.5, mask).item()
    expected = (
        1.5**2
        * (
            _kl(teacher[0, 1].tolist(), student[0, 1].tolist(), 1.5)
            + _kl(teacher[0, 3].tolist(), student[0, 3].tolist(), 1.5)
        )
        / 2
    )
    assert got == pytest.approx(expected, rel=1e-6)
    changed = student.clone()
    changed[0, 0] += 5.0
    changed[0, 2] -= 3.0
    assert losses.soft_kl(
        *losses.align_logits(changed, teacher, labels, attention, False)[:2], 1.5, mask
    ).item() == pytest.approx(got, rel=1e-6)

    # causal LM: logits at i predict token i + 1, compared where labels[:, i + 1] != -100
    labels = torch.tensor([[-100, -100, 7, 8]])  # prompt, prompt, completion, completion
    s, t, mask = losses.align_logits(student, teacher, labels, attention, causal=True)
    assert mask.tolist() == [[False, True, True]] and s.shape == (1, 3, 3)
    expected = (
        _kl(teacher[0, 1].tolist(), student[0, 1].tolist(), 1.0)
        + _kl(teacher[0, 2].tolist(), student[0, 2].tolist(), 1.0)
    ) / 2
    assert losses.soft_kl(s, t, 1.0, mask).item() == pytest.approx(expected, rel=1e-6)


def test_intermediate_losses_by_hand():
    student = torch.zeros(1, 3, 2)
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded third token does not count
    assert losses.hidden_mse(student, teacher, mask).item() == pytest.approx((1.0 + 2.0) / 2)
    projection = torch.nn.Linear(2, 2)
    with torch.no_grad():
        projection.weight.zero_()
        projection.bias.copy_(torch.tensor([1.0, 1.0]))
    assert losses.hidden_mse(student, teacher, mask, projection).item() == pytest.approx((0.0 + 1.0) / 2)

    uniform = torch.full((1, 1, 2, 2), 0.5)
    sharp = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    query_mask = torch.tensor([[1, 1]])
    assert losses.attention_loss(uniform, sharp, query_mask, "mse").item() == pytest.approx(0.25 / 2)
    assert losses.attention_loss(uniform, sharp, query_mask, "kl").item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    assert losses.attention_loss(sharp, sharp, query_mask, "kl").item() == pytest.approx(0.0, abs=1e-7)


def test_default_layer_pairs():
    assert layer_pairs(None, 3, 6, [0, 2, 4], kept_from_teacher=True) == [(0, 0), (1, 2), (2, 4)]
    assert layer_pairs(None, 2, 2, None, kept_from_teacher=False) == [(0, 0), (1, 1)]
    assert layer_pairs(None, 3, 6, None, kept_from_teacher=False) == [(0, 1), (1, 3), (2, 5)]
    assert layer_pairs([[0, 5]], 3, 6, [0, 2, 4], kept_from_teacher=True) == [(0, 5)]


# ------------------------------------------------------------------------------------------------
# Building the student
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_student_has_exactly_the_kept_layers_and_reloads_with_the_stock_class(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tunestack.api import transformer_layers

    teacher = initial_model(family, **{DEPTH_KEY[family]: 4})
    teacher_layers = transformer_layers(teacher)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    import copy

    student = keep_layers(copy.deepcopy(teacher), [1, 3])
    layers = transformer_layers(student)
    assert len(layers) == 2 and student.config.num_hidden_layers == 2
    assert student.config.to_dict()[DEPTH_KEY[family]] == 2
    student_state = student.state_dict()
    prefix = teacher_layers.name + "."
    for name, tensor in student_state.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            source = f"{prefix}{[1, 3][int(index)]}.{rest}"
            assert torch.equal(tensor, teacher_state[source]), name
        else:
            assert torch.equal(tensor, teacher_state[name]), name
    kept_names = {n for n in student_state if n.startswith(prefix)}
    assert len(kept_names) * 2 == len([n for n in teacher_state if n.startswith(prefix)])
    numbers = [m.layer_idx for m in layers.modules.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert numbers and sorted(set(numbers)) == [0, 1]  # renumbered for the cache

    student.eval()
    student.save_pretrained(tmp_path / family)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / family)
    batch = {
        "input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
    }
    with torch.no_grad():
        assert torch.allclose(plain.eval()(**batch).logits, student(**batch).logits, atol=1e-6)
    with pytest.raises(ValueError, match="has 4 layers"):
        keep_layers(copy.deepcopy(teacher), [0, 4])


def test_attention_maps_are_probabilities_while_training():
    from tunestack_kd.student import LayerCapture, disable_attention_dropout, restore_attributes, set_attention

    model = initial_model("bert")
    assert set_attention(model, "eager") == "sdpa"
    model.train()
    capture = LayerCapture(model, hidden=True, attention=True)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    model(**batch)
    assert (capture.attention[0] == 0).any()  # attention dropout zeroes entries in train mode
    changed = disable_attention_dropout(model)
    assert len(changed) == 2  # one attention-probability dropout per layer, not the residual ones
    capture.clear()
    model(**batch)
    maps = capture.attention[1]
    assert maps.shape == (2, 4, 16, 16) and torch.allclose(maps.sum(-1), torch.ones(2, 4, 16), atol=1e-5)
    assert capture.hidden[1].shape == (2, 16, 32)
    restore_attributes(changed)
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.1
    capture.remove()
    capture.clear()
    model(**batch)
    assert not capture.attention and not capture.hidden


# ------------------------------------------------------------------------------------------------
# Options and validation
# ------------------------------------------------------------------------------------------------


def test_bad_option_values_are_reported_with_their_path(plugin_host, make_stack):
    text = problems(
        make_stack(
            methods=[
                {
                    "method": "kd",
                    "alpha": 1.5,
                    "temperature": 0,
                    "attention_loss": "cosine",
                    "student": {"keep_layers": [-1], "nope": 1},
                }
            ]
        ),
        plugin_host,
    )
    assert "stack[0].alpha: must be <= 1" in text
    assert "stack[0].temperature: must be > 0" in text
    assert "stack[0].attention_loss" in text
    assert "stack[0].student.nope: unknown key" in text
    assert "stack[0].student.keep_layers: layer indices start at 0" in text


def test_validation_problems(plugin_host, make_stack, tmp_path):
    stack = make_stack(
        stages=[
            {"name": "nothing", "epochs": 0, "stack": [{"method": "kd"}]},
            {
                "name": "bad",
                "stack": [
                    {
                        "method": "kd",
                        "student": {"keep_layers": [0, 0, 5]},
                        "layer_map": [[0, 1]],
                        "cache_teacher": True,
                        "attention_weight": 0.0,
                    }
                ],
            },
            {"name": "missing", "stack": [{"method": "kd", "teacher": "no/such/run"}]},
            {"name": "later", "stack": [{"method": "kd", "teacher": "stage:after"}]},
            {"name": "after", "stack": [{"method": "kd", "teacher": "stage:nowhere"}]},
        ]
    )
    text = problems(stack, plugin_host)
    assert "stage[0].stack[0]: kd only acts while training, but this stage has epochs = 0" in text
    assert "stage[1].stack[0].student.keep_layers: layers must be unique; repeated: [0]" in text
    assert "stage[1].stack[0].student.keep_layers: the model has 2 layers (0..1); cannot keep [5]" in text
    assert "stage[1].stack[0].layer_map: only used by the hidden/attention terms" in text
    assert "stage[2].stack[0].teacher: teacher not found" in text
    assert "stage[3].stack[0].teacher: 'stage:after' must name an earlier stage" in text
    assert "stage[4].stack[0].teacher: 'stage:nowhere' must name an earlier stage" in text

    text = problems(
        make_stack(methods=[{"method": "kd", "cache_teacher": True, "hidden_weight": 1.0, "layer_map": [[2, 0]]}]),
        plugin_host,
    )
    assert "stack[0].cache_teacher: only logits are cached" in text
    assert "stack[0].layer_map: student layer 2 does not exist (2 layers)" in text

    # a teacher folder whose tokenizer has other token ids
    fake = tmp_path / "other-teacher"
    fake.mkdir()
    (fake / "config.json").write_text(
        json.dumps({"model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 4})
    )
    vocab = {f"tok{i}": i for i in range(100)}
    (fake / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    text = problems(make_stack(methods=[{"method": "kd", "teacher": str(fake)}]), plugin_host)
    assert "stack[0].teacher: the teacher's tokenizer differs from the stack's" in text


def test_contract_and_order_with_other_methods(make_stack):
    host = conformance_host()  # installed plugins plus the echo probe
    # lora/adapter after kd train the student: fine; before a student is built: refused with the reason
    load_plan(
        make_stack(
            methods=[{"method": "kd", "student": {"keep_layers": [0]}}, {"method": "echo", "produces": ["adapters"]}]
        ),
        host,
    )
    text = problems(
        make_stack(
            methods=[{"method": "echo", "produces": ["adapters"]}, {"method": "kd", "student": {"keep_layers": [0]}}]
        ),
        host,
    )
    assert "'kd' cannot run on a model that is 'adapters' (the student is built by copying layers" in text
    # methods that change the model before kd (lora, prune) are fine: the teacher is the stage's input
    load_plan(make_stack(methods=[{"method": "echo", "produces": ["adapters", "structural"]}, {"method": "kd"}]), host)
    load_plan(make_stack(methods=[{"method": "echo", "produces": ["pruned", "structural"]}, {"method": "kd"}]), host)
    # distillation as recovery after a pruning stage; kd needs float weights
    plan = load_plan(
        make_stack(
            stages=[
                {"name": "ft", "stack": []},
                {"name": "prune", "epochs": 0, "stack": [{"method": "echo", "produces": ["pruned", "structural"]}]},
                {"name": "recover", "stack": [{"method": "kd", "teacher": "stage:ft"}]},
            ]
        ),
        host,
    )
    assert plan.stages[2].tags_after == plan.stages[1].tags_after
    text = problems(make_stack(methods=[{"method": "echo", "removes": ["float-weights"]}, {"method": "kd"}]), host)
    assert "'kd' needs 'float-weights'" in text
    student = load_plan(make_stack(methods=[{"method": "kd", "student": {"keep_layers": [0]}}]), host)
    assert "structural" in student.stages[0].tags_after
    assert "structural" not in load_plan(make_stack(methods=[{"method": "kd"}]), host).stages[0].tags_after


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def test_alpha_one_trains_exactly_like_plain_training(run_stack, make_stack):
    plain = run_stack(make_stack(epochs=2))
    distilled = run_stack(make_stack(methods=[{"method": "kd", "alpha": 1.0}], epochs=2))
    assert losses_of(distilled) == losses_of(plain)
    assert len(losses_of(plain)) == 12
    a, b = tunestack.load(plain.run_dir).model.state_dict(), tunestack.load(distilled.run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert kd_reports(distilled)["teacher_used"] is False
    # with a KL term the run differs, logs its parts, and the soft loss goes down
    mixed = run_stack(make_stack(methods=[{"method": "kd", "alpha": 0.5}], epochs=2))
    history = mixed.stages[0]["training"]["history"]
    assert losses_of(mixed) != losses_of(plain)
    assert {"kd_task_loss", "kd_soft_loss"} <= set(history[0])
    first = history[0]
    assert first["loss"] == pytest.approx(0.5 * first["kd_task_loss"] + 0.5 * first["kd_soft_loss"], rel=1e-5)
    assert history[-1]["kd_task_loss"] < history[0]["kd_task_loss"]
    assert kd_reports(mixed)["teacher_forward_batches"] == 12


def test_two_stage_teacher_then_student(run_stack, make_stack):
    from transformers import AutoModelForSequenceClassification

    config = tiny_model_config("bert", num_hidden_layers=4)
    stack = make_stack(
        model={"config": config},
        stages=[
            {"name": "teacher", "epochs": 2},
            {
                "name": "student",
                "epochs": 2,
                "stack": [{"method": "kd", "student": {"from_teacher": True, "keep_layers": [0, 2]}}],
            },
        ],
    )
    result = run_stack(stack)
    reports = kd_reports(result)
    hidden, inter = 32, 64
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + (hidden * inter + inter) + (inter * hidden + hidden)
    assert reports["student_layers_kept"] == [0, 2]
    assert reports["teacher_params"] - reports["student_params"] == 2 * layer
    assert result.stages[1]["reload_max_abs_diff"] <= 1e-4
    assert "structural" in result.manifest["final_tags"]
    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert plain.config.num_hidden_layers == 2 and len(plain.bert.encoder.layer) == 2
    # the teacher is stage 1's saved model
    teacher = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "stages" / "00-teacher" / "model")
    assert sum(p.numel() for p in teacher.parameters()) == reports["teacher_params"]
    history = result.stages[1]["training"]["history"]
    assert all(math.isfinite(e["kd_soft_loss"]) for e in history)
    assert history[0]["kd_soft_loss"] < 0.01  # the student starts close to its teacher


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory, tiny_data):
    """A finished run of a wider, deeper tiny BERT (48 wide, 6 heads, 3 layers)."""
    from tunestack.plugins import create_host
    from tunestack.runner import run

    folder = tmp_path_factory.mktemp("teachers")
    config = tiny_model_config("bert", hidden_size=48, num_attention_heads=6, intermediate_size=96, num_hidden_layers=3)
    stack = tiny_stack(tiny_data.folder, model={"config": config}, epochs=3)
    stack["name"] = "wide"
    result = run(stack, out=folder, host=create_host(), force=True, base_dir=folder)
    return result.run_dir


def test_run_folder_teacher_with_projection_and_the_student_reloads_alone(
    run_stack, make_stack, tmp_path, wide_teacher
):
    import shutil

    teacher = tmp_path / "teacher-run"
    shutil.copytree(wide_teacher, teacher)
    stack = make_stack(methods=[{"method": "kd", "teacher": "teacher-run", "hidden_weight": 1.0}], epochs=2)
    result = run_stack(stack)
    reports = kd_reports(result)
    assert reports["teacher_source"] == f"run {teacher.resolve()}"
    assert reports["hidden_projection_params"] == 32 * 48 + 48
    assert reports["layer_map"] == [[0, 1], [1, 2]]
    student_params = sum(p.numel() for p in initial_model("bert").parameters())
    assert reports["student_params"] == student_params < reports["teacher_params"]
    history = result.stages[0]["training"]["history"]
    assert all(math.isfinite(e["kd_hidden_loss"]) for e in history)
    assert history[-1]["kd_hidden_loss"] < history[0]["kd_hidden_loss"]

    teacher.rename(tmp_path / "teacher-gone")  # no teacher needed at inference
    loaded = tunestack.load(result.run_dir)
    assert sum(p.numel() for p in loaded.model.parameters()) == student_params  # projection not saved
    from safetensors import safe_open

    with safe_open(str(result.run_dir / "model" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(initial_model("bert").state_dict())
    assert len(loaded.predict(["the film was great"])) == 1


def test_run_folder_teacher_checks(plugin_host, make_stack, tmp_path, wide_teacher):
    text = problems(
        make_stack(
            methods=[{"method": "kd", "teacher": str(wide_teacher), "attention_weight": 1.0}],
            data={"labels": ["bad", "good"]},
        ),
        plugin_host,
    )
    assert "stack[0].attention_weight: attention maps need the same number of heads: student 4, teacher 6" in text
    assert (
        "stack[0].teacher: the teacher predicts labels ['negative', 'positive'] but data.labels is ['bad', 'good']"
        in text
    )
    text = problems(
        make_stack(methods=[{"method": "kd", "teacher": str(wide_teacher), "student": {"keep_layers": [3]}}]),
        plugin_host,
    )
    assert "stack[0].student.keep_layers: the teacher has 3 layers (0..2); cannot keep [3]" in text
    text = problems(
        make_stack(task="token-classification", methods=[{"method": "kd", "teacher": str(wide_teacher)}]), plugin_host
    )
    assert "was trained for 'sequence-classification', not 'token-classification'" in text


def test_student_copied_from_a_run_folder_teacher(run_stack, make_stack, wide_teacher):
    stack = make_stack(
        methods=[
            {"method": "kd", "teacher": str(wide_teacher), "student": {"keep_layers": [0, 2]}, "hidden_weight": 0.5}
        ],
        epochs=1,
    )
    result = run_stack(stack)
    reports = kd_reports(result)
    assert reports["layer_map"] == [[0, 0], [1, 2]] and "hidden_projection_params" not in reports
    model = tunestack.load(result.run_dir).model
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 2


def test_labels_in_another_order_are_remapped(run_stack, make_stack, wide_teacher, tmp_path, tiny_data):
    result = run_stack(
        make_stack(
            methods=[{"method": "kd", "teacher": str(wide_teacher), "alpha": 0.0}],
            data={"labels": ["positive", "negative"]},
            epochs=1,
        )
    )
    assert result.status == "complete"
    with pytest.raises(UserError, match="needs the same order"):
        run_stack(
            make_stack(
                methods=[{"method": "kd", "teacher": str(wide_teacher), "student": {"keep_layers": [0]}}],
                data={"labels": ["positive", "negative"]},
            )
        )
    # labels read from the training file are only known at prepare time: a clear error there
    other = tmp_path / "other.tsv"
    other.write_text(tiny_data.sentiment_train.read_text().replace("negative", "bad").replace("positive", "good"))
    with pytest.raises(UserError, match=r"the teacher predicts labels \['negative', 'positive'\] but this stack's"):
        run_stack(
            make_stack(
                methods=[{"method": "kd", "teacher": str(wide_teacher)}], data={"train": str(other), "eval": str(other)}
            )
        )


def test_token_classification_with_hidden_and_attention_terms(run_stack, make_stack):
    stack = make_stack(
        task="token-classification",
        methods=[
            {
                "method": "kd",
                "student": {"keep_layers": [1]},
                "hidden_weight": 1.0,
                "attention_weight": 1.0,
                "attention_loss": "kl",
            }
        ],
        epochs=2,
    )
    result = run_stack(stack)
    history = result.stages[0]["training"]["history"]
    assert {"kd_soft_loss", "kd_hidden_loss", "kd_attention_loss"} <= set(history[0])
    assert all(math.isfinite(e["loss"]) for e in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert kd_reports(result)["layer_map"] == [[0, 1]]
    model = tunestack.load(result.run_dir).model
    assert model.config.num_hidden_layers == 1
    assert result.stages[0]["reload_max_abs_diff"] <= 1e-4


def test_causal_lm_with_a_cached_teacher(run_stack, make_stack):
    options = {"method": "kd", "alpha": 0.5, "student": {"keep_layers": [1]}}
    stack = make_stack(task="causal-lm", family="llama", methods=[{**options, "cache_teacher": True}], epochs=3)
    cached = run_stack(stack)
    reports = kd_reports(cached)
    assert reports["teacher_cache_hits"] == 48 * 2  # every example of epochs 2 and 3
    assert reports["teacher_forward_batches"] == 6  # the first epoch only
    assert reports["teacher_cache_full"] is False and reports["teacher_cache_bytes"] > 0
    fresh = run_stack(make_stack(task="causal-lm", family="llama", methods=[options], epochs=3))
    assert kd_reports(fresh)["teacher_forward_batches"] == 18
    assert losses_of(cached) == pytest.approx(losses_of(fresh), rel=1e-4)
    assert losses_of(cached)[-1] < losses_of(cached)[0]
    assert "perplexity" in cached.metrics


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


def test_kd_then_freeze_trains_only_the_unfrozen_student(run_stack, make_stack):
    model = initial_model("bert")
    stack = make_stack(
        methods=[{"method": "kd", "student": {"keep_layers": [1]}}, {"method": "freeze", "embeddings": True}],
        epochs=2,
    )
    result = run_stack(stack)
    hidden, vocab = 32, 30522
    embeddings = vocab * hidden + 128 * hidden + 2 * hidden + 2 * hidden
    student_params = kd_reports(result)["student_params"]
    assert result.metrics["params_trainable"] == student_params - embeddings
    final = tunestack.load(result.run_dir).model
    start = model.state_dict()
    after = final.state_dict()
    assert all(torch.equal(after[n], start[n]) for n in after if n.startswith("bert.embeddings."))
    # the student's only layer started as the teacher's layer 1 and has trained
    assert not torch.equal(
        after["bert.encoder.layer.0.attention.self.query.weight"],
        start["bert.encoder.layer.1.attention.self.query.weight"],
    )


def test_kd_and_echo_wrappers_nest_in_stack_order(run_stack, make_stack, plugin_host):
    host = conformance_host()
    one_step = {"max_steps": 1}
    plain = run_stack(make_stack(train=one_step), host=host)
    kd = run_stack(make_stack(methods=[{"method": "kd"}], train=one_step), host=host)
    # echo after kd is the inner wrapper: it scales the task loss, which kd then mixes
    inner = run_stack(
        make_stack(methods=[{"method": "kd", "alpha": 1.0}, {"method": "echo", "scale_loss": 3.0}], train=one_step),
        host=host,
    )
    # echo before kd is the outer wrapper: it scales kd's mixed loss
    outer = run_stack(
        make_stack(methods=[{"method": "echo", "scale_loss": 3.0}, {"method": "kd"}], train=one_step), host=host
    )
    assert losses_of(inner)[0] == pytest.approx(3 * losses_of(plain)[0], rel=1e-6)
    assert losses_of(outer)[0] == pytest.approx(3 * losses_of(kd)[0], rel=1e-6)
    assert losses_of(kd)[0] != pytest.approx(losses_of(plain)[0], rel=1e-6)


def test_recovery_from_an_earlier_stage_teacher(run_stack, make_stack):
    host = conformance_host()
    stack = make_stack(
        stages=[
            {"name": "ft", "epochs": 2},
            {"name": "shrink", "epochs": 1, "stack": [{"method": "kd", "alpha": 1.0, "student": {"keep_layers": [0]}}]},
            {"name": "recover", "epochs": 1, "stack": [{"method": "kd", "teacher": "stage:ft", "alpha": 0.0}]},
        ]
    )
    result = run_stack(stack, host=host)
    reports = kd_reports(result, 2)
    assert reports["teacher_source"] == "stage 'ft' of this run"
    assert reports["teacher_params"] > reports["student_params"]
    assert result.stages[2]["training"]["history"][0]["loss"] == pytest.approx(
        result.stages[2]["training"]["history"][0]["kd_soft_loss"]
    )


class _ZeroHeadOptions(Options):
    pass


class _ZeroHead(Method[_ZeroHeadOptions]):
    """A stand-in for a method that changes weights in prepare (pruning, for instance)."""

    @hookimpl
    def tunestack_prepare(self, model, ctx):
        with torch.no_grad():
            for name, param in model.model.named_parameters():
                if name.startswith("classifier."):
                    param.zero_()


class _ZeroHeadPlugin:
    @hookimpl
    def tunestack_register_methods(self, register):
        register(
            MethodSpec(
                name="zero-head",
                options=_ZeroHeadOptions,
                factory=_ZeroHead,
                contract=Contract(phases=frozenset({"prepare"}), produces=frozenset({"pruned"})),
            )
        )


@pytest.mark.parametrize("zero_first", [True, False])
def test_input_teacher_is_the_stage_input_even_after_methods_that_change_it(run_stack, make_stack, zero_first):
    from tunestack.plugins import create_host

    host = create_host(extra_plugins=[("zero-head", _ZeroHeadPlugin())])
    kd = {"method": "kd", "alpha": 0.0}
    methods = [{"method": "zero-head"}, kd] if zero_first else [kd, {"method": "zero-head"}]
    result = run_stack(make_stack(methods=methods, train={"max_steps": 1}), host=host)
    # the student's head is zero (uniform predictions); a zeroed teacher would give a soft loss of 0
    first = result.stages[0]["training"]["history"][0]
    assert first["kd_soft_loss"] > 1e-7
    assert first["loss"] == pytest.approx(first["kd_soft_loss"])


def test_lora_trains_the_student_or_wraps_it_before_kd(run_stack, make_stack):
    """With the real lora plugin (skipped when it is not installed): LoRA on the built student, and
    kd after LoRA (the teacher is then the stage's input without adapters)."""
    pytest.importorskip("tunestack_lora")
    result = run_stack(
        make_stack(methods=[{"method": "kd", "student": {"keep_layers": [1]}}, {"method": "lora", "r": 4}], epochs=2)
    )
    hidden, r = 32, 4
    head = hidden * 2 + 2
    # LoRA on query and value of the student's single layer, plus the classification head
    assert result.metrics["params_trainable"] == 2 * (r * hidden + hidden * r) + head
    assert result.stages[0]["reload_max_abs_diff"] <= 1e-4
    assert tunestack.load(result.run_dir).model.base_model.model.config.num_hidden_layers == 1
    before = run_stack(make_stack(methods=[{"method": "lora", "r": 4}, {"method": "kd", "alpha": 0.0}], epochs=1))
    reports = kd_reports(before)
    assert reports["teacher_params"] == sum(p.numel() for p in initial_model("bert").parameters())
    assert reports["student_params"] > reports["teacher_params"]  # the student carries the adapters
