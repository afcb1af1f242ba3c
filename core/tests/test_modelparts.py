from __future__ import annotations

import pytest

from tunestack.api import embedding_parameter_names, head_parameter_names, layer_of, transformer_layers
from tunestack.models import build_from_config
from tunestack.testing.stacks import tiny_model_config

EXPECTED = {
    ("bert", "sequence-classification"): ("bert.encoder.layer", {"classifier.weight", "classifier.bias"}),
    ("gpt2", "sequence-classification"): ("transformer.h", {"score.weight"}),
    ("llama", "token-classification"): ("model.layers", {"score.weight", "score.bias"}),
    ("gpt2", "causal-lm"): ("transformer.h", set()),  # lm_head is tied to the embeddings
}


@pytest.mark.parametrize(("family", "task"), list(EXPECTED))
def test_layers_and_heads_across_families(family, task):
    kwargs = {} if task == "causal-lm" else {"num_labels": 2}
    model = build_from_config(tiny_model_config(family), task, kwargs)
    layers_name, head = EXPECTED[(family, task)]
    layers = transformer_layers(model)
    assert layers.name == layers_name and len(layers) == 2
    assert head_parameter_names(model) == head
    embeddings = embedding_parameter_names(model)
    assert embeddings and not any(layer_of(n, layers) is not None for n in embeddings)
    assert layer_of(f"{layers_name}.1.mlp.weight", layers) == 1


def test_head_is_found_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = build_from_config(tiny_model_config("bert"), "sequence-classification", {"num_labels": 2})
    wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2))
    names = head_parameter_names(wrapped)
    assert names == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
