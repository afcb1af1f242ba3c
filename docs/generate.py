"""Regenerates the reference pages that must never drift from the code.

python docs/generate.py          # rewrite docs/cli.md, docs/hooks.md, docs/stack-reference.md
python docs/generate.py --check  # exit 1 if any of them is stale (the test suite runs this)
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

DOCS = Path(__file__).parent


def cli_page() -> str:
    from click.testing import CliRunner

    from tunestack import cli as cli_module

    if not getattr(cli_module, "_commands_registered", False):
        cli_module._register_commands()
        cli_module._commands_registered = True
    group = cli_module.cli
    runner = CliRunner()
    parts = [
        "# Command line reference",
        "",
        "Generated from `--help` by `python docs/generate.py`; the test suite fails when it is stale.",
        "Exit codes: 0 success, 1 the run failed (NaN loss, a failed gate, a plugin error), 2 invalid input",
        "(stack file, data, model folder, existing run), 130 interrupted (a checkpoint is kept).",
        "Add `--debug` before the command to see tracebacks.",
        "",
        "## tunestack",
        "",
        "```text",
        runner.invoke(group, ["--help"], terminal_width=100).output.rstrip(),
        "```",
    ]
    for name in sorted(group.commands):
        result = runner.invoke(group, [name, "--help"], terminal_width=100)
        parts += ["", f"## tunestack {name}", "", "```text", result.output.rstrip(), "```"]
    return "\n".join(parts) + "\n"


def hooks_page() -> str:
    from tunestack import hookspecs

    parts = [
        "# Hook reference",
        "",
        "Generated from `tunestack/hookspecs.py` by `python docs/generate.py`. The module docstring",
        "below explains who implements which hooks; each section gives the signature, when the hook",
        "fires, its arguments, its return value and its call semantics.",
        "",
        inspect.cleandoc(hookspecs.__doc__ or ""),
    ]
    functions = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("tunestack_")]
    for function in sorted(functions, key=lambda f: f.__code__.co_firstlineno):
        name = function.__name__
        signature = f"{name}({', '.join(inspect.signature(function).parameters)})"
        opts = getattr(function, "tunestack_spec", {}) or {}
        flags = [k for k in ("firstresult", "historic") if opts.get(k)]
        parts += ["", f"## {signature}", ""]
        if flags:
            parts += [f"*{', '.join(flags)}*", ""]
        parts.append(inspect.cleandoc(function.__doc__ or ""))
    return "\n".join(parts) + "\n"


def _field_rows(model: Any) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if name in {"stack", "stage"} and model.__name__ == "StackFile":
            continue
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        default = "(required)" if info.is_required() else ("(table)" if isinstance(value, BaseModel) else repr(value))
        rows.append(f"| `{name}` | `{annotation}` | `{default}` | {info.description or ''} |")
    return rows


def stack_page() -> str:
    from tunestack import stack

    sections = [
        ("Top level", stack.StackFile, "Keys outside any table."),
        ("[model]", stack.ModelSettings, "Which model to start from and for which task."),
        (
            "[data]",
            stack.DataSettings,
            "Data files and how to read them. Relative paths resolve against the stack file's folder.",
        ),
        (
            "[train]",
            stack.TrainSettings,
            "Training defaults for every stage; a stage may override any of them.",
        ),
        ("[eval]", stack.EvalSettings, "Evaluation and the measurement protocol."),
        (
            "[[stage]]",
            stack.StageSettings,
            "One stage of a multi-stage file. Training keys override `[train]`.",
        ),
        (
            "gate",
            stack.GateSettings,
            'An evaluation gate on a stage: `gate = { metric = "accuracy", min_retention = 0.98 }`.',
        ),
    ]
    parts = [
        "# Stack file reference",
        "",
        "Generated from the schema by `python docs/generate.py`. Unknown keys are errors everywhere;",
        "every problem in a file is reported at once with its TOML path (`stage[1].stack[0].ratio`).",
        "",
        "A file has either top-level `[[stack]]` entries (one stage named `main`) or `[[stage]]` tables,",
        "each with its own `[[stage.stack]]` list. Each entry names a `method` plus that method's options",
        "(`tunestack methods NAME` lists them). Methods run in file order; each stage starts from the",
        "previous stage's saved artifact. `--set key.path=value` overrides any key from the command line",
        "(values are read as TOML: `--set train.epochs=2`, `--set stage[1].stack[0].ratio=0.3`).",
        "",
        "Model sources: `minilm` (the packaged all-MiniLM-L6-v2), a local Hugging Face folder, a previous",
        "tunestack run folder (its final model, transforms included), or a hub id (needs a network). A",
        "`[model.config]` table builds a random-init model instead, e.g.",
        '`config = { model_type = "bert", hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 4, '
        "intermediate_size = 64 }`.",
        "",
        "Data formats: TSV/CSV with a header row; JSONL objects; CoNLL column files (`token POS chunk TAG`,",
        "`-DOCSTART-` lines skipped, blank lines between sentences) for token classification; JSONL with",
        "`text` or `prompt`/`completion` for causal LM (loss on the completion only).",
    ]
    for title, model, intro in sections:
        parts += ["", f"## {title}", "", intro, "", *_field_rows(model)]
    return "\n".join(parts) + "\n"


SNIPPET = re.compile(r"(<!-- snippet: (\S+) -->\n```python\n)(.*?)(```)", re.S)


def refresh_snippets(text: str) -> str:
    """Re-copy every ``<!-- snippet: path -->`` block from its file: from the block's first line to
    its last, as they stand in the file now (so reformatting the source never leaves a stale copy)."""

    def replace(match: re.Match[str]) -> str:
        source = (DOCS.parent / match.group(2)).read_text(encoding="utf-8").splitlines()
        lines = match.group(3).rstrip("\n").splitlines()
        last = lines[-1]
        head = lines[: min(len(lines), 3)]  # the first lines place the snippet unambiguously
        starts = [i for i in range(len(source)) if source[i : i + len(head)] == head]
        if not starts:
            raise ValueError(f"{match.group(2)}: the snippet starting {head[0]!r} no longer exists; fix the doc")
        start = starts[0]
        end = start
        if len(lines) > 1:
            candidates = [i for i in range(start + 1, len(source)) if source[i] == last]
            if not candidates:
                raise ValueError(f"{match.group(2)}: the snippet ending {last!r} no longer exists; fix the doc")
            end = candidates[0]
        return match.group(1) + "\n".join(source[start : end + 1]) + "\n" + match.group(4)

    return SNIPPET.sub(replace, text)


def tutorial_page() -> str:
    return refresh_snippets((DOCS / "writing-plugins.md").read_text(encoding="utf-8"))


PAGES = {
    "cli.md": cli_page,
    "hooks.md": hooks_page,
    "stack-reference.md": stack_page,
    "writing-plugins.md": tutorial_page,
}


def main(argv: list[str]) -> int:
    stale = []
    for name, build in PAGES.items():
        text = build()
        path = DOCS / name
        if "--check" in argv:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale: " + ", ".join(stale) + " (run: python docs/generate.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
