"""What the ``int8`` method does at run time: choose modules, calibrate, pick a backend, quantize
(module by module when accuracy-aware), measure, and save/rebuild the int8 modules.

Every quantized module *replaces* a float module; the float originals are kept until the end of
``compress``, so trying a backend or a module is a swap in and a swap out (no model copies).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunestack.api import ModelError, ModelHandle, Saved, StageContext, TransformRecord, head_parameter_names
from tunestack_int8 import _quiet, kernels

log = logging.getLogger("tunestack_int8")

FORMAT = 1
META_FILE = "int8.json"
TENSOR_FILE = "int8.safetensors"
REFERENCE_BYTES = 256 * 2**20  # fp32 outputs kept to measure output changes against
TIMED_CALLS = 5  # median of this many calls after one warm-up call (auto choice, latency report)

#: backend option -> the kind of its linear modules, per mode
LINEAR_KIND = {
    ("fbgemm", "dynamic"): kernels.FBGEMM_DYNAMIC,
    ("fbgemm", "static"): kernels.FBGEMM_STATIC,
    ("torchao", "dynamic"): kernels.TORCHAO_DYNAMIC,
    ("torchao", "static"): kernels.TORCHAO_STATIC,
    ("neural-compressor", "dynamic"): kernels.FBGEMM_DYNAMIC,
    ("neural-compressor", "static"): kernels.FBGEMM_STATIC,
}
AUTO_CANDIDATES = ("fbgemm", "torchao")


class Int8Error(ModelError):
    """The model cannot be quantized as asked (the message names the cause)."""


@dataclass
class Target:
    name: str
    module: nn.Module  # the float original
    source: str  # linear | conv1d | embedding


@dataclass
class Plan:
    """One backend's int8 replacement (and its kind) for every target module."""

    replacements: dict[str, nn.Module] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# compress
# ------------------------------------------------------------------------------------------------


