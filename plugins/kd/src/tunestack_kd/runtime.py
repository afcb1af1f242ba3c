"""What ``kd`` does while a stage runs: load the teacher, build the student, add the loss terms.

Imported lazily by the hooks (it imports torch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tunestack.api import ModelHandle, RunFailed, StageContext, StepContext, StepOutput, UserError
from tunestack_kd import losses
from tunestack_kd.sources import (
    TeacherNotFound,
    TeacherRef,
    folder_labels,
    read_json,
    resolve_teacher,
    vocab_mismatch,
)
from tunestack_kd.student import (
    LayerCapture,
    count_params,
    disable_attention_dropout,
    hf_model,
    keep_layers,
    model_heads,
    model_width,
    restore_attributes,
    set_attention,
)

if TYPE_CHECKING:
    from tunestack_kd import KD

AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


def stage_model_dir(ctx: StageContext, name: str) -> Any:
    """The saved model of an earlier stage of this run (``stages/NN-name/model``)."""
    stages = ctx.stack.stage or []
    for index, stage in enumerate(stages):
        if stage is not None and stage.name == name:
            if index >= ctx.stage.index:
                raise UserError(f"teacher 'stage:{name}' is not an earlier stage than '{ctx.stage.name}'")
            return ctx.run_dir / "stages" / f"{index:02d}-{name}" / "model"
    raise UserError(f"teacher 'stage:{name}': there is no stage named '{name}'")


def load_model_folder(folder: Any, handle: ModelHandle, where: str) -> tuple[Any, list[str] | None, Any]:
    """A Hugging Face model folder (a tunestack stage folder without transforms is one)."""
    import transformers
    from transformers.utils import logging as hf_logging

    meta = read_json(folder / "tunestack.json")
    if meta is not None and meta.get("transforms"):
        methods = ", ".join(sorted({str(r.get("method")) for r in meta["transforms"]}))
        raise UserError(
            f"{where}: the teacher in {folder} carries transforms ({methods}) that only tunestack can "
            "rebuild; give the finished run folder as the teacher, or merge them first"
        )
    auto = str((meta or {}).get("auto_class", handle.auto_class))
    cls = getattr(transformers, AUTO_CLASSES.get(auto, AUTO_CLASSES[handle.auto_class]))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=handle.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{where}: cannot load the teacher from {folder}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    labels = folder_labels(folder) if handle.task.has_labels else None
    return model, labels, tokenizer


def load_teacher(ref: TeacherRef, handle: ModelHandle, ctx: StageContext, where: str) -> tuple[Any, Any, Any]:
    """(model, labels or None, tokenizer or None) of an external teacher, on CPU."""
    if ref.kind == "run":
        import tunestack

        loaded = tunestack.load(ref.path)
        return loaded.model, list(loaded.labels) if handle.task.has_labels else None, loaded.tokenizer
    folder = ref.path if ref.kind == "folder" and ref.path is not None else stage_model_dir(ctx, str(ref.stage))
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: {folder} holds no saved model")
    return load_model_folder(folder, handle, where)


def label_permutation(teacher: Sequence[str], student: Sequence[str], where: str) -> list[int] | None:
    """Index of each student label in the teacher's output, or None when the order is the same."""
    if list(teacher) == list(student):
        return None
    if sorted(teacher) != sorted(student):
        raise UserError(
            f"{where}: the teacher predicts labels {list(teacher)} but this stack's labels are "
            f"{list(student)}; distillation needs the same label space (set data.labels, or choose a "
            "teacher trained on the same labels)"
        )
    return [list(teacher).index(label) for label in student]


# ---------------------------------------------------------------------------------------------
# Caching the teacher's logits
# ---------------------------------------------------------------------------------------------


