"""Options, contract, planning and validation: all before torch or weights (no model is built here)."""

from __future__ import annotations

import sys

import pytest

from tunestack.api import Contract, Field, Method, MethodSpec, Options, hookimpl
from tunestack.errors import StackError
from tunestack.plugins import create_host
from tunestack.testing.stacks import tiny_model_config
from tunestack.validation import load_plan
from tunestack_prune import ADAPTERS_REASON, GLOBAL_REASON, PruneOptions, contract
from tunestack_prune.planning import Dims, Request, Target, layer_problems, plan, read_dims, steps


@pytest.fixture
def host():
    return create_host()


def problems(stack, host) -> str:
    with pytest.raises(StackError) as caught:
        load_plan(stack, host)
    return str(caught.value)


def prune(**options):
    return {"method": "prune", **options}


# -- options -------------------------------------------------------------------------------------


def test_every_option_has_a_description_and_sane_defaults(host):
    rows = {row["name"]: row for row in host.methods["prune"].describe_options()}
    assert all(row["description"] for row in rows.values())
    assert rows["importance"]["default"] == "magnitude" and rows["calibration_batches"]["default"] == 4
    assert rows["when"]["default"] == "auto" and rows["engine"]["default"] == "auto"
    assert rows["merge_adapters"]["default"] is False and rows["global_pruning"]["default"] is False
    assert {"ratio", "head_ratio", "ffn_ratio", "hidden_ratio", "iterative_steps", "round_to"} <= set(rows)
    assert {"skip_layers", "keep_layers", "gqa_mode"} <= set(rows)


def test_unknown_key_and_bad_values_are_reported_with_their_toml_path(host, make_stack):
    text = problems(make_stack(methods=[prune(ratio=0.5, amount=0.3)]), host)
    assert "stack[0].amount: unknown key" in text
    text = problems(
        make_stack(
            methods=[prune(ratio=1.0, head_ratio=-0.1, importance="l1", when="train", engine="fast", skip_layers=[-1])]
        ),
        host,
    )
    assert "stack[0].ratio: must be < 1" in text
    assert "stack[0].head_ratio: must be >= 0" in text
    for key in ("importance", "when", "engine", "skip_layers"):
        assert f"stack[0].{key}" in text, (key, text)
    assert "layer indices start at 0" in text


def test_contract_follows_when_and_merge_adapters():
    auto = contract(PruneOptions(ratio=0.5))
    assert auto.phases == {"prepare", "compress", "evaluate"}
    assert auto.requires == {"float-weights"} and auto.conflicts == {"adapters"}
    assert auto.produces == {"pruned", "structural"} and auto.removes == frozenset()
    assert "merge the adapters first (e.g. lora merge = true) or set merge_adapters = true" in auto.reasons["adapters"]
    assert contract(PruneOptions(ratio=0.5, when="prepare")).phases == {"prepare", "evaluate"}
    assert contract(PruneOptions(ratio=0.5, when="compress")).phases == {"compress", "evaluate"}
    merging = contract(PruneOptions(ratio=0.5, merge_adapters=True))
    assert merging.conflicts == frozenset() and merging.removes == {"adapters"}


# -- model-dependent validation ----------------------------------------------------------------------


def test_a_ratio_that_leaves_a_fraction_of_a_head_lists_the_allowed_values(host, make_stack):
    text = problems(make_stack(methods=[prune(head_ratio=0.4)]), host)
    assert "stack[0].head_ratio: 0.4 of 4 heads leaves 2.4, not a whole number" in text
    assert "allowed values: 0.25 (3 heads), 0.5 (2 heads), 0.75 (1 head)" in text
    text = problems(make_stack(family="gpt2", methods=[prune(head_ratio=0.1, ffn_ratio=0.5)]), host)
    assert "stack[0].head_ratio: 0.1 of 4 heads leaves 3.6" in text
    # the blanket ratio rounds to the nearest shape instead (4 * 0.6 = 2.4 -> 2 heads)
    load_plan(make_stack(methods=[prune(ratio=0.4)]), host)


def test_gqa_groups_and_queries(host, make_stack):
    # tiny Llama: 4 query heads sharing 2 KV heads (groups of 2)
    text = problems(make_stack(family="llama", methods=[prune(head_ratio=0.25)]), host)
    assert "stack[0].head_ratio: 0.25 of 2 KV groups leaves 1.5, not a whole number" in text
    assert "removes whole KV groups of 2 query heads" in text and "allowed values: 0.5 (2 heads, 1 KV head)" in text
    load_plan(make_stack(family="llama", methods=[prune(head_ratio=0.5)]), host)
    load_plan(make_stack(family="llama", methods=[prune(head_ratio=0.5, gqa_mode="queries")]), host)
    one_kv = tiny_model_config("llama", num_attention_heads=4, num_key_value_heads=1)
    text = problems(make_stack(family="llama", model={"config": one_kv}, methods=[prune(head_ratio=0.5)]), host)
    assert "one KV head has no whole KV group to remove; set gqa_mode = 'queries'" in text
    load_plan(
        make_stack(family="llama", model={"config": one_kv}, methods=[prune(head_ratio=0.5, gqa_mode="queries")]), host
    )


