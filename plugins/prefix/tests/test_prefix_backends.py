"""The three backends on tiny random models, without the runner: math, shapes, init, counts, folding."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tunestack.api import ModelHandle, Slot
from tunestack_prefix import Prefix, PrefixOptions, _kv, _peft
from tunestack_prefix._prompt import PromptModel

P = 5


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def hidden(model, batch):
    """The last layer's hidden states (LayerNorm-scaled, so differences show; tiny heads squash them)."""
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[-1]


def prepare(model, tokenizer, kind="seq", **options):
    """Run the method's prepare hook on ``model`` (as core would), return (handle, reports)."""
    method = Prefix(PrefixOptions(num_virtual_tokens=P, **options), Slot("prefix", "stack[0]", "main", 0, 0))
    handle = ModelHandle(
        model=model,
        tokenizer=tokenizer,
        task=None,
        labels=[],
        auto_class={"seq": "sequence-classification", "token": "token-classification", "causal": "causal-lm"}[kind],
    )
    reports: dict = {}
    ctx = SimpleNamespace(seed=0, report=lambda m, k, v: reports.__setitem__(k, v))
    method.tunestack_prepare(model=handle, ctx=ctx)
    return handle, reports


# -- prompt tuning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, kind", [("bert", "seq"), ("gpt2", "causal"), ("bert", "token")])
def test_prompt_matches_peft_prompt_tuning(make_model, batch, family, kind):
    """Same prompt -> same outputs as peft's PromptTuning (logits of the real positions)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base = make_model(family, kind)
    if kind == "causal":
        batch.pop("token_type_ids")  # peft drops them for causal LM; GPT-2 would embed them
    task_type = {"seq": TaskType.SEQ_CLS, "token": TaskType.TOKEN_CLS, "causal": TaskType.CAUSAL_LM}[kind]
    reference = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type=task_type, num_virtual_tokens=P))
    reference.eval()
    prompt = reference.prompt_encoder["default"].embedding.weight.detach()
    ours = PromptModel(base, prompt, virtual_token_id=1, kind=kind).eval()
    expected = logits(reference, batch)
    if kind != "seq":
        expected = expected[:, P:]  # peft returns the virtual positions too
    got = logits(ours, batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_decoder_classification_pools_the_last_real_token(make_model, batch, family):
    """Each row of a right-padded batch gets the same logits as the example alone."""
    model = PromptModel(make_model(family), torch.randn(P, 32) * 0.1, virtual_token_id=1, kind="seq").eval()
    together = logits(model, batch)
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        alone = logits(model, {k: v[row : row + 1, :length] for k, v in batch.items()})
        assert torch.allclose(together[row], alone[0], atol=1e-5), (row, together[row], alone[0])


def test_prompt_token_classification_keeps_length_and_pads_labels(make_model, batch):
    model = PromptModel(make_model("llama", "token"), torch.randn(P, 32) * 0.1, 1, "token")
    labels = torch.where(batch["attention_mask"] == 1, 1, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)  # virtual positions carry no label


def test_prompt_generate_returns_input_plus_new_tokens(make_model, tokenizer):
    model = PromptModel(make_model("gpt2", "causal"), torch.randn(P, 32) * 0.1, 1, "causal").eval()
    enc = tokenizer(["the film was"], return_tensors="pt")
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (1, enc["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    first = logits(model, {"input_ids": enc["input_ids"]})[0, -1].argmax()
    assert out[0, enc["input_ids"].shape[1]] == first


def test_prompt_init_text_takes_the_texts_embeddings(make_model, tokenizer):
    base = make_model("bert")
    weight = base.get_input_embeddings().weight.detach().clone()
    text = "Classify the sentiment of this review"
    handle, _ = prepare(base, tokenizer, mode="prompt", init_text=text)
    ids = tokenizer(text)["input_ids"]  # [CLS] classify the sentiment of this review [SEP]
    ids = (ids * 3)[:P]
    assert torch.equal(handle.model.prompt.detach(), weight[ids])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prompt_default_init_is_cls_then_ordinary_words(make_model, tokenizer, family):
    base = make_model(family)
    weight = base.get_input_embeddings().weight.detach().clone()
    handle, _ = prepare(base, tokenizer, mode="prompt")
    rows = [int((weight - row).abs().sum(-1).argmin()) for row in handle.model.prompt.detach()]
    tokens = tokenizer.convert_ids_to_tokens(rows)
    assert tokens[0] == "[CLS]"  # what the tokenizer starts a text with (BERT pools position 0)
    assert not any(t.startswith("[") for t in tokens[1:]), tokens  # no [PAD], [SEP], [unused..]
    assert len(set(rows[1:])) > 1
    assert torch.equal(handle.model.prompt.detach(), weight[rows])


# -- our key/value prefix (BERT-like) -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_prefix_of_the_sequences_own_keys_values_changes_nothing(make_model, tokenizer, attn):
    """Prefix = the sequence's own keys/values duplicates every key: attention output is unchanged.
    Checks concatenation order, heads, layers and masks end to end."""
    base = make_model("bert", attn=attn)
    ids = tokenizer("a clever and moving story")["input_ids"]
    batch = {"input_ids": torch.tensor([ids])}
    expected = hidden(base, batch)
    kv = _kv.capture_kv(base, ids)
    assert kv.shape == (2, 2, 4, len(ids), 8)
    wrapped = _kv.KVPrefixModel(copy.deepcopy(base), _kv.PrefixKV(2, 4, 8, len(ids), init=kv)).eval()
    assert torch.allclose(hidden(wrapped, batch), expected, atol=1e-5)
    other = _kv.KVPrefixModel(copy.deepcopy(base), _kv.PrefixKV(2, 4, 8, len(ids), init=kv.flip(3) * 3)).eval()
    assert not torch.allclose(hidden(other, batch), expected, atol=1e-2)  # a different prefix does matter


def test_kv_prefix_init_text_takes_the_texts_keys_values(make_model, tokenizer):
    base = make_model("bert", "token")
    text = "Find the names"
    expected = _kv.capture_kv(copy.deepcopy(base), (tokenizer(text)["input_ids"] * 2)[:P])
    handle, _ = prepare(base, tokenizer, kind="token", init_text=text)
    assert torch.equal(handle.model.prefix.kv.detach(), expected)
    assert (
        handle.model.prefix.kv.requires_grad
        and not handle.model.base.bert.embeddings.word_embeddings.weight.requires_grad
    )


def test_kv_prefix_masks_padding_and_eager_sdpa_agree(make_model, batch):
    table = torch.randn(2, 2, 4, P, 8)
    outputs = {}
    for attn in ("eager", "sdpa"):
        model = _kv.KVPrefixModel(make_model("bert", "token", attn=attn), _kv.PrefixKV(2, 4, 8, P, init=table)).eval()
        changed = {k: v.clone() for k, v in batch.items()}
        real = int(batch["attention_mask"][2].sum())
        changed["input_ids"][2, real:] = 1999  # rewrite the padded positions of the last row
        first, second = hidden(model, batch), hidden(model, changed)
        assert torch.allclose(first[2, :real], second[2, :real], atol=1e-5)
        assert not torch.allclose(first[2, real:], second[2, real:], atol=1e-3)  # they did change
        outputs[attn] = first
    assert torch.allclose(outputs["eager"], outputs["sdpa"], atol=1e-5)


def test_kv_projection_folds_into_an_identical_table(make_model, batch):
    base = make_model("bert")
    torch.manual_seed(1)
    prefix = _kv.PrefixKV(2, 4, 8, P, projection=16)
    model = _kv.KVPrefixModel(base, prefix).eval()
    expected = logits(model, batch)
    table = model.tensors()["prefix_kv"]
    plain = _kv.KVPrefixModel(model.unwrap(), _kv.PrefixKV(2, 4, 8, P, init=table)).eval()
    assert torch.equal(logits(plain, batch), expected)


def test_kv_registration_is_idempotent_and_unwrap_restores_attention(make_model, batch):
    from transformers import AttentionInterface

    _kv.register_attention()
    first = AttentionInterface._global_mapping[_kv.ATTENTION_NAMES["sdpa"]]
    _kv.register_attention()
    assert AttentionInterface._global_mapping[_kv.ATTENTION_NAMES["sdpa"]] is first
    base = make_model("bert", attn="sdpa")
    expected = logits(base, batch)
    model = _kv.KVPrefixModel(base, _kv.PrefixKV(2, 4, 8, P, init=torch.randn(2, 2, 4, P, 8)))
    assert base.config._attn_implementation == "tunestack_prefix_sdpa"
    plain = model.unwrap()
    assert plain.config._attn_implementation == "sdpa"
    assert torch.equal(logits(plain, batch), expected)


def test_kv_gradient_checkpointing_gives_the_same_gradients(make_model, batch):
    grads = []
    for checkpointing in (False, True):
        base = make_model("bert")
        base.config.hidden_dropout_prob = base.config.attention_probs_dropout_prob = 0.0
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(3)
        model = _kv.KVPrefixModel(base, _kv.PrefixKV(2, 4, 8, P, projection=8))
        if checkpointing:
            base.gradient_checkpointing_enable()
        model.train()
        model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.prefix.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# -- peft prefix (decoders) -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_prefix_from_text_equals_reading_the_text_first(make_model, tokenizer, family):
    """A prefix initialised from a text's keys/values acts exactly as if the text preceded the input."""
    base = make_model(family, "causal")
    plain = copy.deepcopy(base)
    text = "the story was"
    handle, _ = prepare(base, tokenizer, kind="causal", init_text=text)
    ids = (tokenizer(text)["input_ids"] * 3)[:P]
    follow = tokenizer("a lovely film", add_special_tokens=False)["input_ids"]
    joined = logits(plain, {"input_ids": torch.tensor([ids + follow])})[:, P:]
    got = logits(
        handle.model.eval(),
        {"input_ids": torch.tensor([follow]), "attention_mask": torch.ones(1, len(follow), dtype=torch.long)},
    )
    assert torch.allclose(got, joined, atol=1e-4), (got - joined).abs().max()


