"""The method in stacks: validation, runs, save/reload, prediction, few-shot draws, format_only."""

from __future__ import annotations

import json

import pytest
import torch

import tunestack
from tunestack.api import Example, UserError
from tunestack.errors import StackError
from tunestack.models import build_from_config
from tunestack.stack import dump_toml
from tunestack.testing.conformance import check_method
from tunestack.testing.stacks import tiny_model_config
from tunestack.validation import load_plan
from tunestack_prompt import scoring

TEMPLATE = "{text} It was {label}."
WORDS = {"negative": ["bad", "awful"], "positive": ["good", "great"]}


def entry(**options):
    return {"method": "prompt", "template": TEMPLATE, "verbalizers": WORDS, **options}


def problems(plugin_host, stack) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, plugin_host)
    return str(caught.value)


def test_unknown_placeholder_is_a_validation_error_with_its_toml_path(plugin_host, make_stack, cli, tmp_path):
    stack = make_stack(methods=[entry(template="Review: {review} Sentiment: {label}")], epochs=0)
    assert "stack[0].template: unknown placeholder {review}" in problems(plugin_host, stack)
    staged = make_stack(stages=[{"name": "zero", "epochs": 0, "stack": [entry(template="{text} {label!r}")]}])
    assert "stage[0].stack[0].template: placeholder {label} takes no format spec" in problems(plugin_host, staged)
    path = tmp_path / "bad.toml"
    path.write_text(dump_toml(stack), encoding="utf-8")
    result = cli("validate", str(path))
    assert result.exit_code == 2 and "stack[0].template" in result.output + (result.stderr or "")


def test_options_are_checked(plugin_host, make_stack):
    text = problems(plugin_host, make_stack(methods=[entry(scoring="mlm", shots=-1, temperatur=1)], epochs=0))
    assert "stack[0].scoring: must be 'auto', 'similarity', 'lm' or 'cloze'" in text
    assert "stack[0].shots: must be >= 0" in text
    assert "stack[0].temperatur: unknown key; did you mean 'temperature'?" in text
    assert "stack[0].verbalizers: label 'positive' has no verbalizer words" in problems(
        plugin_host, make_stack(methods=[entry(verbalizers={"negative": ["bad"], "positive": []})], epochs=0)
    )


def test_stage_level_problems(plugin_host, make_stack):
    training = problems(plugin_host, make_stack(methods=[entry()], epochs=1))
    assert "stack[0]: prompt scoring makes no gradient updates" in training and "format_only" in training
    labelled = make_stack(
        methods=[entry(verbalizers={"neg": ["bad"], "positive": ["good"]})],
        epochs=0,
        data={"labels": ["negative", "positive"]},
    )
    assert (
        "stack[0].verbalizers: no verbalizer for label(s) 'negative'; verbalizers for unknown label(s) 'neg'"
        in problems(plugin_host, labelled)
    )
    assert "stack[0].template: the template needs {label}" in problems(
        plugin_host, make_stack(methods=[entry(template="Review: {text}")], epochs=0)
    )
    assert "stack[0].verbalizers: give one or more words per label" in problems(
        plugin_host, make_stack(methods=[entry(verbalizers={})], epochs=0)
    )
    assert "stack[0].template: the template uses {text_pair} but data.text names a single field" in problems(
        plugin_host, make_stack(methods=[entry(template="{text} / {text_pair} {label}")], epochs=0)
    )
    assert "stack[0].shots: few-shot examples are drawn from data.train" in problems(
        plugin_host,
        make_stack(methods=[entry(shots=2)], epochs=0, data={"train": None, "labels": ["negative", "positive"]}),
    )
    assert "stack[1]: the inputs are already templated by 'prompt' at stack[0]" in problems(
        plugin_host, make_stack(methods=[entry(format_only=True), entry()], epochs=0)
    )
    only = problems(plugin_host, make_stack(methods=[entry(format_only=True, shots=2, scoring="lm")], epochs=1))
    assert "stack[0].shots: format_only applies the template only" in only and "stack[0].scoring:" in only
    lm_data = make_stack(task="causal-lm", family="gpt2", methods=[entry()], epochs=0)
    assert "stack[0].format_only: on task 'causal-lm' prompt can only format inputs" in problems(plugin_host, lm_data)
    assert "does not support task 'token-classification'" in problems(
        plugin_host, make_stack(task="token-classification", methods=[entry(format_only=True)], epochs=1)
    )


