"""The conformance check for a method plugin, in the spirit of scikit-learn's ``check_estimator``.

``check_method("lora", tmp_path)`` asserts, on tiny random-init models:

1. the method is registered and its options reject unknown keys, with a TOML path;
2. its contract is declared and every option has a description;
3. on every family and task it claims, a stack ``echo -> method -> echo`` validates, runs, saves,
   reloads with the same outputs, predicts and evaluates from the run folder, and the manifest
   records the method with its options;
4. its lifecycle hooks are called in stack order;
5. it composes with the representative methods given in ``before``/``after``.

Each failure raises AssertionError naming the check, family and task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.testing.data import write_tiny_data
from tunestack.testing.stacks import tiny_stack

ORDERED_HOOKS = ("tunestack_prepare", "tunestack_compress", "tunestack_transform_examples")


@dataclass
class ConformanceReport:
    method: str
    passed: list[str] = field(default_factory=list)

    def ok(self, check: str) -> None:
        self.passed.append(check)


def conformance_host() -> Any:
    """Installed plugins plus the ``echo`` probe (registered in-process if not installed)."""
    from tunestack.plugins import create_host
    from tunestack.testing import probe

    host = create_host()
    if "echo" not in host.methods:
        host = create_host(extra_plugins=[("echo", probe)])
    return host


class HookOrderRecorder:
    """Records, per lifecycle hook call, the stack slots of the method instances it reaches."""

    def __init__(self, host: Any) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self._undo = host.pm.add_hookcall_monitoring(self._before, lambda *args: None)
        self.host = host

    def _before(self, hook_name: str, impls: Any, kwargs: Any) -> None:
        if hook_name not in ORDERED_HOOKS:
            return
        slots = []
        for impl in reversed(impls):  # pluggy calls the last registered first
            slot = getattr(impl.plugin, "slot", None)
            if slot is not None:
                slots.append(slot.path)
        self.calls.append((hook_name, slots))

    def close(self) -> None:
        self._undo()


def check_method(
    method: str,
    tmp_path: Path,
    *,
    options: dict[str, Any] | None = None,
    families: tuple[str, ...] = ("bert", "gpt2", "llama"),
    tasks: tuple[str, ...] = ("sequence-classification",),
    before: list[dict[str, Any]] | None = None,
    after: list[dict[str, Any]] | None = None,
    epochs: int = 1,
    stack_overrides: dict[str, Any] | None = None,
) -> ConformanceReport:
    """Run the whole conformance check for ``method``; raise AssertionError on the first failure."""
    import tunestack
    from tunestack.errors import StackError
    from tunestack.methods import Contract
    from tunestack.runner import run
    from tunestack.validation import load_plan

    options = dict(options or {})
    report = ConformanceReport(method)
    host = conformance_host()
    data = write_tiny_data(tmp_path / "data")

    assert method in host.methods, f"[registered] method '{method}' is not installed; plugins: {host.methods}"
    spec = host.methods[method]
    report.ok("registered")

    bad = tiny_stack(data.folder, methods=[{"method": method, **options, "no_such_option_xyz": 1}])
    try:
        load_plan(bad, host)
    except StackError as error:
        text = str(error)
        assert "stack[0].no_such_option_xyz" in text and "unknown key" in text, f"[options] unclear error: {text}"
    else:
        raise AssertionError(f"[options] '{method}' accepted an unknown option key")
    report.ok("options reject unknown keys")

    parsed = spec.options.model_validate(options)
    contract = spec.contract_for(parsed)
    assert isinstance(contract, Contract) and contract.phases, f"[contract] '{method}' declares no phases"
    undocumented = [n for n, f in spec.options.model_fields.items() if not f.description]
    assert not undocumented, f"[options] options without a description: {undocumented}"
    report.ok("contract declared, options documented")

    for task in tasks:
        for family in families:
            label = f"{family}/{task}"
            entries = [
                {"method": "echo", "tag": "conformance-before"},
                *(before or []),
                {"method": method, **options},
                *(after or []),
                {"method": "echo", "tag": "conformance-after"},
            ]
            stack = tiny_stack(
                data.folder,
                task=task,
                family=family,
                methods=entries,
                epochs=epochs,
                **(stack_overrides or {}),
            )
            stack["name"] = f"conformance-{method}-{family}-{task}"
            plan = load_plan(stack, host)
            expected = [m.slot.path for m in plan.stages[0].methods]
            recorder = HookOrderRecorder(host)
            try:
                result = run(stack, out=tmp_path / "runs", host=host, force=True, base_dir=tmp_path)
            finally:
                recorder.close()
            assert result.status == "complete", f"[run {label}] status {result.status}"
            diff = result.stages[0]["reload_max_abs_diff"]
            assert diff is not None and diff <= 1e-4, f"[reload {label}] outputs changed by {diff} after save/reload"
            for hook_name, slots in recorder.calls:
                order = [s for s in expected if s in slots]
                assert slots == order, f"[order {label}] {hook_name} called {slots}, stack order is {order}"
            recorded = [m for m in result.stages[0]["methods"] if m["method"] == method]
            assert recorded and recorded[0]["options"] == parsed.model_dump(mode="json"), (
                f"[manifest {label}] method or options missing from the manifest"
            )
            loaded = tunestack.load(result.run_dir, host=host)
            sample = (
                ["the film was great", "the plot was dull"]
                if task != "token-classification"
                else ["Alice works in Paris"]
            )
            predictions = loaded.predict(sample)
            assert len(predictions) == len(sample), (
                f"[predict {label}] {len(predictions)} predictions for {len(sample)} inputs"
            )
            metrics = loaded.evaluate(latency=False)
            headline = {
                "sequence-classification": "accuracy",
                "token-classification": "entity_f1",
                "causal-lm": "loss",
            }[task]
            assert abs(metrics[headline] - result.metrics[headline]) < 1e-6, (
                f"[reload {label}] {headline} {metrics[headline]} after reload vs {result.metrics[headline]} in the run"
            )
            report.ok(f"runs, reloads and predicts on {label}")
    return report