def test_peft_prefix_classification_save_and_rebuild(make_model, batch, tmp_path):
    base = make_model("gpt2")
    model = _peft.wrap(base, "seq", P, projection=16, table=None, train_head=True)
    with torch.no_grad():
        for wrapper in _peft._head_wrappers(model.base_model):
            wrapper.modules_to_save["default"].weight.add_(0.5)  # a "trained" head
    model.eval()
    expected = logits(model, batch)
    _peft.save(model, tmp_path)
    plain = _peft.unwrap(model)
    assert not hasattr(plain, "peft_config") and "forward" not in plain.__dict__
    rebuilt = _peft.rebuild(plain, tmp_path, "seq").eval()
    assert torch.allclose(logits(rebuilt, batch), expected, atol=1e-6)  # the MLP folded into a table
    assert rebuilt.peft_config["default"].prefix_projection is False


# -- counts ----------------------------------------------------------------------------------------------

HEAD = {"bert": 32 * 2 + 2, "gpt2": 32 * 2, "llama": 32 * 2}  # classifier (bias on BERT) / score
KV_DIM = {"bert": 32, "gpt2": 32, "llama": 16}  # llama: 2 key/value heads of 8


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["prompt", "prefix"])
def test_trainable_parameter_counts_are_exact(make_model, tokenizer, family, mode):
    handle, reports = prepare(make_model(family), tokenizer, mode=mode)
    virtual = P * 32 if mode == "prompt" else P * 2 * 2 * KV_DIM[family]
    assert reports["prefix_params"] == virtual
    assert reports["trainable_params"] == virtual + HEAD[family]
    trainable = sum(p.numel() for p in handle.model.parameters() if p.requires_grad)
    assert trainable == virtual + HEAD[family]
    assert reports["trainable_fraction"] == pytest.approx(trainable / reports["total_params"])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_projection_counts_and_frozen_head(make_model, tokenizer, family):
    r, kv, layers = 16, KV_DIM[family], 2
    _, reports = prepare(make_model(family), tokenizer, projection=True, projection_hidden=r, train_head=False)
    expected = P * kv + (kv * r + r) + (r * layers * 2 * kv + layers * 2 * kv)
    assert reports["trainable_params"] == expected and reports["head_params"] == 0


def test_causal_lm_output_layer_never_trains(make_model, tokenizer):
    handle, reports = prepare(make_model("llama", "causal"), tokenizer, kind="causal", mode="prompt")
    assert reports["trainable_params"] == P * 32
    assert not handle.model.base.lm_head.weight.requires_grad