def test_bert_hidden_must_be_heads_times_head_dim(host, make_stack):
    text = problems(make_stack(methods=[prune(head_ratio=0.5, hidden_ratio=0.3)]), host)
    assert "stack[0].hidden_ratio: 0.3 leaves a hidden size of 22.4" in text
    assert "head_dim = hidden_size // num_heads" in text and "2 heads" in text
    assert "0.5 (hidden 16 = 2 × 8)" in text and "0.375 (hidden 20 = 2 × 10)" not in text
    # 4 heads x head_dim 6 = 24: fine (hidden_ratio 0.25 shrinks head_dim 8 -> 6)
    load_plan(make_stack(methods=[prune(hidden_ratio=0.25)]), host)
    text = problems(make_stack(family="gpt2", methods=[prune(hidden_ratio=0.1)]), host)
    assert "stack[0].hidden_ratio: 0.1 leaves a hidden size of 28.8" in text and "GPT2" in text


def test_untouched_layers_would_make_widths_non_uniform(host, make_stack):
    text = problems(make_stack(methods=[prune(ffn_ratio=0.5, skip_layers=[0])]), host)
    assert "stack[0].skip_layers: layers [0] would keep" in text and "one config" in text
    text = problems(make_stack(methods=[prune(ratio=0.5, keep_layers=[1])]), host)
    assert "stack[0].keep_layers: the hidden size (32 -> 16) is the residual stream" in text
    text = problems(make_stack(methods=[prune(ffn_ratio=0.5, skip_layers=[7])]), host)
    assert "stack[0].skip_layers: the model has 2 layers (0..1); there is no layer [7]" in text


def test_global_pruning_taylor_without_data_and_nothing_to_prune(host, make_stack):
    text = problems(make_stack(methods=[prune(ratio=0.5, global_pruning=True)]), host)
    assert "stack[0].global_pruning: " + GLOBAL_REASON[:60] in text
    stack = make_stack(methods=[prune(ratio=0.5, importance="taylor")], epochs=0)
    stack["data"] = {"eval": stack["data"]["eval"], "labels": ["negative", "positive"]}
    assert "stack[0].importance: taylor ranks units by loss gradients on training batches" in problems(stack, host)
    assert "nothing to prune" in problems(make_stack(methods=[prune()]), host)
    text = problems(make_stack(methods=[prune(ffn_ratio=0.001)]), host)
    assert "the options remove nothing from this model" in text


def test_engine_depgraph_is_refused_where_torch_pruning_fails(host, make_stack):
    text = problems(make_stack(family="gpt2", methods=[prune(ffn_ratio=0.5, engine="depgraph")]), host)
    assert "stack[0].engine: depgraph cannot prune this model" in text and "Conv1D" in text
    text = problems(make_stack(family="llama", methods=[prune(ratio=0.5, engine="depgraph")]), host)
    assert "grouped-query attention" in text
    for family, options in (("llama", {"ffn_ratio": 0.5}), ("bert", {"ratio": 0.5})):
        load_plan(make_stack(family=family, methods=[prune(engine="depgraph", **options)]), host)


def test_unsupported_model_type(host, make_stack):
    stack = make_stack(methods=[prune(ratio=0.5)], model={"config": {"model_type": "distilbert", "dim": 32}})
    assert "stack[0]: prune knows model types bert, gpt2, llama, not 'distilbert'" in problems(stack, host)


def test_packaged_minilm_ratio_0_4(host, make_stack):
    stack = make_stack(methods=[prune(ratio=0.4)])
    stack["model"] = {"source": "minilm", "task": "sequence-classification"}
    load_plan(stack, host)
    stack["stack"] = [prune(head_ratio=0.4)]
    assert "stack[0].head_ratio: 0.4 of 12 heads leaves 7.2" in problems(stack, host)


def test_shape_checks_wait_for_run_time_after_an_earlier_prune(host, make_stack):
    stages = [
        {"name": "a", "epochs": 0, "stack": [prune(ratio=0.5)]},
        {"name": "b", "epochs": 0, "stack": [prune(head_ratio=0.5)]},  # 2 heads -> 1: fine at run time
    ]
    load_plan(make_stack(stages=stages), host)