def test_model_dependent_problems(plugin_host, make_stack):
    label_first = make_stack(family="gpt2", methods=[entry(template="{label}! {text}")], epochs=0)
    assert "stack[0].template: lm scoring continues the prompt: {label} must come after {text}" in problems(
        plugin_host, label_first
    )
    assert "stack[0].scoring: lm scoring needs a causal LM, but the model is 'bert'" in problems(
        plugin_host, make_stack(methods=[entry(scoring="lm")], epochs=0)
    )
    later = make_stack(
        family="gpt2",
        stages=[{"name": "first", "epochs": 0, "stack": []}, {"name": "second", "epochs": 0, "stack": [entry()]}],
    )
    assert "stage[1].stack[0].scoring: lm scoring loads the model with its causal-lm head" in problems(
        plugin_host, later
    )
    # similarity works from any stage: it only needs hidden states
    load_plan(
        make_stack(
            family="gpt2",
            stages=[
                {"name": "first", "epochs": 0, "stack": []},
                {"name": "second", "epochs": 0, "stack": [entry(scoring="similarity")]},
            ],
        ),
        plugin_host,
    )


def test_cloze_is_refused_on_the_packaged_minilm_which_has_no_mlm_head(plugin_host, make_stack):
    minilm = {"source": "minilm", "config": None}
    text = problems(plugin_host, make_stack(methods=[entry(scoring="cloze")], epochs=0, model=minilm))
    assert "stack[0].scoring: cloze needs a masked-LM head" in text and "['BertModel']" in text
    plan = load_plan(make_stack(methods=[entry()], epochs=0, model=minilm), plugin_host)
    method = plan.stages[0].methods[0]
    assert method.instance.scoring == "similarity"
    assert method.contract.phases == {"prepare", "evaluate"} and method.contract.produces == {"prompt", "structural"}


