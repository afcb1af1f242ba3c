"""The packaged MiniLM (the model the SST-2 and CoNLL examples use): the key/value prefix is exact on it."""

from __future__ import annotations

import copy

import pytest
import torch

from tunestack_prefix import _kv


@pytest.fixture(scope="module")
def minilm():
    from tunestack.models import load_pretrained
    from tunestack.sources import packaged_model_dir

    kwargs = {"num_labels": 2, "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    return load_pretrained(packaged_model_dir("minilm"), "sequence-classification", kwargs).eval()


def test_minilm_prefix_of_its_own_keys_values_is_exact(minilm, tokenizer):
    ids = tokenizer("a gripping, beautifully acted film")["input_ids"]
    batch = {"input_ids": torch.tensor([ids])}
    with torch.no_grad():
        expected = minilm(**batch, output_hidden_states=True).hidden_states[-1]
    kv = _kv.capture_kv(minilm, ids)
    assert kv.shape == (6, 2, 12, len(ids), 32)
    wrapped = _kv.KVPrefixModel(copy.deepcopy(minilm), _kv.PrefixKV(6, 12, 32, len(ids), init=kv)).eval()
    with torch.no_grad():
        got = wrapped(**batch, output_hidden_states=True).hidden_states[-1]
    assert (got - expected).abs().max() < 1e-4


def test_minilm_counts_match_the_examples(minilm, tokenizer):
    from types import SimpleNamespace

    from tunestack.api import ModelHandle, Slot
    from tunestack_prefix import Prefix, PrefixOptions

    for mode, virtual in (("prefix", 20 * 6 * 2 * 384), ("prompt", 20 * 384)):
        method = Prefix(
            PrefixOptions(mode=mode, init_text="Classify the sentiment"), Slot("prefix", "stack[0]", "m", 0, 0)
        )
        handle = ModelHandle(copy.deepcopy(minilm), tokenizer, None, [], "sequence-classification")
        reports: dict = {}
        ctx = SimpleNamespace(seed=0, report=lambda m, k, v, into=reports: into.__setitem__(k, v))
        method.tunestack_prepare(model=handle, ctx=ctx)
        assert reports["trainable_params"] == virtual + 384 * 2 + 2
