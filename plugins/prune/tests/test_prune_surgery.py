"""The two engines on tiny random models, without a run: shapes, stock-class reload, equivalences."""

from __future__ import annotations

import copy

import pytest
import torch

from tunestack.models import auto_class, build_from_config
from tunestack.testing.stacks import tiny_model_config
from tunestack_prune.depgraph import prune_depgraph
from tunestack_prune.planning import Request, Target, plan
from tunestack_prune.runtime import check_consistent
from tunestack_prune.surgery import Scorer, accumulate_grads, dims_of, prune

TASKS = {
    "bert": ("sequence-classification", "token-classification"),
    "gpt2": ("sequence-classification", "token-classification", "causal-lm"),
    "llama": ("sequence-classification", "token-classification", "causal-lm"),
}
CASES = [(family, task) for family, tasks in TASKS.items() for task in tasks]


def build(family: str, task: str = "sequence-classification", **config):
    torch.manual_seed(0)
    kwargs = {"num_labels": 3, "pad_token_id": 0} if task != "causal-lm" else {}
    return build_from_config(tiny_model_config(family, **config), task, kwargs).eval()


def inputs(seed: int = 1, labels: str | None = None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels == "sequence":
        batch["labels"] = torch.tensor([0, 2])
    elif labels == "lm":
        batch["labels"] = ids.clone()
    return batch


def outputs(model, batch=None):
    with torch.no_grad():
        return model(**(batch or inputs())).logits


def target_for(model, **request) -> Target:
    target, problems = plan(dims_of(model), Request(**request))
    assert not problems, problems
    return target


def reload(model, task, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = auto_class(task).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return loaded.eval()


@pytest.mark.parametrize(("family", "task"), CASES)
def test_pruned_model_reloads_with_the_stock_class_and_identical_outputs(family, task, tmp_path):
    model = build(family, task)
    request = {"ratio": 0.5, "hidden_ratio": 0.25} if family == "llama" else {"ratio": 0.5}
    target = target_for(model, **request)
    prune(model, target)
    check_consistent(model, dims_of(model), target, "test")
    loaded = reload(model, task, tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(outputs(loaded), outputs(model))


def test_shapes_are_what_the_options_ask_for():
    bert = build("bert")
    prune(bert, target_for(bert, head_ratio=0.5, ffn_ratio=0.25))  # hidden follows the heads: 2 x 8
    assert (bert.config.num_attention_heads, bert.config.hidden_size, bert.config.intermediate_size) == (2, 16, 48)
    layer = bert.bert.encoder.layer[1]
    assert layer.attention.self.query.weight.shape == (16, 16) and layer.intermediate.dense.weight.shape == (48, 16)
    assert bert.bert.embeddings.word_embeddings.weight.shape[1] == 16 and bert.classifier.weight.shape == (3, 16)
    assert bert.bert.pooler.dense.weight.shape == (16, 16)

    bert = build("bert")
    prune(bert, target_for(bert, hidden_ratio=0.25))  # 4 heads of 6: head_dim shrinks
    sa = bert.bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.attention_head_size, bert.config.hidden_size) == (4, 6, 24)

    gpt2 = build("gpt2", "causal-lm")
    prune(gpt2, target_for(gpt2, ratio=0.5, round_to=16))
    cfg = gpt2.config
    assert (cfg.n_head, cfg.n_embd, cfg.n_inner) == (2, 16, 64)
    assert gpt2.transformer.h[0].attn.c_attn.weight.shape == (16, 48)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # still tied

    llama = build("llama", "causal-lm")
    prune(llama, target_for(llama, head_ratio=0.5, gqa_mode="queries", ffn_ratio=0.5))
    cfg = llama.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 2, 8, 32)
    attention = llama.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 32) and attention.k_proj.weight.shape == (16, 32)
    assert attention.num_key_value_groups == 1


def test_round_to_keeps_the_ffn_width_a_multiple():
    model = build("bert", intermediate_size=100)
    prune(model, target_for(model, ffn_ratio=0.3, round_to=16))
    assert model.config.intermediate_size == 64  # 70 rounded down to a multiple of 16