@pytest.mark.parametrize(
    ("family", "options", "inner_class", "auto_class", "formatted"),
    [
        ("bert", {"shots": 2}, "BertModel", "base", "the film It was."),
        ("gpt2", {"shots": 1}, "GPT2LMHeadModel", "causal-lm", "the film It was"),
        ("bert", {"scoring": "cloze", "shots": 1}, "BertForMaskedLM", "masked-lm", "the film It was [MASK]."),
    ],
)
def test_each_scoring_loads_its_model_class_saves_and_reloads_exactly(
    run_stack, make_stack, family, options, inner_class, auto_class, formatted
):
    result = run_stack(make_stack(family=family, methods=[entry(**options)], epochs=0))
    assert result.stages[0]["reload_max_abs_diff"] == 0.0
    folder = result.run_dir / "model"
    assert json.loads((folder / "tunestack.json").read_text())["auto_class"] == auto_class
    saved = json.loads((folder / "transforms" / "s0-0-prompt" / "prompt.json").read_text())
    assert saved["template"] == TEMPLATE and saved["verbalizers"] == WORDS
    assert len(saved["shot_ids"]) == 2 * options["shots"]
    first, second = tunestack.load(result.run_dir), tunestack.load(result.run_dir)
    assert type(first.model.inner).__name__ == inner_class
    assert first.transform([Example(text="the film")], "predict")[0].text == formatted  # as during the run
    texts = ["the film was great", "the plot was dull and stale"]
    batch = first.tokenizer(
        [e.text for e in first.transform([Example(text=t) for t in texts], "predict")],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.equal(first.model(**batch).logits, second.model(**batch).logits)
    predictions = first.predict(texts)
    assert [set(p["scores"]) for p in predictions] == [{"negative", "positive"}] * 2
    assert abs(first.evaluate(latency=False)["accuracy"] - result.metrics["accuracy"]) < 1e-9
    assert result.metrics["s0-0-prompt.scoring"] == saved["scoring"]
    assert result.metrics["s0-0-prompt.shots"] == options["shots"]


def test_similarity_keeps_the_model_and_stores_description_and_prototype_vectors(run_stack, make_stack, tiny_data):
    result = run_stack(make_stack(methods=[entry(shots=2, shot_seed=3, prototype_weight=0.25)], epochs=0))
    loaded = tunestack.load(result.run_dir)
    torch.manual_seed(0)
    initial = build_from_config(tiny_model_config("bert"), "base").eval()
    inner = loaded.model.inner
    assert all(torch.equal(t, inner.state_dict()[n]) for n, t in initial.state_dict().items())  # no update
    saved = loaded.model.settings
    assert saved["descriptions"] == {
        "negative": ["It was bad.", "It was awful."],
        "positive": ["It was good.", "It was great."],
    }
    rows = tiny_data.sentiment_train.read_text().splitlines()[1:]
    shots: dict[str, list[tuple[str, None]]] = {}
    for where in saved["shot_examples"]:
        line = int(where["where"].rsplit(":", 1)[1])
        text, label = rows[line - 2].split("\t")
        assert label == where["label"]
        shots.setdefault(label, []).append((f"{text} It was.", None))
    expected = scoring.build_similarity(initial, loaded.tokenizer, dict(saved), saved["descriptions"], shots, 32, 8)
    assert torch.allclose(expected.label_vectors, loaded.model.label_vectors, atol=1e-6)
    assert torch.allclose(expected.prototypes, loaded.model.prototypes, atol=1e-6)
    reports = result.stages[0]["methods"][0]["reports"]
    assert reports["scoring"] == "similarity" and reports["shot_seed"] == 3 and len(reports["shot_examples"]) == 4


def test_few_shot_draws_are_reproducible_and_change_with_the_seed(run_stack, make_stack):
    def drawn(**options):
        result = run_stack(make_stack(methods=[entry(shots=2, **options)], epochs=0))
        return result.stages[0]["methods"][0]["reports"]

    default = drawn()
    assert default["shot_seed"] == 0  # the stack seed
    assert drawn(shot_seed=0)["shot_examples"] == default["shot_examples"]
    assert drawn(shot_seed=11)["shot_examples"] != default["shot_examples"]


def test_verbalizer_labels_are_checked_against_the_data_at_prepare(run_stack, make_stack):
    stack = make_stack(methods=[entry(verbalizers={"negative": ["bad"], "good": ["good"]})], epochs=0)
    with pytest.raises(UserError, match=r"stack\[0\]\.verbalizers: no verbalizer for label\(s\) 'positive'"):
        run_stack(stack)
    with pytest.raises(Exception, match="shots = 40 needs 40 training examples per label"):
        run_stack(make_stack(methods=[entry(shots=40)], epochs=0))


def test_predict_from_the_command_line(run_stack, make_stack, cli):
    result = run_stack(make_stack(family="gpt2", methods=[entry()], epochs=0))
    out = cli("predict", str(result.run_dir), "the film was great")
    assert out.exit_code == 0, out.output
    assert "positive" in out.output or "negative" in out.output


def test_format_only_templates_a_fine_tuning_stage(run_stack, make_stack):
    template = "Review: {text} Sentiment: {label}"
    result = run_stack(make_stack(methods=[{"method": "prompt", "template": template, "format_only": True}], epochs=3))
    record = result.stages[0]["methods"][0]
    assert record["contract"]["phases"] == ["prepare"] and record["contract"]["produces"] == []
    history = result.stages[0]["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    loaded = tunestack.load(result.run_dir)
    assert type(loaded.model).__name__ == "BertForSequenceClassification"  # no wrapper
    assert loaded.transform([Example(text="a fine film")], "predict")[0].text == "Review: a fine film Sentiment:"
    assert loaded.predict(["a fine film"])[0]["label"] in {"negative", "positive"}
    assert not any(k.startswith("s0-0-prompt.") for k in result.metrics)


def test_conformance_scoring(tmp_path):
    report = check_method(
        "prompt", tmp_path, options={"template": TEMPLATE, "verbalizers": WORDS}, families=("bert", "gpt2"), epochs=0
    )
    assert "runs, reloads and predicts on gpt2/sequence-classification" in report.passed


def test_conformance_format_only(tmp_path):
    report = check_method(
        "prompt",
        tmp_path,
        options={"template": "Review: {text} Sentiment: {label}", "format_only": True},
        families=("gpt2",),
        tasks=("sequence-classification", "causal-lm"),
    )
    assert "runs, reloads and predicts on gpt2/causal-lm" in report.passed


def test_the_wrapper_and_its_template_carry_into_the_next_stage_and_the_next_run(run_stack, make_stack, plugin_host):
    stack = make_stack(
        stages=[
            {"name": "score", "epochs": 0, "stack": [entry(shots=1)]},
            {"name": "after", "epochs": 0, "stack": []},
        ]
    )
    result = run_stack(stack)
    first, second = result.stages
    assert second["reload_max_abs_diff"] == 0.0
    assert second["metrics"]["accuracy"] == first["metrics"]["accuracy"]  # same wrapper, same formatting
    assert [t["method"] for t in second["transforms"]] == ["prompt"]
    assert result.manifest["final_tags"] == ["float-weights", "prompt", "structural"]
    again = make_stack(
        methods=[entry(scoring="similarity")], epochs=0, model={"source": str(result.run_dir), "config": None}
    )
    assert "stack[0]: 'prompt' cannot run on a model that is 'prompt'" in problems(plugin_host, again)