# -- adapters (core + prune only: an inline method plays the adapter) -----------------------------------


class FakeAdapterOptions(Options):
    merge: bool = Field(False, description="merge at the end of the stage")


class FakeAdapter(Method[FakeAdapterOptions]):
    @hookimpl
    def tunestack_prepare(self, model, ctx) -> None:
        pass


@hookimpl
def tunestack_register_methods(register) -> None:
    register(
        MethodSpec(
            name="fake-adapter",
            options=FakeAdapterOptions,
            factory=FakeAdapter,
            contract=lambda o: Contract(
                phases=frozenset({"prepare", "train"}), produces=frozenset() if o.merge else frozenset({"adapters"})
            ),
        )
    )


def test_prune_after_unmerged_adapters_is_refused_unless_it_merges(make_stack):
    host = create_host(extra_plugins=[("fake-adapter", sys.modules[__name__])])
    stages = [
        {"name": "tune", "stack": [{"method": "fake-adapter"}]},
        {"name": "cut", "stack": [prune(ratio=0.5)]},
    ]
    text = problems(make_stack(stages=stages), host)
    assert "stage[1].stack[0]: 'prune' cannot run on a model that is 'adapters'" in text
    assert ADAPTERS_REASON in text and "'fake-adapter' (stage[0].stack[0]) made it so" in text
    stages[1]["stack"] = [prune(ratio=0.5, merge_adapters=True)]
    plan_ = load_plan(make_stack(stages=stages), host)
    assert "adapters" not in plan_.stages[1].tags_after and "pruned" in plan_.stages[1].tags_after
    # same stage, adapter merged by its own method first: fine
    stages[0]["stack"] = [{"method": "fake-adapter", "merge": True}]
    stages[1]["stack"] = [prune(ratio=0.5)]
    load_plan(make_stack(stages=stages), host)


# -- planning arithmetic --------------------------------------------------------------------------------


MINILM = Dims("bert", 6, 384, 12, 12, 32, 1536)


def test_ratio_on_minilm_shrinks_hidden_with_the_heads():
    target, found = plan(MINILM, Request(ratio=0.4))
    assert not found
    assert target == Target(heads=7, kv_heads=7, head_dim=32, ffn=922, hidden=224)
    target, found = plan(MINILM, Request(ffn_ratio=0.4, round_to=64))
    assert not found and target.ffn == 896 and target.hidden == 384 and target.heads == 12
    # hidden via head_dim: 12 heads x 20 = 240
    target, found = plan(MINILM, Request(hidden_ratio=0.375))
    assert not found and (target.heads, target.head_dim, target.hidden) == (12, 20, 240)


def test_read_dims_of_every_family():
    assert read_dims(tiny_model_config("gpt2")) == Dims("gpt2", 2, 32, 4, 4, 8, 128)
    assert read_dims(tiny_model_config("llama")) == Dims("llama", 2, 32, 4, 2, 8, 64)
    assert read_dims(tiny_model_config("bert")) == Dims("bert", 2, 32, 4, 4, 8, 64)


def test_iterative_steps_shrink_linearly_and_keep_the_rules():
    dims = Dims("bert", 2, 64, 8, 8, 8, 256)
    target, _ = plan(dims, Request(head_ratio=0.5, ffn_ratio=0.5))
    path = steps(dims, target, 2)
    assert path[-1] == target and len(path) == 2
    assert (path[0].heads, path[0].hidden, path[0].ffn) == (6, 48, 192)
    assert all(s.hidden == s.heads * s.head_dim for s in path)
    llama = Dims("llama", 2, 64, 8, 4, 8, 128)
    target, _ = plan(llama, Request(head_ratio=0.5, ffn_ratio=0.5))
    path = steps(llama, target, 4)
    assert path[-1] == target and all(s.heads % s.kv_heads == 0 for s in path)
    assert [s.kv_heads for s in path] == [4, 3, 3, 2] and [s.ffn for s in path] == [112, 96, 80, 64]
    # a step that changes nothing is dropped: 2 KV groups -> 1 in 3 steps is 2, 1 (once), not 2, 2, 1
    small = Dims("llama", 2, 32, 4, 2, 8, 64)
    target, _ = plan(small, Request(head_ratio=0.5))
    assert [s.kv_heads for s in steps(small, target, 3)] == [1]


def test_layer_problems_allow_an_empty_list():
    dims = read_dims(tiny_model_config("bert"))
    target, _ = plan(dims, Request(ffn_ratio=0.5))
    assert layer_problems(dims, target, [], "skip_layers") == []