def test_untied_and_tied_heads_with_hidden_pruning(tmp_path):
    gpt2 = build("gpt2", "causal-lm", tie_word_embeddings=False)
    prune(gpt2, target_for(gpt2, head_ratio=0.5, hidden_ratio=0.75))  # 2 heads of 4
    assert gpt2.lm_head.weight is not gpt2.transformer.wte.weight and gpt2.lm_head.weight.shape == (30522, 8)
    assert torch.equal(outputs(reload(gpt2, "causal-lm", tmp_path / "g")), outputs(gpt2))
    llama = build("llama", "causal-lm", tie_word_embeddings=True)
    prune(llama, target_for(llama, hidden_ratio=0.5, head_ratio=0.5))
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert torch.equal(outputs(reload(llama, "causal-lm", tmp_path / "l")), outputs(llama))


# -- pruning whole units == zeroing them in the original model ------------------------------------


def _zeroed_ffn(original, kept):
    zeroed = copy.deepcopy(original)
    family = dims_of(original).family
    with torch.no_grad():
        if family == "bert":
            downs = [layer.output.dense.weight for layer in zeroed.bert.encoder.layer]
        elif family == "gpt2":
            downs = [block.mlp.c_proj.weight.t() for block in zeroed.transformer.h]  # Conv1D: [in, out]
        else:
            downs = [layer.mlp.down_proj.weight for layer in zeroed.model.layers]
        for weight, keep in zip(downs, kept["ffn"]):
            drop = [i for i in range(weight.shape[1]) if i not in set(keep)]
            weight[:, drop] = 0
    return zeroed


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_removing_ffn_neurons_equals_zeroing_them(family):
    original = build(family)
    pruned = copy.deepcopy(original)
    kept = prune(pruned, target_for(pruned, ffn_ratio=0.5))
    assert all(len(k) == dims_of(pruned).ffn for k in kept["ffn"])
    zeroed = _zeroed_ffn(original, kept)
    assert torch.allclose(outputs(zeroed), outputs(pruned), atol=1e-7, rtol=0)
    assert not torch.allclose(outputs(original), outputs(pruned), atol=1e-6, rtol=0)  # the units did matter


@pytest.mark.parametrize(
    ("family", "request_"),
    [
        ("llama", {"head_ratio": 0.5}),  # a whole KV group
        ("llama", {"head_ratio": 0.5, "gqa_mode": "queries"}),  # one query head per group
        ("bert", None),  # heads only, hidden kept: not reloadable, but the same function in memory
        ("gpt2", None),
    ],
)
def test_removing_whole_heads_equals_zeroing_them(family, request_):
    original = build(family)
    dims = dims_of(original)
    if request_ is None:
        target = Target(heads=2, kv_heads=2, head_dim=dims.head_dim, ffn=dims.ffn, hidden=dims.hidden)
    else:
        target = target_for(original, **request_)
    pruned = copy.deepcopy(original)
    kept = prune(pruned, target)
    zeroed = copy.deepcopy(original)
    d = dims.head_dim
    with torch.no_grad():
        for index, heads in enumerate(kept["heads"]):
            if family == "bert":
                weight = zeroed.bert.encoder.layer[index].attention.output.dense.weight
            elif family == "gpt2":
                weight = zeroed.transformer.h[index].attn.c_proj.weight.t()  # [out, in] view
            else:
                weight = zeroed.model.layers[index].self_attn.o_proj.weight
            for h in set(range(dims.heads)) - set(heads):
                weight[:, h * d : (h + 1) * d] = 0
    assert torch.allclose(outputs(zeroed), outputs(pruned), atol=1e-7, rtol=0)
    assert not torch.allclose(outputs(original), outputs(pruned), atol=1e-6, rtol=0)  # the units did matter


# -- engines and importance ----------------------------------------------------------------------------


def test_both_engines_keep_the_same_ffn_neurons_by_magnitude():
    native = build("bert")
    depgraph = copy.deepcopy(native)
    target = target_for(native, ffn_ratio=0.5)
    kept = prune(native, target)
    prune_depgraph(depgraph, target, "magnitude")
    for index, layer in enumerate(depgraph.bert.encoder.layer):
        up = native.bert.encoder.layer[index].intermediate.dense.weight
        assert torch.equal(layer.intermediate.dense.weight, up)
        original_rows = build("bert").bert.encoder.layer[index].intermediate.dense.weight[kept["ffn"][index]]
        assert torch.equal(up, original_rows)
    assert native.config.intermediate_size == depgraph.config.intermediate_size == 32


