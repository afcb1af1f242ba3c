"""Verbalizer scoring on tiny models with constructed inputs: the expected label wins, and the LM
scores equal log-likelihoods computed by hand, one unpadded example at a time."""

from __future__ import annotations

import pytest
import torch

from tunestack.models import build_from_config, load_tokenizer
from tunestack.sources import packaged_model_dir
from tunestack.testing.stacks import tiny_model_config
from tunestack_prompt import scoring
from tunestack_prompt.templates import continuation, parse_template, prompt_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(packaged_model_dir("minilm"))


def tiny(family: str, auto_class: str):
    torch.manual_seed(0)
    return build_from_config(tiny_model_config(family), auto_class).eval()


def token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, word
    return ids[0]


def token_settings(tokenizer, mode: str, labels, **extra):
    head, tail = scoring.special_layout(tokenizer)
    return {
        "scoring": mode,
        "labels": list(labels),
        "head": head,
        "tail": tail,
        "pad_id": tokenizer.pad_token_id,
        "start_id": tokenizer.cls_token_id,
        "length_normalize": True,
        **extra,
    }


def test_similarity_picks_the_label_whose_description_equals_the_input(tokenizer):
    inner = tiny("bert", "base")
    # "superb" gets the same word embedding as "great": same text up to that row -> same vector
    with torch.no_grad():
        words = inner.embeddings.word_embeddings.weight
        words[token(tokenizer, "superb")] = words[token(tokenizer, "great")]
    settings = {
        "scoring": "similarity",
        "labels": ["negative", "positive"],
        "temperature": 0.05,
        "prototype_weight": 0.5,
    }
    descriptions = {"negative": ["it was awful"], "positive": ["it was great"]}
    wrapper = scoring.build_similarity(inner, tokenizer, settings, descriptions, {}, 32, 8)
    batch = tokenizer(["it was great", "it was awful", "it was superb"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = wrapper(**batch).logits
    assert logits.argmax(-1).tolist() == [1, 0, 1]
    # an input equal to a description has cosine 1: logit = 1 / temperature, exactly the maximum
    assert torch.allclose(logits[[0, 1, 2], [1, 0, 1]], torch.full((3,), 20.0), atol=1e-4)
    assert (logits < 20.0 + 1e-4).all()
    assert not any(p.requires_grad and p.grad is not None for p in wrapper.parameters())
    gold = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = wrapper(**batch, labels=gold)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits, gold))