def compress(method: Any, handle: ModelHandle, ctx: StageContext) -> None:
    options = method.options
    _quiet.silence()
    model = handle.model
    model.to("cpu")
    model.eval()
    report = _Reporter(method, ctx)
    targets, skipped = select(model, options)
    if not targets:
        raise Int8Error(
            f"int8 ({method.slot.path}): nothing to quantize: no {' or '.join(options.modules)} module is left "
            f"after excluding {', '.join(sorted(skipped)) or 'nothing'}"
        )
    batches, split = calibration_batches(handle, ctx, options.calibration_batches)
    needs_data = (
        options.mode == "static"
        or options.backend in ("auto", "neural-compressor")
        or options.max_output_change is not None
    )
    if needs_data and not batches:
        raise Int8Error(
            f"int8 ({method.slot.path}): no calibration data: the stage has no training or evaluation examples"
        )
    timing = bool(batches) and bool(ctx.stack.eval.latency)
    reference = reference_outputs(handle, model, batches)
    measured = batches[: len(reference)]  # the batches output changes are measured on
    fp32_bytes = weights_bytes(model)
    stats = observe(model, targets, batches) if options.mode == "static" else {}
    if options.mode == "static":
        unreached = [n for n in targets if n not in stats and targets[n].source != "embedding"]
        for name in unreached:
            skipped[name] = "not reached by the calibration batches (static needs its input range)"
            del targets[name]
        if not targets:
            raise Int8Error(f"int8 ({method.slot.path}): the calibration batches reached no module to quantize")
    swap = Swapper(model)
    backend = options.backend
    if backend == "auto":
        backend = same_on_every_process(
            ctx, choose_backend(handle, targets, stats, batches[0], options.mode, swap, report)
        )
    inc_qparams: dict[str, dict[str, Any]] | None = None
    if backend == "neural-compressor":
        inc_qparams, backend = neural_compressor_qparams(model, targets, batches, options.mode, report)
        found = inc_qparams or {}
        left = [] if inc_qparams is None else [n for n in targets if targets[n].source != "embedding"]
        for name in [n for n in left if n not in found]:
            skipped[name] = "neural-compressor left it in fp32"
            del targets[name]
    plan = build_plan(targets, backend, options.mode, stats, inc_qparams)
    report.put("backend", backend)
    report.put("kernels", sorted({kernels.KERNELS[k] for k in plan.kinds.values()}))
    report.put("mode", options.mode)

    kept: dict[str, float] = {}
    if options.max_output_change is not None:
        changes = {}
        for name in plan.replacements:
            swap.put(name, plan.replacements[name])
            changes[name] = output_change(handle, model, measured, reference)
            swap.put(name, targets[name].module)
        kept = {n: c for n, c in changes.items() if not c <= options.max_output_change}
        report.put("module_output_change", {n: _round(c) for n, c in changes.items()})
        if len(kept) == len(changes):
            best = min(changes, key=lambda n: changes[n])
            raise Int8Error(
                f"int8 ({method.slot.path}): max_output_change = {options.max_output_change} keeps every module "
                f"in fp32, so nothing would be quantized; the smallest change one module makes is "
                f"{changes[best]:.3g} ({best}): raise max_output_change to at least that"
            )
    for name, replacement in plan.replacements.items():
        if name not in kept:
            swap.put(name, replacement)
    if options.max_output_change is not None:
        # single-module changes add up: while the model as a whole moves more than allowed, return
        # the most sensitive module still quantized to fp32
        total = output_change(handle, model, measured, reference)
        order = sorted((n for n in plan.replacements if n not in kept), key=lambda n: -changes[n])
        returned = []
        while total > options.max_output_change and len(order) > 1:
            name = order.pop(0)
            swap.put(name, targets[name].module)
            kept[name] = changes[name]
            returned.append(name)
            total = output_change(handle, model, measured, reference)
        report.put("fp32_kept_for_total", returned)
        if total > options.max_output_change:
            raise Int8Error(
                f"int8 ({method.slot.path}): max_output_change = {options.max_output_change} cannot be met: "
                f"even with only {order[0]} quantized the outputs change by {total:.3g}"
            )
    quantized = {n: plan.kinds[n] for n in plan.replacements if n not in kept}
    check_quantized(model, quantized)
    latency: dict[str, float] = {}
    if timing and not options.compile:  # fp32 and int8 timed in alternation, on the same batch
        fp32 = {n: targets[n].module for n in quantized}
        int8 = {n: plan.replacements[n] for n in quantized}
        latency = interleaved_ms(swap, {"fp32": fp32, "int8": int8}, handle.task.model_inputs(batches[0]))
        swap.install(int8)
    elif timing:
        latency["fp32"] = interleaved_ms(
            swap, {"fp32": {n: targets[n].module for n in quantized}}, handle.task.model_inputs(batches[0])
        )["fp32"]
        swap.install({n: plan.replacements[n] for n in quantized})
    if options.compile:
        model.compile()
        report.put("compiled", "torch.compile (inductor) on the quantized model; also applied on reload")
    with torch.inference_mode():
        change = output_change(handle, model, measured, reference) if measured else None
    handle.record_transform(
        method,
        {
            "backend": backend,
            "mode": options.mode,
            "compile": options.compile,
            "modules": {n: {"kind": k, "source": targets[n].source} for n, k in quantized.items()},
        },
    )
    int8_bytes = (
        fp32_bytes
        - sum(_float_bytes(targets[n].module) for n in quantized)
        + sum(_stored_bytes(model.get_submodule(n), k, targets[n].source) for n, k in quantized.items())
    )
    report.put("quantized_modules", len(quantized))
    report.put("quantized_by_kind", _count(quantized.values()))
    report.put("fp32_kept", {n: _round(c) for n, c in kept.items()})
    report.put("not_quantized", dict(sorted(skipped.items())))
    if change is not None:
        report.put("output_change", _round(change))
    report.put("calibration", {"split": split, "batches": len(batches), "output_change_batches": len(measured)})
    report.put("weights_bytes_before", fp32_bytes)
    report.put("weights_bytes_after", int8_bytes)
    report.put("size_ratio", _round(int8_bytes / fp32_bytes) if fp32_bytes else None)
    if timing:
        inputs = handle.task.model_inputs(batches[0])
        if "int8" not in latency:  # compiled: the compiled model alone (its first calls compile)
            latency["int8"] = median_ms(lambda: model(**inputs))
        report.put("latency_batch", _shape(inputs))
        report.put("latency_ms_before", _round(latency["fp32"]))
        report.put("latency_ms_after", _round(latency["int8"]))
        report.put("speedup", _round(latency["fp32"] / latency["int8"]) if latency["int8"] else None)


class _Reporter:
    def __init__(self, method: Any, ctx: StageContext) -> None:
        self.method = method
        self.ctx = ctx

    def put(self, key: str, value: Any) -> None:
        self.ctx.report(self.method, key, value)


