"""Bad input and faults: a clear error naming the file, key or line; nothing half-written."""

from __future__ import annotations

import errno
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunestack.errors import DataError, ModelError, PluginError, RunFailed, StackError, UserError
from tunestack.validation import load_plan

# ---------------------------------------------------------------------------------------------- data


def test_non_utf8_file_names_file_and_line(run_stack, make_stack, tmp_path):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("text\tlabel\nfine\tpositive\ncaf\xe9 noir\tnegative\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{bad}:3: not UTF-8 text"):
        run_stack(make_stack(data={"train": str(bad)}))


def test_empty_file(run_stack, make_stack, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: the file is empty"):
        run_stack(make_stack(data={"train": str(empty)}))
    header_only = tmp_path / "header.tsv"
    header_only.write_text("text\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{header_only}: no examples"):
        run_stack(make_stack(data={"train": str(header_only)}))


def test_missing_label_and_missing_field(run_stack, make_stack, tmp_path):
    missing = tmp_path / "missing.tsv"
    missing.write_text("text\tlabel\ngood film\tpositive\nno label here\t\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{missing}:3: the label is missing"):
        run_stack(make_stack(data={"train": str(missing)}))
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("review\tlabel\ngood film\tpositive\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: label, review\); set the field name in \[data\]"):
        run_stack(make_stack(data={"train": str(wrong)}))


def test_conll_with_a_broken_column(run_stack, make_stack, tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("Alice NN O B-PER\nworks\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: a CoNLL line needs a token and a tag"):
        run_stack(make_stack(task="token-classification", data={"train": str(bad)}))


def test_invalid_jsonl_line(run_stack, make_stack, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: invalid JSON"):
        run_stack(make_stack(task="causal-lm", data={"train": str(bad)}))


def test_truncation_is_reported_not_silent(run_stack, make_stack, tmp_path):
    long = tmp_path / "long.tsv"
    rows = ["text\tlabel"] + [f"{'very ' * 40}good film\tpositive", "bad film\tnegative"] * 4
    long.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = run_stack(make_stack(data={"train": str(long), "eval": str(long), "max_length": 16}))
    assert result.stages[0]["training"]["truncated_examples"] == 4
    assert result.metrics["truncated_examples"] == 4
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "truncated" and e["examples"] == 4 for e in events)


# --------------------------------------------------------------------------------------------- models


def _tiny_model_folder(tmp_path, with_tokenizer: bool):
    from tunestack.models import build_from_config, load_tokenizer
    from tunestack.sources import packaged_model_dir
    from tunestack.testing.stacks import tiny_model_config

    folder = tmp_path / "model"
    build_from_config(tiny_model_config("bert"), "base").save_pretrained(folder)
    if with_tokenizer:
        load_tokenizer(packaged_model_dir()).save_pretrained(folder)
    return folder


def test_model_folder_without_tokenizer(run_stack, make_stack, tmp_path):
    folder = _tiny_model_folder(tmp_path, with_tokenizer=False)
    with pytest.raises(ModelError, match=rf"no usable tokenizer in {folder}"):
        run_stack(make_stack(model={"source": str(folder), "config": None}))


def test_pickled_weights_are_never_loaded(run_stack, make_stack, tmp_path):
    folder = _tiny_model_folder(tmp_path, with_tokenizer=True)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"holds no safetensors weights \(found pytorch_model.bin: pickled weights"):
        run_stack(make_stack(model={"source": str(folder), "config": None}))


def test_a_task_the_model_cannot_do(run_stack, make_stack):
    config = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    with pytest.raises(ModelError, match="a 'vit' model cannot do sequence-classification"):
        run_stack(make_stack(model={"config": config}))


def test_remote_code_in_a_model_folder_is_not_executed(run_stack, make_stack, tmp_path):
    folder = _tiny_model_folder(tmp_path, with_tokenizer=True)
    marker = tmp_path / "EXECUTED"
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertForSequenceClassification as EvilModel\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.EvilModel"}
    config["model_type"] = "evil-bert"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError):
        run_stack(make_stack(model={"source": str(folder), "config": None}))
    assert not marker.exists()


def test_a_crafted_run_folder_cannot_run_code_or_unpickle(tmp_path):
    import tunestack

    run = tmp_path / "crafted"
    (run / "model").mkdir(parents=True)
    (run / "manifest.json").write_text("{}", encoding="utf-8")
    meta = {
        "format": 1,
        "task": "sequence-classification",
        "auto_class": "sequence-classification",
        "labels": ["a"],
        "transforms": [
            {"method": "os.system", "options": {}, "slot": {"path": "x", "stage": "s", "stage_index": 0, "index": 0}}
        ],
    }
    (run / "model" / "tunestack.json").write_text(json.dumps(meta), encoding="utf-8")
    (run / "model" / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    (run / "model" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="holds no safetensors weights"):
        tunestack.load(run)


# ------------------------------------------------------------------------------------------- run folder


def test_crash_while_writing_the_model_leaves_no_complete_folder(run_stack, make_stack, tmp_path):
    with pytest.raises(PluginError, match="could not save"):
        run_stack(make_stack(methods=[{"method": "echo", "transform": True, "fail_in": "save"}]))
    assert not (tmp_path / "runs" / "tiny").exists()
    assert (tmp_path / "runs" / "tiny.partial" / "INCOMPLETE").is_file()


def test_full_disk_is_a_clear_error(run_stack, make_stack, tmp_path, monkeypatch):
    import tunestack.artifacts

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tunestack.artifacts, "save_model", full)
    with pytest.raises(RunFailed, match="the disk is full while writing"):
        run_stack(make_stack(methods=[]))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_nan_keeps_the_last_good_checkpoint(run_stack, make_stack, tmp_path):
    stack = make_stack(methods=[{"method": "echo", "nan_after_step": 3}], epochs=2, train={"checkpoint_every": 2})
    with pytest.raises(RunFailed, match=r"the loss became nan at step 3 .*the last good checkpoint is kept in"):
        run_stack(stack)
    progress = tmp_path / "runs" / "tiny.partial" / "stages" / "00-main" / "checkpoint" / "progress.json"
    assert json.loads(progress.read_text())["step"] == 2


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_run_names_cannot_leave_the_output_folder(plugin_host, make_stack, name):
    with pytest.raises((StackError, UserError)):
        load_plan(make_stack(name=name), plugin_host)


# ------------------------------------------------------------------------------------------- property

KEYS = [
    "name",
    "seed",
    "requires",
    "model",
    "data",
    "train",
    "eval",
    "stack",
    "stage",
    "method",
    "epochs",
    "source",
    "task",
    "config",
    "train",
    "max_length",
    "tag",
    "produces",
    "gate",
    "metric",
    "min_retention",
    "r",
    "x",
]
SCALARS = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_any_document_validates_or_fails_cleanly(plugin_host, tmp_path, document):
    try:
        plan = load_plan(document, plugin_host, base_dir=tmp_path)
    except StackError as error:
        assert error.problems and all(str(p) for p in error.problems)
    else:
        assert plan.stages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_text_parses_or_fails_cleanly(plugin_host, tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    try:
        plan = load_plan(path, plugin_host)
    except StackError as error:
        assert error.problems and all(str(p) for p in error.problems)
    else:
        assert plan.stages  # a valid document always has at least one stage
