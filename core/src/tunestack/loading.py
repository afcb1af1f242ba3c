"""``tunestack.load``: a finished run's final model, ready to predict or evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.context import EvalContext, ModelHandle
from tunestack.data import Example
from tunestack.errors import ModelError
from tunestack.plugins import PluginHost, default_host
from tunestack.sources import is_run_dir, read_run_manifest


@dataclass
class LoadedModel:
    """The reloaded final model of a run, with its tokenizer and a ``predict`` callable."""

    handle: ModelHandle
    run_dir: Path
    manifest: dict[str, Any]
    host: PluginHost
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.handle.model

    @property
    def tokenizer(self) -> Any:
        return self.handle.tokenizer

    @property
    def labels(self) -> list[str]:
        return self.handle.labels

    @property
    def max_length(self) -> int:
        return int(self.resolved.get("data", {}).get("max_length", 128))

    def transform(self, examples: list[Example], split: str) -> list[Example]:
        """Format inputs exactly as during the run (templates and other recorded transforms)."""
        from tunestack.artifacts import instantiate

        items = [e.with_() for e in examples]
        for record in self.handle.transforms:
            self.host.scoped_hook(instantiate(record, self.host)).tunestack_transform_examples(
                examples=items, split=split, ctx=None, record=record
            )
        return items

    def predict(self, texts: Sequence[str] | str) -> list[dict[str, Any]]:
        """Predictions for raw texts (for token classification, whitespace-separated words)."""
        if isinstance(texts, str):
            texts = [texts]
        task = self.handle.task
        examples = self.transform([task.example_from_text(t) for t in texts], "predict")
        results = list(task.predict(self.model, examples, self.tokenizer, self.labels, self.max_length))
        for result, text in zip(results, texts):
            if "text" in result:  # the user's input, not the templated one
                result["text"] = text
        return results

    def evaluate(self, data: str | Path | None = None, latency: bool | None = None) -> dict[str, Any]:
        """Metrics of the final model on ``data`` (default: the run's evaluation file)."""
        import torch

        from tunestack.runner import evaluate_handle
        from tunestack.stack import DataSettings, EvalSettings

        settings = DataSettings.model_validate(
            {k: v for k, v in self.resolved.get("data", {}).items() if k in DataSettings.model_fields}
        )
        eval_settings = EvalSettings.model_validate(self.resolved.get("eval", {}))
        if latency is not None:
            eval_settings = eval_settings.model_copy(update={"latency": latency})
        path = Path(data) if data is not None else (Path(settings.eval) if settings.eval else None)
        if path is None:
            raise ModelError("this run has no evaluation file; pass one with --data")
        task = self.handle.task
        examples = self.transform(task.read(path, settings), "eval")
        if task.has_labels:
            task.check_labels(examples, self.labels, "eval")

        def batches(ex: list[Example], size: int) -> Any:
            features = task.encode(ex, self.tokenizer, self.labels, settings.max_length).features
            return task.batches(features, self.tokenizer, size)

        ctx = EvalContext(
            task=task,
            examples=examples,
            make_batches=batches,
            settings=eval_settings,
            model_dir=self.run_dir / "model",
            max_length=settings.max_length,
            device=torch.device("cpu"),
        )
        from tunestack.artifacts import instantiate

        instances = [instantiate(record, self.host) for record in self.handle.transforms]
        with self.host.activated(instances):  # methods that shaped the model report too
            return evaluate_handle(self.host, self.handle, ctx, instances)


def load(run_dir: str | Path, host: PluginHost | None = None) -> LoadedModel:
    """Reload a run's final model exactly (fp32 outputs within 1e-5 of the end of the run)."""
    from tunestack.artifacts import load_model
    from tunestack.quiet import silence_import_noise

    silence_import_noise()
    folder = Path(run_dir)
    if not folder.exists():
        raise ModelError(f"run folder not found: {folder}")
    if not is_run_dir(folder):
        partial = folder.with_name(folder.name + ".partial")
        hint = f"; an unfinished run is in {partial} (finish it with --resume)" if partial.exists() else ""
        raise ModelError(f"{folder} is not a finished tunestack run (no manifest.json and model/){hint}")
    manifest = read_run_manifest(folder)
    host = host or default_host()
    handle = load_model(folder / "model", host)
    resolved: dict[str, Any] = {}
    resolved_file = folder / "stack.resolved.toml"
    if resolved_file.exists():
        from tunestack.stack import parse_toml

        resolved = parse_toml(resolved_file.read_text(encoding="utf-8"), str(resolved_file))
    return LoadedModel(handle=handle, run_dir=folder, manifest=manifest, host=host, resolved=resolved)