def _round(value: float) -> float:
    return float(f"{value:.4g}") if math.isfinite(value) else value


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------
# choosing modules and data
# ------------------------------------------------------------------------------------------------


def select(model: nn.Module, options: Any) -> tuple[dict[str, Target], dict[str, str]]:
    """The modules to quantize, and those left in fp32 with the reason."""
    wanted = set(options.modules)
    head_modules = {name.rsplit(".", 1)[0] for name in head_parameter_names(model)}
    owners: dict[int, list[str]] = {}  # every module holding a tensor as its own parameter
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        source = kernels.source_kind(module)
        if source is None or not name:
            continue
        family = "embedding" if source == "embedding" else "linear"
        if family not in wanted:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in options.exclude):
            skipped[name] = "excluded"
            continue
        if name in head_modules and not options.quantize_head:
            skipped[name] = "task head (quantize_head = false)"
            continue
        sharing = sorted(set(owners.get(id(module.weight), [])) - {name})
        if sharing:
            skipped[name] = f"weight tied to {', '.join(sharing)}"
            continue
        if module.weight.dtype != torch.float32:
            skipped[name] = f"{module.weight.dtype} weights (int8 kernels here take fp32 models)"
            continue
        targets[name] = Target(name, module, source)
    return targets, skipped


def calibration_batches(handle: ModelHandle, ctx: StageContext, count: int) -> tuple[list[dict[str, Any]], str]:
    """``count`` batches of the stage's training data (evaluation data when there is none), on CPU."""
    for split in ("train", "eval"):
        if not ctx.data.examples(split):
            continue
        batches = [
            {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for batch in ctx.data.batches(split, limit=count)
        ]
        if batches:
            return batches, split
    return [], "none"


def observe(model: nn.Module, targets: Mapping[str, Target], batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per module: the range of its inputs over the calibration batches (static mode)."""
    from torch.ao.quantization.observer import MinMaxObserver

    reduce_range = not kernels.vnni()
    stats: dict[str, dict[str, Any]] = {}
    observers: dict[str, Any] = {}
    hooks = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            if name not in observers:
                observers[name] = MinMaxObserver(
                    dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range
                )
                stats[name] = {"absmax": 0.0, "ndim": x.dim()}
            observers[name](x)
            stats[name]["absmax"] = max(stats[name]["absmax"], float(x.abs().max()))

        return hook

    for name, target in targets.items():
        if target.source != "embedding":
            hooks.append(target.module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for hook in hooks:
            hook.remove()
    for name, observer in observers.items():
        scale, zero_point = observer.calculate_qparams()
        stats[name].update(scale=float(scale), zero_point=int(zero_point))
    return stats


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------


def build_plan(
    targets: Mapping[str, Target],
    backend: str,
    mode: str,
    stats: Mapping[str, Any],
    inc_qparams: Mapping[str, Any] | None = None,
) -> Plan:
    plan = Plan()
    linear_kind = LINEAR_KIND[(backend, mode)]
    for name, target in targets.items():
        if target.source == "embedding":
            kind = kernels.EMBEDDING
            replacement = kernels.build(kind, target.module)
        else:
            kind = linear_kind
            act = None
            weight = None
            if inc_qparams is not None:
                weight = inc_qparams[name]["weight"]
                act = inc_qparams[name]["act"]
            elif mode == "static":
                act = stats[name]
            replacement = kernels.build(kind, target.module, act=act, weight=weight)
        plan.replacements[name] = replacement
        plan.kinds[name] = kind
    return plan


def choose_backend(
    handle: ModelHandle,
    targets: Mapping[str, Target],
    stats: Mapping[str, Any],
    batch: dict[str, Any],
    mode: str,
    swap: Swapper,
    report: _Reporter,
) -> str:
    """Time every eager candidate on this machine; the fastest that really quantized wins.

    Timed on one calibration batch and on its first example alone (batch 1), fp32 and candidates
    called in alternation (so a busy machine slows them alike); the score is the geometric mean of
    the two medians.
    """
    model = swap.model
    measured: dict[str, Any] = {}
    plans: dict[str, dict[str, nn.Module]] = {}
    originals = {n: t.module for n, t in targets.items()}
    for candidate in AUTO_CANDIDATES:
        try:
            plan = build_plan(targets, candidate, mode, stats)
            swap.install(plan.replacements)
            check_quantized(model, plan.kinds)
            with torch.inference_mode():
                out = handle.task.outputs(model, batch)
            if not bool(torch.isfinite(out).all()):
                raise Int8Error("non-finite outputs")
            plans[candidate] = plan.replacements
        except Exception as error:
            measured[candidate] = {"error": _first_line(error)}
        finally:
            swap.install(originals)
    if not plans:
        raise Int8Error(
            "int8 backend = 'auto': no backend could quantize this model: "
            + "; ".join(f"{c}: {m['error']}" for c, m in measured.items())
        )
    inputs = handle.task.model_inputs(batch)
    single = {k: v[:1] for k, v in inputs.items()}
    variants = {"fp32": originals, **plans}
    on_batch = interleaved_ms(swap, variants, inputs)
    on_single = interleaved_ms(swap, variants, single)
    swap.install(originals)
    score = {v: math.sqrt(on_batch[v] * on_single[v]) for v in variants}
    for candidate in plans:
        measured[candidate] = {
            "ms": _round(on_batch[candidate]),
            "ms_batch1": _round(on_single[candidate]),
            "speedup": _round(score["fp32"] / score[candidate]),
        }
    choice = min(plans, key=lambda c: score[c])
    others = ", ".join(f"{c} {score['fp32'] / score[c]:.3g}x" for c in plans if c != choice)
    report.put(
        "auto",
        {
            "batch": _shape(inputs),
            "fp32_ms": _round(on_batch["fp32"]),
            "fp32_ms_batch1": _round(on_single["fp32"]),
            "candidates": measured,
            "choice": choice,
            "reason": f"fastest eager int8 model on this machine: {choice} "
            f"{score['fp32'] / score[choice]:.3g}x fp32"
            + (f" (vs {others})" if others else "")
            + f" (geometric mean of batch {_shape(inputs)} and batch 1, median of {TIMED_CALLS} alternating calls)",
        },
    )
    return choice


def _shape(inputs: Mapping[str, Any]) -> str:
    return "x".join(str(s) for s in inputs["input_ids"].shape)


def neural_compressor_qparams(
    model: nn.Module, targets: Mapping[str, Target], batches: list[dict[str, Any]], mode: str, report: _Reporter
) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """INC's calibration, or fbgemm's own when INC cannot handle the model (recorded)."""
    from tunestack_int8 import inc

    linears = {n: t.module for n, t in targets.items() if t.source != "embedding"}
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    started = time.perf_counter()
    try:
        found = inc.calibrate(model, linears, inputs, mode)
        if not found:
            raise inc.IncUnavailable("it quantized none of the selected modules")
    except inc.IncUnavailable as error:
        reason = f"neural-compressor could not calibrate this model ({error}); fbgemm calibrated it instead"
        log.warning("int8: %s", reason)
        report.put("fallback", {"from": "neural-compressor", "to": "fbgemm", "reason": reason})
        return None, "fbgemm"
    report.put(
        "calibrated_by",
        {
            "library": "neural-compressor",
            "version": _version("neural-compressor"),
            "config": "StaticQuantConfig" if mode == "static" else "DynamicQuantConfig",
            "path": "PT2E (torch.export + prepare/convert)",
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return found, "neural-compressor"


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def check_quantized(model: nn.Module, kinds: Mapping[str, str]) -> None:
    """Never a silent fp32 "int8": every module said to be quantized must hold int8 weights."""
    wrong = [n for n, k in kinds.items() if kernels.kind_of(model.get_submodule(n)) != k]
    if wrong:
        raise Int8Error(f"int8: these modules were not quantized: {', '.join(wrong[:5])}")


class Swapper:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def put(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def install(self, modules: Mapping[str, nn.Module]) -> None:
        for name, module in modules.items():
            self.put(name, module)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


def reference_outputs(handle: ModelHandle, model: nn.Module, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    """fp32 outputs of the first batches, up to REFERENCE_BYTES of them (a causal LM's logits are large)."""
    kept: list[torch.Tensor] = []
    total = 0
    with torch.inference_mode():
        for batch in batches:
            out = handle.task.outputs(model, batch)
            total += out.numel() * out.element_size()
            if kept and total > REFERENCE_BYTES:
                break
            kept.append(out)
    return kept


def same_on_every_process(ctx: StageContext, choice: str) -> str:
    """With several processes (accelerate launch), every one must quantize the same way: the main
    process's timing decides."""
    accelerator = ctx.accelerator
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return choice
    from accelerate.utils import broadcast_object_list

    box = [choice]
    broadcast_object_list(box, from_process=0)
    return str(box[0])


def output_change(
    handle: ModelHandle, model: nn.Module, batches: list[dict[str, Any]], reference: list[torch.Tensor]
) -> float:
    """Largest relative change of the outputs over the batches: ||q - f|| / ||f|| (logits)."""
    worst = 0.0
    with torch.inference_mode():
        for batch, ref in zip(batches, reference, strict=True):
            got = handle.task.outputs(model, batch)
            denominator = float(ref.norm()) or 1.0
            worst = max(worst, float((got - ref).norm()) / denominator)
    return worst


def interleaved_ms(
    swap: Swapper, variants: Mapping[str, Mapping[str, nn.Module]], inputs: Mapping[str, Any]
) -> dict[str, float]:
    """Median ms of one forward pass per variant (a set of modules to install), calls alternating.

    One warm-up round, then ``TIMED_CALLS`` rounds that call every variant once each, so load from
    other processes hits all variants alike. Leaves the last variant installed.
    """
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for round_ in range(TIMED_CALLS + 1):
            for name, modules in variants.items():
                swap.install(modules)
                start = time.perf_counter()
                swap.model(**inputs)
                if round_:
                    times[name].append((time.perf_counter() - start) * 1000.0)
    return {v: float(statistics.median(t)) for v, t in times.items()}


def median_ms(call: Any, repeats: int = TIMED_CALLS) -> float:
    with torch.inference_mode():
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def weights_bytes(model: nn.Module) -> int:
    seen = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:
            continue
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _float_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def _stored_bytes(module: nn.Module, kind: str, source: str) -> int:
    tensors, _ = kernels.export(kind, module, source)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


# ------------------------------------------------------------------------------------------------
# save and rebuild
# ------------------------------------------------------------------------------------------------


def save(model: nn.Module, folder: Path, record: TransformRecord) -> Saved:
    """Store the int8 modules as safetensors + JSON; hand back the model with float placeholders."""
    from safetensors.torch import save_file

    modules: dict[str, Any] = record.state.get("modules", {})
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    placeholders: dict[int, nn.Module] = {}
    claimed: set[str] = set()
    for name, spec in modules.items():
        module = model.get_submodule(name)
        kind = kernels.kind_of(module)
        if kind is None or kind != spec["kind"]:
            raise Int8Error(
                f"int8 ({record.slot.path}): {name} is a {type(module).__name__}, not the {spec['kind']} module "
                "it made: a later method replaced it without recording a transform"
            )
        stored, meta = kernels.export(kind, module, spec["source"])
        for key, tensor in stored.items():
            tensors[f"{name}.{key}"] = tensor
        described[name] = meta
        empty = kernels.placeholder(spec["source"], meta)
        placeholders[id(module)] = empty
        claimed |= {f"{name}.{key}" for key in empty.state_dict()}
    save_file(tensors, str(folder / TENSOR_FILE), metadata={"format": str(FORMAT)})
    info = {
        "format": FORMAT,
        "backend": record.state.get("backend"),
        "mode": record.state.get("mode"),
        "compile": bool(record.state.get("compile", False)),
        "kernels": {kind: kernels.KERNELS[kind] for kind in sorted({m["kind"] for m in described.values()})},
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "modules": described,
    }
    (folder / META_FILE).write_text(kernels.dumps(info), encoding="utf-8")
    return Saved(model=_peeled(model, placeholders), claimed=claimed)


def _peeled(model: nn.Module, placeholders: Mapping[int, nn.Module]) -> nn.Module:
    """A structural copy of ``model`` with every int8 module swapped for an empty float one.

    Tensors are shared, not copied (the in-memory model stays usable).
    """
    memo: dict[int, Any] = dict(placeholders)
    for tensor in [*model.parameters(), *model.buffers()]:
        memo[id(tensor)] = tensor
    peeled = copy.deepcopy(model, memo)
    for module in peeled.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return peeled


def rebuild(model: nn.Module, folder: Path, record: TransformRecord, compile_model: bool) -> nn.Module:
    """Put the stored int8 modules back into a freshly loaded base model (no calibration)."""
    from safetensors.torch import load_file

    info = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise Int8Error(f"{folder / META_FILE}: unsupported int8 format {info.get('format')!r}")
    tensors = load_file(str(folder / TENSOR_FILE))
    swap = Swapper(model)
    for name, meta in info["modules"].items():
        prefix = name + "."
        own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
        swap.put(name, kernels.restore(meta, own))
    model.eval()
    if compile_model:
        model.compile()
    return model