class LogitCache:
    """Teacher logits per example, keyed by its (unpadded) input ids, kept on the CPU."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = False

    @staticmethod
    def keys(inputs: Mapping[str, torch.Tensor]) -> list[bytes]:
        ids = inputs["input_ids"].detach().cpu()
        mask = inputs.get("attention_mask")
        mask = mask.detach().cpu().bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        types = inputs.get("token_type_ids")
        types = types.detach().cpu() if types is not None else None
        found = []
        for row in range(ids.size(0)):
            key = ids[row][mask[row]].numpy().tobytes()
            if types is not None:
                key += b"|" + types[row][mask[row]].numpy().tobytes()
            found.append(key)
        return found

    def lookup(self, keys: list[bytes], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not all(k in self.entries for k in keys):
            self.misses += sum(k not in self.entries for k in keys)
            return None
        self.hits += len(keys)
        rows = [self.entries[k] for k in keys]
        device = inputs["input_ids"].device
        if rows[0].dim() == 1:  # one row per example
            return torch.stack(rows).to(device)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        out = torch.zeros((*ids.shape, rows[0].size(-1)), dtype=rows[0].dtype, device=device)
        for index, row in enumerate(rows):
            positions = mask[index].bool() if mask is not None else slice(None)
            out[index][positions] = row.to(device)
        return out

    def store(self, keys: list[bytes], logits: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> None:
        mask = inputs.get("attention_mask")
        for index, key in enumerate(keys):
            if key in self.entries:
                continue
            row = logits[index]
            if row.dim() == 2 and mask is not None:
                row = row[mask[index].bool()]
            row = row.detach().to("cpu", copy=True)
            size = row.numel() * row.element_size()
            if self.bytes + size > self.max_bytes:
                self.full = True
                continue
            self.entries[key] = row
            self.bytes += size


# ---------------------------------------------------------------------------------------------
# The distiller: state of one kd entry for one stage
# ---------------------------------------------------------------------------------------------


class Distiller:
    """Built by ``tunestack_prepare``; wraps each training step; released by ``tunestack_compress``."""

    def __init__(self, method: KD) -> None:
        self.method = method
        self.options = method.options
        self.where = method.slot.path
        self.teacher: Any = None
        self.student: Any = None
        self.causal = False
        self.permutation: torch.Tensor | None = None
        self.pairs: list[tuple[int, int]] = []
        self.projection: torch.nn.Module | None = None
        self.teacher_capture: LayerCapture | None = None
        self.student_capture: LayerCapture | None = None
        self.student_depth = 0
        self.previous_attention: str | None = None
        self.dropout_changes: list[tuple[Any, str, Any]] = []
        self.cache: LogitCache | None = None
        self.teacher_batches = 0

    @property
    def uses_teacher(self) -> bool:
        o = self.options
        return o.alpha < 1.0 or o.hidden_weight > 0 or o.attention_weight > 0

    # -- prepare ---------------------------------------------------------------------------------

    def prepare(self, handle: ModelHandle, ctx: StageContext) -> None:
        o = self.options
        try:
            ref = resolve_teacher(o.teacher, ctx.base_dir)
        except TeacherNotFound as error:
            raise UserError(f"{self.where}.teacher: {error}") from None
        self.causal = handle.auto_class == "causal-lm"
        report = lambda key, value: ctx.report(self.method, key, value)  # noqa: E731
        report("teacher", o.teacher)
        report("teacher_source", ref.describe())

        teacher: Any = None
        teacher_labels: list[str] | None = None
        if ref.kind == "input":
            snapshot = self.method.input_snapshot  # taken before any method of the stage prepared
            self.method.input_snapshot = None
            report("teacher_params", count_params(snapshot if snapshot is not None else handle.model))
            if self.uses_teacher:
                teacher = snapshot if snapshot is not None else copy.deepcopy(handle.model)
        elif self.uses_teacher or (o.student is not None and o.student.from_teacher):
            teacher, teacher_labels, tokenizer = load_teacher(ref, handle, ctx, f"{self.where}.teacher")
            report("teacher_params", count_params(teacher))
            if tokenizer is not None:
                problem = vocab_mismatch(tokenizer.get_vocab(), handle.tokenizer.get_vocab())
                if problem:
                    raise UserError(
                        f"{self.where}.teacher: the teacher's tokenizer differs from the stack's ({problem}); "
                        "distillation compares outputs position by position and needs the same tokenizer"
                    )
            if handle.task.has_labels and teacher_labels:
                order = label_permutation(teacher_labels, handle.labels, f"{self.where}.teacher")
                if order is not None:
                    if o.student is not None and o.student.from_teacher:
                        raise UserError(
                            f"{self.where}.student: the teacher orders its labels {teacher_labels}, the "
                            f"stack {handle.labels}; a student copied from the teacher needs the same "
                            "order: set data.labels to the teacher's order"
                        )
                    self.permutation = torch.tensor(order, device=ctx.device)
            config = getattr(hf_model(teacher), "config", None)
            if config is not None and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = handle.tokenizer.pad_token_id

        self._build_student(handle, ctx, ref, teacher)
        self.student = hf_model(handle.model)
        report("student_params", count_params(handle.model))
        teacher_params = ctx.reports.get(self.method.slot.key, {}).get("teacher_params")
        if teacher_params:
            report("student_fraction", round(count_params(handle.model) / teacher_params, 4))
        report("teacher_used", self.uses_teacher)
        if not self.uses_teacher:
            return

        teacher.to(ctx.device)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self._intermediate(handle, ctx, report)
        if o.cache_teacher:
            self.cache = LogitCache(int(o.cache_max_mb * 1024 * 1024))

    def _build_student(self, handle: ModelHandle, ctx: StageContext, ref: TeacherRef, teacher: Any) -> None:
        spec = self.options.student
        if spec is None:
            return
        if spec.from_teacher and ref.kind != "input":
            base = copy.deepcopy(teacher) if self.uses_teacher else teacher
            base.requires_grad_(True)
            base.train()
            handle.model = base.to(ctx.device)
        if spec.keep_layers is not None:
            try:
                keep_layers(handle.model, spec.keep_layers)
            except ValueError as error:
                raise UserError(f"{self.where}.student.keep_layers: {error}") from None
            ctx.report(self.method, "student_layers_kept", list(spec.keep_layers))
        ctx.report(self.method, "student_layers", len(transformer_layers_of(handle.model)))

    def _intermediate(self, handle: ModelHandle, ctx: StageContext, report: Any) -> None:
        o = self.options
        hidden, attention = o.hidden_weight > 0, o.attention_weight > 0
        if not (hidden or attention):
            return
        student_depth = len(transformer_layers_of(handle.model))
        teacher_depth = len(transformer_layers_of(self.teacher))
        self.student_depth = student_depth
        self.pairs = layer_pairs(
            o.layer_map,
            student_depth,
            teacher_depth,
            o.student.keep_layers if o.student is not None else None,
            kept_from_teacher=o.student is not None and (o.student.from_teacher or o.teacher == "input"),
        )
        bad = [(i, j) for i, j in self.pairs if not (0 <= i < student_depth and 0 <= j < teacher_depth)]
        if bad:
            raise UserError(
                f"{self.where}.layer_map: {bad} out of range (student has {student_depth} layers, "
                f"teacher {teacher_depth})"
            )
        report("layer_map", [list(p) for p in self.pairs])
        if attention:
            student_heads, teacher_heads = model_heads(handle.model), model_heads(self.teacher)
            if student_heads != teacher_heads:
                raise UserError(
                    f"{self.where}.attention_weight: attention maps need the same number of heads "
                    f"(student {student_heads}, teacher {teacher_heads}); set attention_weight = 0"
                )
            self.previous_attention = set_attention(handle.model, "eager")
            set_attention(self.teacher, "eager")
        self.teacher_capture = LayerCapture(self.teacher, hidden, attention)
        if hidden:
            student_width, teacher_width = model_width(handle.model), model_width(self.teacher)
            if student_width != teacher_width:
                self.projection = make_projection(student_width, teacher_width, ctx.seed).to(ctx.device)
                params = list(self.projection.parameters())
                ctx.add_parameters(params)
                report("hidden_projection_params", sum(p.numel() for p in params))

    # -- one training step -----------------------------------------------------------------------

    def before_step(self, model: Any, ctx: StepContext) -> None:
        o = self.options
        if self.teacher is None or not (o.hidden_weight > 0 or o.attention_weight > 0):
            return
        if self.student_capture is None:
            inner = ctx.stage.accelerator.unwrap_model(model)
            self.student_capture = LayerCapture(inner, o.hidden_weight > 0, o.attention_weight > 0)
            if o.attention_weight > 0:
                self.dropout_changes = disable_attention_dropout(inner)
            if len(self.student_capture) != self.student_depth:
                raise RunFailed(
                    f"{self.where}: the student has {len(self.student_capture)} layers at the first step, "
                    f"{self.student_depth} after kd prepared it (did a later method change its depth?)"
                )
        self.student_capture.clear()

    def after_step(self, batch: Mapping[str, Any], result: StepOutput) -> StepOutput:
        if self.teacher is None:
            return result
        o = self.options
        student_logits = getattr(result.outputs, "logits", None)
        if student_logits is None:
            raise RunFailed(
                f"{self.where}: the training step returned no model outputs with logits; kd needs the "
                "student's logits (is another train_step plugin replacing the default step?)"
            )
        teacher_logits, teacher_hidden, teacher_maps = self.teacher_forward(batch)
        labels = batch.get("labels")
        attention_mask = batch.get("attention_mask")
        student, teacher, mask = losses.align_logits(
            student_logits, teacher_logits, labels, attention_mask, self.causal
        )
        if student.shape != teacher.shape:
            raise RunFailed(
                f"{self.where}: teacher logits {tuple(teacher.shape)} do not match the student's "
                f"{tuple(student.shape)}; teacher and student need the same label space and tokenizer"
            )
        total, soft = losses.kd_loss(result.loss, student, teacher, o.alpha, o.temperature, mask)
        logs = {"kd_task_loss": float(result.loss.detach()), "kd_soft_loss": float(soft.detach())}
        if o.hidden_weight > 0:
            assert self.student_capture is not None
            terms = [
                losses.hidden_mse(
                    self._captured(self.student_capture.hidden, i, "student hidden state"),
                    self._captured(teacher_hidden, j, "teacher hidden state"),
                    attention_mask,
                    self.projection,
                )
                for i, j in self.pairs
            ]
            hidden = torch.stack(terms).mean()
            total = total + o.hidden_weight * hidden
            logs["kd_hidden_loss"] = float(hidden.detach())
        if o.attention_weight > 0:
            assert self.student_capture is not None
            terms = [
                losses.attention_loss(
                    self._captured(self.student_capture.attention, i, "student attention map"),
                    self._captured(teacher_maps, j, "teacher attention map"),
                    attention_mask,
                    o.attention_loss,
                )
                for i, j in self.pairs
            ]
            maps = torch.stack(terms).mean()
            total = total + o.attention_weight * maps
            logs["kd_attention_loss"] = float(maps.detach())
        return StepOutput(loss=total, outputs=result.outputs, logs={**result.logs, **logs})

    def _captured(self, found: Mapping[int, torch.Tensor], index: int, what: str) -> torch.Tensor:
        if index not in found:
            raise RunFailed(
                f"{self.where}: no {what} was captured for layer {index} (the model's attention must run "
                "in eager mode and its blocks must sit in one ModuleList)"
            )
        return found[index]

    def teacher_forward(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        keys = None
        if self.cache is not None:
            keys = self.cache.keys(inputs)
            cached = self.cache.lookup(keys, inputs)
            if cached is not None:
                return cached, {}, {}
        if self.teacher_capture is not None:
            self.teacher_capture.clear()
        with torch.no_grad():
            outputs = self.teacher(**inputs)
        self.teacher_batches += 1
        logits = outputs.logits
        if self.permutation is not None:
            logits = logits[..., self.permutation]
        if self.cache is not None and keys is not None:
            self.cache.store(keys, logits, inputs)
        capture = self.teacher_capture
        return logits, dict(capture.hidden) if capture else {}, dict(capture.attention) if capture else {}

    # -- after training --------------------------------------------------------------------------

    def close(self, ctx: StageContext) -> None:
        if self.student_capture is not None:
            self.student_capture.remove()
        if self.teacher_capture is not None:
            self.teacher_capture.remove()
        restore_attributes(self.dropout_changes)
        self.dropout_changes = []
        if self.previous_attention is not None and self.student is not None:
            set_attention(self.student, self.previous_attention)
        if self.teacher is not None:
            ctx.report(self.method, "teacher_forward_batches", self.teacher_batches)
        if self.cache is not None:
            ctx.report(self.method, "teacher_cache_hits", self.cache.hits)
            ctx.report(self.method, "teacher_cache_entries", len(self.cache.entries))
            ctx.report(self.method, "teacher_cache_bytes", self.cache.bytes)
            ctx.report(self.method, "teacher_cache_full", self.cache.full)
        self.teacher = None
        self.cache = None
        self.student_capture = self.teacher_capture = None


def transformer_layers_of(model: Any) -> Any:
    from tunestack.api import transformer_layers

    return transformer_layers(model)


def layer_pairs(
    explicit: Sequence[Sequence[int]] | None,
    student_depth: int,
    teacher_depth: int,
    kept: Sequence[int] | None,
    kept_from_teacher: bool,
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for the intermediate losses.

    Explicit ``layer_map`` first; a student made of the teacher's kept layers maps each layer to the
    one it was copied from; equal depths map one to one; otherwise evenly spaced, the student's
    last layer on the teacher's last (``j = round((i + 1) * T / S) - 1``).
    """
    if explicit:
        return [(int(i), int(j)) for i, j in explicit]
    if kept is not None and kept_from_teacher and len(kept) == student_depth:
        return [(i, int(j)) for i, j in enumerate(kept)]
    if student_depth == teacher_depth:
        return [(i, i) for i in range(student_depth)]
    return [(i, round((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth)]


def make_projection(student_width: int, teacher_width: int, seed: int) -> torch.nn.Linear:
    """A linear map student width -> teacher width, initialised from its own seeded generator (so
    adding it does not shift the global random stream that dropout and data order use)."""
    layer = torch.nn.utils.skip_init(torch.nn.Linear, student_width, teacher_width)
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    bound = 1.0 / math.sqrt(student_width)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    return layer