def test_similarity_prototypes_move_the_label_vectors(tokenizer):
    inner = tiny("bert", "base")
    settings = {"scoring": "similarity", "labels": ["a", "b"], "temperature": 1.0, "prototype_weight": 1.0}
    descriptions = {"a": ["alpha"], "b": ["beta"]}
    shots = {"a": [("the river is wide", None)], "b": [("seven hungry cats", None)]}
    wrapper = scoring.build_similarity(inner, tokenizer, settings, descriptions, shots, 32, 8)
    # with weight 1 the label vector is the (normalised) prototype: the shot itself scores cosine 1
    batch = tokenizer(["seven hungry cats", "the river is wide"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = wrapper(**batch).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    assert torch.allclose(logits[[0, 1], [1, 0]], torch.ones(2), atol=1e-5)
    assert torch.allclose(wrapper.prototypes, wrapper.label_vectors)


def lm_wrapper(inner, tokenizer, template, verbalizers, prefix=()):
    t = parse_template(template)
    labels = list(verbalizers)
    words, owners = [], []
    for index, label in enumerate(labels):
        for word in verbalizers[label]:
            words.append(tokenizer(continuation(t, word), add_special_tokens=False)["input_ids"])
            owners.append(index)
    settings = token_settings(tokenizer, "lm", labels)
    return scoring.build_token_scorer(inner, settings, words, owners, list(prefix)), t, words, owners


def test_lm_picks_the_verbalizer_the_head_favours(tokenizer):
    inner = tiny("gpt2", "causal-lm")
    biased = torch.nn.Linear(inner.lm_head.in_features, inner.lm_head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(inner.lm_head.weight)
        biased.bias.zero_()
    inner.lm_head = biased
    verbalizers = {"negative": ["bad"], "positive": ["good"]}
    wrapper, t, _, _ = lm_wrapper(inner, tokenizer, "{text} It was {label}.", verbalizers)
    texts = [prompt_text(t, x, None) for x in ["the film", "a long and winding story about nothing", "ok"]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for word, expected in (("good", 1), ("bad", 0)):
        with torch.no_grad():
            biased.bias.zero_()
            biased.bias[token(tokenizer, word)] = 25.0
            logits = wrapper(**batch).logits
        assert logits.argmax(-1).tolist() == [expected] * 3, word


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("multi", [False, True])
def test_lm_scores_equal_hand_computed_log_likelihoods(tokenizer, family, multi):
    inner = tiny(family, "causal-lm")
    verbalizers = (
        {"negative": ["bad", "very dull"], "positive": ["good", "a real treat"]}
        if multi
        else {"negative": ["bad", "dull"], "positive": ["good"]}
    )
    prefix = tokenizer("the cast was great. it was good.\n\n", add_special_tokens=False)["input_ids"]
    wrapper, t, words, owners = lm_wrapper(inner, tokenizer, "{text} It was {label}.", verbalizers, prefix)
    texts = [prompt_text(t, x, None) for x in ["the film", "a long and winding story about nothing at all", "ok"]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = wrapper(**batch).logits
        expected = torch.zeros(len(texts), 2)
        for i, text in enumerate(texts):
            ids = tokenizer(text)["input_ids"][:-1]  # [CLS] prompt, without the trailing [SEP]
            ids = ids[:1] + prefix + ids[1:]
            per_label: dict[int, list[float]] = {0: [], 1: []}
            for word, owner in zip(words, owners):
                logits = inner(torch.tensor([ids + word])).logits[0].log_softmax(-1)
                logp = sum(float(logits[len(ids) - 1 + j, w]) for j, w in enumerate(word)) / len(word)
                per_label[owner].append(logp)
            for owner, values in per_label.items():
                expected[i, owner] = scoring.log_mean_exp(values)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    wrapper._keeps_logits = False  # models without logits_to_keep: full logits, sliced
    with torch.no_grad():
        assert torch.allclose(wrapper(**batch).logits, got, atol=1e-5)


def test_cloze_scores_the_verbalizer_at_the_mask(tokenizer):
    inner = tiny("bert", "masked-lm")
    settings = token_settings(tokenizer, "cloze", ["negative", "positive"], mask_id=tokenizer.mask_token_id)
    words = [[token(tokenizer, "bad")], [token(tokenizer, "good")]]
    wrapper = scoring.build_token_scorer(inner, settings, words, [0, 1], [])
    texts = ["the film. it was [MASK].", "[MASK] ! a long and winding story", "no mask at all"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        bias = (
            inner.cls.predictions.bias if hasattr(inner.cls.predictions, "bias") else inner.cls.predictions.decoder.bias
        )
        for word, expected in (("good", 1), ("bad", 0)):
            bias.zero_()
            bias[token(tokenizer, word)] = 25.0
            logits = wrapper(**batch).logits
            assert logits[:2].argmax(-1).tolist() == [expected] * 2, word
            assert logits[2].tolist() == [0.0, 0.0]  # the mask was truncated away: no preference
        # the score is read at the mask position: compare with the MLM logits there
        bias.zero_()
        full = inner(**batch).logits.log_softmax(-1)
        at = batch["input_ids"][0].tolist().index(tokenizer.mask_token_id)
        assert torch.allclose(wrapper(**batch).logits[0], full[0, at, [words[0][0], words[1][0]]], atol=1e-5)


def test_aggregate_is_the_log_of_the_mean_probability():
    scores = torch.log(torch.tensor([[0.2, 0.4, 0.1]]))
    got = scoring.aggregate(scores, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(got, torch.log(torch.tensor([[0.3, 0.1]])), atol=1e-6)
