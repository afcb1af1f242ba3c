"""Tasks, readers and metric arithmetic against hand-computed values."""

from __future__ import annotations

import pytest

from tunestack.data import Example, read_conll, read_records
from tunestack.metrics import accuracy, macro_f1, per_label_report


def test_per_label_report_matches_hand_computation():
    gold = ["A", "A", "B", "B", "B", "O"]
    pred = ["A", "B", "B", "B", "O", "O"]
    report = per_label_report(gold, pred, ["A", "B", "O"])
    assert report["A"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["B"]["precision"] == pytest.approx(2 / 3) and report["B"]["recall"] == pytest.approx(2 / 3)
    assert report["O"]["precision"] == 0.5 and report["O"]["recall"] == 1.0
    assert report["micro avg"]["f1"] == pytest.approx(4 / 6) and report["micro avg"]["support"] == 6
    macro = (2 / 3 + 2 / 3 + 2 / 3) / 3
    assert report["macro avg"]["f1"] == pytest.approx(macro)
    weighted = (2 * 2 / 3 + 3 * 2 / 3 + 1 * 2 / 3) / 6
    assert report["weighted avg"]["f1"] == pytest.approx(weighted)
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    assert macro_f1(gold, pred, ["A", "B", "O"]) == pytest.approx(macro)


def test_conll_reader_skips_docstart_and_splits_sentences(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n", encoding="utf-8"
    )
    sentences = list(read_conll(path))
    assert sentences == [(3, ["EU", "rejects"], ["B-ORG", "O"]), (6, ["Peter"], ["B-PER"])]


def test_csv_with_quotes_and_pairs(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('premise,hypothesis,label\n"A, quoted",B,yes\n', encoding="utf-8")
    assert list(read_records(path, "csv")) == [(2, {"premise": "A, quoted", "hypothesis": "B", "label": "yes"})]


def _tokenizer():
    from tunestack.models import load_tokenizer
    from tunestack.sources import packaged_model_dir

    return load_tokenizer(packaged_model_dir())


def test_token_classification_labels_the_first_subword_only():
    from tunestack.tasks import IGNORE, TokenClassification

    task = TokenClassification()
    tokenizer = _tokenizer()
    example = Example(tokens=["Tokenization", "works"], tags=["B-MISC", "O"])
    feature = task.encode([example], tokenizer, ["O", "B-MISC"], 32).features[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces[:4] == ["[CLS]", "token", "##ization", "works"]
    assert feature["labels"][:5] == [IGNORE, 1, IGNORE, 0, IGNORE]


def test_token_classification_scores_truncated_words_as_o():
    import torch

    from tunestack.tasks import TokenClassification

    class AllB:
        def __call__(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, 2)
            logits[..., 1] = 1.0
            return type("Out", (), {"logits": logits})()

    task = TokenClassification()
    examples = [Example(tokens=["a"] * 10, tags=["B-MISC"] * 10)]
    metrics = task.evaluate(AllB(), examples, _tokenizer(), ["O", "B-MISC"], 6, 4, None)
    assert metrics["truncated_words"] == 6  # 6 tokens minus [CLS]/[SEP] leave 4 words
    assert metrics["tag_report"]["B-MISC"]["support"] == 10  # supports always count every gold word
    assert metrics["tag_report"]["B-MISC"]["recall"] == pytest.approx(0.4)


def test_causal_lm_loss_covers_the_completion_only():
    from tunestack.tasks import IGNORE, CausalLM

    task = CausalLM()
    tokenizer = _tokenizer()
    feature = task.encode([Example(prompt="the film was", completion=" great")], tokenizer, [], 32).features[0]
    prompt_length = len(tokenizer("the film was", add_special_tokens=False)["input_ids"])
    assert feature["labels"][:prompt_length] == [IGNORE] * prompt_length
    assert all(label != IGNORE for label in feature["labels"][prompt_length:])
