"""The training loop's mechanics: accumulation, warm-up, data order."""

from __future__ import annotations

import torch

import tunestack
from tunestack.engine import epoch_order

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_gradient_accumulation_equals_the_larger_batch(run_stack, make_stack, tmp_path):
    from tunestack.testing.stacks import tiny_model_config

    config = tiny_model_config("bert", **NO_DROPOUT)
    common = {"model": {"config": config}, "eval": {"latency": False}}
    big = run_stack(
        make_stack(methods=[], train={"batch_size": 8, "learning_rate": 1e-3}, **common), out=tmp_path / "a"
    )
    small = run_stack(
        make_stack(
            methods=[], train={"batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}, **common
        ),
        out=tmp_path / "b",
    )
    assert big.stages[0]["training"]["steps"] == small.stages[0]["training"]["steps"] == 6
    a, b = tunestack.load(big.run_dir).model, tunestack.load(small.run_dir).model
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_warmup_then_linear_decay(run_stack, make_stack):
    result = run_stack(make_stack(methods=[], epochs=2, train={"warmup_steps": 4, "learning_rate": 1e-2}))
    lrs = [h["lr"] for h in result.stages[0]["training"]["history"]]
    assert lrs[:4] == sorted(lrs[:4]) and abs(max(lrs) - 1e-2) < 1e-9  # rising to the peak
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 1e-3  # then decaying


def test_epoch_order_is_seeded_and_sharded():
    assert epoch_order(10, 0, 0, 0, 1) == epoch_order(10, 0, 0, 0, 1)
    assert epoch_order(10, 0, 0, 0, 1) != epoch_order(10, 0, 1, 0, 1)
    ranks = [epoch_order(10, 3, 0, r, 2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(epoch_order(10, 3, 0, 0, 1)) and len(ranks[0]) == len(ranks[1]) == 5