@pytest.mark.parametrize(("family", "request_"), [("bert", {"ratio": 0.5}), ("llama", {"ratio": 0.5})])
def test_both_engines_give_the_same_model_for_heads_too(family, request_, tmp_path):
    config = {"num_key_value_heads": 4} if family == "llama" else {}  # DependencyGraph hangs on GQA
    native = build(family, **config)
    depgraph = copy.deepcopy(native)
    target = target_for(native, **request_)
    prune(native, target)
    prune_depgraph(depgraph, target, "magnitude")
    a, b = native.state_dict(), depgraph.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(outputs(reload(depgraph, "sequence-classification", tmp_path)), outputs(native))


def test_taylor_ranks_ffn_neurons_by_weight_times_gradient():
    model = build("bert")
    batches = [inputs(seed, labels="sequence") for seed in (3, 4)]
    reference = copy.deepcopy(model)
    assert accumulate_grads(reference, batches) == 2
    layer = reference.bert.encoder.layer[0]
    up, down = layer.intermediate.dense.weight, layer.output.dense.weight
    scores = (up * up.grad).abs().sum(1) + (down * down.grad).abs().sum(0)
    expected = torch.sort(torch.topk(scores, 32).indices).values.tolist()
    accumulate_grads(model, batches)
    kept = prune(model, target_for(model, ffn_ratio=0.5), "taylor")
    assert kept["ffn"][0] == expected
    magnitude = prune(build("bert"), Target(heads=4, kv_heads=4, head_dim=8, ffn=32, hidden=32))
    assert magnitude["ffn"][0] != expected  # a different criterion, a different choice here
    with pytest.raises(RuntimeError, match="taylor importance needs gradients"):
        Scorer("taylor")([(build("bert").classifier.weight, lambda t: t)])


def test_taylor_with_depgraph_and_frozen_weights(tmp_path):
    model = build("bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    native = copy.deepcopy(model)
    batches = [inputs(3, labels="sequence")]
    target = target_for(model, ratio=0.5)  # heads, FFN and (with the heads) the hidden size
    prune_depgraph(model, target, "taylor", lambda: accumulate_grads(model, batches))
    accumulate_grads(native, batches)
    prune(native, target, "taylor")
    assert torch.equal(outputs(model), outputs(native))
    for pruned in (model, native):
        assert not any(p.requires_grad for p in pruned.bert.embeddings.parameters())  # still frozen, though cut
        assert all(p.requires_grad for p in pruned.bert.encoder.parameters())
        assert all(p.grad is None for p in pruned.parameters())


def test_iterative_steps_end_at_the_target():
    from tunestack_prune.planning import steps

    model = build("llama", "causal-lm")
    target = target_for(model, ffn_ratio=0.5, hidden_ratio=0.5)
    path = steps(dims_of(model), target, 3)
    assert len(path) == 3
    for step in path:
        prune(model, step)
        assert dims_of(model).ffn == step.ffn
    check_consistent(model, dims_of(model), target, "test")


@pytest.mark.parametrize(("family", "ffn"), [("gpt2", 128), ("bert", 64), ("llama", 64)])
def test_macs_drop_by_the_analytic_ffn_cost(family, ffn):
    from tunestack_prune.measure import count_macs

    tokens, hidden, layers = 8, 32, 2
    model = build(family)
    before = count_macs(model, tokens)
    prune(model, target_for(model, ffn_ratio=0.5))
    after = count_macs(model, tokens)
    removed = ffn // 2
    matrices = 3 if family == "llama" else 2  # gate, up and down projections
    biases = 0 if family == "llama" else removed  # the up projection's bias (GPT-2's Conv1D included)
    assert before["macs"] - after["macs"] == layers * (matrices * tokens * hidden * removed + biases)
    assert before["macs_attention"] == after["macs_attention"] == 2 * layers * 4 * 8 * tokens * tokens
