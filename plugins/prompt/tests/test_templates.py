"""Pure parts: template parsing and rendering, few-shot draws, verbalizer/label checks."""

from __future__ import annotations

import pytest

from tunestack.api import Example
from tunestack.methods import Slot
from tunestack_prompt import Prompt, PromptOptions, resolve_scoring
from tunestack_prompt.templates import (
    check_verbalizers,
    cloze_text,
    continuation,
    demonstration,
    description,
    draw_shots,
    input_text,
    parse_template,
    prompt_text,
)

SENTIMENT = "Review: {text} Sentiment: {label}"


def test_rendering_each_view_of_a_template():
    t = parse_template(SENTIMENT)
    assert t.fields == ["text", "label"]
    assert t.render("a fine film", None, "great") == "Review: a fine film Sentiment: great"
    assert input_text(t, "a fine film", None) == "Review: a fine film Sentiment:"
    assert input_text(parse_template("{text} It was {label}."), "ok", None) == "ok It was."
    assert prompt_text(t, "a fine film", None) == "Review: a fine film Sentiment:"
    assert continuation(t, "great") == " great"
    assert cloze_text(t, "a fine film", None, "[MASK]") == "Review: a fine film Sentiment: [MASK]"
    assert description(t, "great") == "Review: Sentiment: great"
    assert demonstration(t, "dull", None, "bad") == "Review: dull Sentiment: bad"


def test_label_in_the_middle_pairs_and_literal_braces():
    t = parse_template("{text_pair}? {label}, {text} {{not a field}}")
    assert t.fields == ["text_pair", "label", "text"]
    assert not t.text_before_label()
    assert t.render("B", "A", "Yes") == "A? Yes, B {not a field}"
    assert input_text(t, "B", "A") == "A?, B {not a field}"
    before, space, after = t.split_at_label()
    assert (before.render("B", "A"), space, after.render("B", "A")) == ("A?", " ", ", B {not a field}")
    newline = parse_template("{text}\nAnswer:\n{label}")
    assert newline.text_before_label()
    assert prompt_text(newline, "Q", None) == "Q\nAnswer:" and continuation(newline, "yes") == "\nyes"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("Review: {sentence} {label}", "unknown placeholder {sentence}"),
        ("{text} {}", "unknown placeholder {}"),
        ("{text} {label:>5}", "takes no format spec"),
        ("{text!r} {label}", "takes no format spec"),
        ("{text} {label} {label}", "{label} may appear only once"),
        ("{text} {label", "not a valid template"),
        ("{text} }", "not a valid template"),
    ],
)
def test_malformed_templates(source, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_template(source)


def test_shot_draws_are_reproducible_by_seed_and_differ_across_seeds():
    labels = ["pos" if i % 3 else "neg" for i in range(60)]
    first = draw_shots(labels, ["neg", "pos"], 4, seed=7)
    assert first == draw_shots(labels, ["neg", "pos"], 4, seed=7)
    assert len(first) == 8 and len(set(first)) == 8
    assert sorted(labels[i] for i in first) == ["neg"] * 4 + ["pos"] * 4
    others = {tuple(draw_shots(labels, ["neg", "pos"], 4, seed=s)) for s in range(8)}
    assert len(others) == 8  # every seed draws a different set or order
    assert draw_shots(labels, ["neg", "pos"], 0, seed=1) == []
    with pytest.raises(ValueError, match="'neg' has 20"):
        draw_shots(labels, ["neg", "pos"], 21, seed=0)


def test_verbalizer_labels_must_match_the_task_labels():
    assert check_verbalizers({"a": ["x"], "b": ["y"]}, ["a", "b"]) is None
    message = check_verbalizers({"a": ["x"], "c": ["z"]}, ["a", "b"])
    assert message is not None and "no verbalizer for label(s) 'b'" in message and "unknown label(s) 'c'" in message


def test_options_accept_a_single_word_and_reject_empty_words():
    options = PromptOptions(verbalizers={"pos": "great", "neg": ["bad", "awful"]})
    assert options.verbalizers == {"pos": ["great"], "neg": ["bad", "awful"]}
    with pytest.raises(ValueError, match="has no verbalizer words"):
        PromptOptions(verbalizers={"pos": []})
    with pytest.raises(ValueError, match="empty verbalizer word"):
        PromptOptions(verbalizers={"pos": [" "]})
    with pytest.raises(ValueError, match=r"uses \{label\} once and no other"):
        PromptOptions(label_template="{text} {label}")


def test_auto_scoring_follows_the_model():
    assert resolve_scoring("auto", {"model_type": "gpt2"}) == "lm"
    assert resolve_scoring("auto", {"model_type": "x", "architectures": ["XForCausalLM"]}) == "lm"
    assert resolve_scoring("auto", {"model_type": "bert", "architectures": ["BertModel"]}) == "similarity"
    assert resolve_scoring("auto", None) == "similarity"
    assert resolve_scoring("cloze", {"model_type": "gpt2"}) == "cloze"


def _method(**options):
    slot = Slot(method="prompt", path="stack[0]", stage="main", stage_index=0, index=0)
    return Prompt(PromptOptions(**options), slot)


def test_formatting_examples_for_each_mode():
    example = Example(text="a fine film", label="pos", where="f:2")
    similarity = _method(template=SENTIMENT, scoring="similarity").format(example)
    assert similarity.text == "Review: a fine film Sentiment:" and similarity.label == "pos"
    assert similarity.extra["prompt_source"] == {"text": "a fine film", "text_pair": None}
    assert example.extra == {}  # the original is untouched
    lm = _method(template=SENTIMENT + ".", scoring="lm").format(example)
    assert lm.text == "Review: a fine film Sentiment:"
    cloze = _method(template=SENTIMENT + ".", scoring="cloze", mask_token="<mask>").format(example)
    assert cloze.text == "Review: a fine film Sentiment: <mask>."
    pair = Example(text="B", text_pair="A", label="yes")
    kept = _method(template="{text} {label}", format_only=True).format(pair)
    assert (kept.text, kept.text_pair) == ("B", "A")  # no {text_pair}: still encoded as a pair
    merged = _method(template="{text_pair}? {label}, {text}", scoring="lm").format(pair)
    assert (merged.text, merged.text_pair) == ("A?", None)
    with pytest.raises(Exception, match=r"place \{text_pair\} in the prompt template"):
        _method(template="{text} {label}", scoring="lm").format(pair)


def test_format_only_on_causal_lm_examples():
    method = _method(template="Question: {text}\nAnswer: {label}", format_only=True)
    qa = method.format(Example(prompt="Capital of France?", completion="Paris"))
    assert (qa.prompt, qa.completion) == ("Question: Capital of France?\nAnswer:", " Paris")
    asked = method.format(Example(prompt="Capital of Peru?", completion=""))
    assert (asked.prompt, asked.completion) == ("Question: Capital of Peru?\nAnswer:", "")
    plain = method.format(Example(prompt="", completion="some text"))
    assert (plain.prompt, plain.completion) == ("", "Question: some text\nAnswer:")
