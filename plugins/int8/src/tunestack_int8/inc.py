"""neural-compressor 3.x as the calibrator: PT2E prepare -> calibrate -> convert, then read its
quantization parameters out of the converted graph.

INC's converted PT2E model is an exported fx graph of quantize/dequantize ops around fp32 linears:
it only runs int8 kernels after ``torch.compile`` (inductor freezing), and an exported graph cannot
be stored without pickling. So this module keeps what INC computed (per-channel int8 weight scales;
for static mode, each linear's calibrated uint8 input scale and zero point) and the plugin builds
fbgemm int8 modules from them, which run int8 kernels eagerly and save as plain tensors.

Hugging Face models take keyword arguments; ``torch.export`` needs positional tensors and a tensor
output, hence the thin positional wrappers below.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunestack_int8 import _quiet
from tunestack_int8.kernels import float_linear


class _Positional1(nn.Module):
    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.m = model
        self.names = list(names)

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.m(**dict(zip(self.names, tensors, strict=True)))
        return out.logits if hasattr(out, "logits") else out[0]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self._run(a)


class _Positional2(_Positional1):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._run(a, b)


class _Positional3(_Positional1):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._run(a, b, c)


class _Positional4(_Positional1):
    def forward(  # type: ignore[override]
        self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
    ) -> torch.Tensor:
        return self._run(a, b, c, d)


WRAPPERS = {1: _Positional1, 2: _Positional2, 3: _Positional3, 4: _Positional4}


class IncUnavailable(RuntimeError):
    """neural-compressor could not calibrate this model (the message says why)."""


def calibrate(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    mode: str,
) -> dict[str, dict[str, Any]]:
    """INC's quantization parameters for every module in ``targets`` it quantized.

    Returns ``{name: {"weight": (scales, zero_points, per_channel), "act": {"scale", "zero_point"} | None}}``.
    ``model`` is left as it was (Conv1D modules are swapped for linears only while exporting).
    """
    if not batches:
        raise IncUnavailable("no calibration batch")
    names = list(batches[0])
    wrapper_class = WRAPPERS.get(len(names))
    if wrapper_class is None:
        raise IncUnavailable(f"cannot wrap a model called with {len(names)} inputs ({', '.join(names)})")
    swapped = _swap_in_linears(model, targets)
    try:
        with _quiet.neural_compressor_session():
            try:
                from neural_compressor.torch.export import export
                from neural_compressor.torch.quantization import (
                    DynamicQuantConfig,
                    StaticQuantConfig,
                    convert,
                    prepare,
                )
            except ImportError as error:
                raise IncUnavailable(
                    f"neural-compressor is not installed with its torch extra ({error}); "
                    "pip install 'neural-compressor[pt]>=3.9,<4'"
                ) from None
            wrapper = wrapper_class(model, names).eval()
            example = tuple(batches[0][n] for n in names)
            auto = torch.export.Dim.AUTO
            shapes = tuple({i: auto for i in range(t.dim())} for t in example)
            try:
                exported = export(wrapper, example_inputs=example, dynamic_shapes=shapes)
            except Exception as error:
                raise IncUnavailable(f"torch.export of the model failed: {_first_line(error)}") from None
            if exported is None:
                raise IncUnavailable("torch.export of the model failed (neural-compressor returned nothing)")
            config = StaticQuantConfig() if mode == "static" else DynamicQuantConfig()
            try:
                prepared = prepare(exported, config)
                with torch.no_grad():
                    for batch in batches if mode == "static" else batches[:1]:
                        prepared(*(batch[n] for n in names))
                converted = convert(prepared)
            except Exception as error:
                raise IncUnavailable(f"prepare/convert failed: {_first_line(error)}") from None
            return _read_qparams(converted, set(targets), mode)
    finally:
        _restore(model, swapped)


def _swap_in_linears(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Conv1D targets become nn.Linear while exporting, so INC sees (and quantizes) a linear."""
    swapped = {}
    for name, module in targets.items():
        if type(module) is not nn.Linear:
            swapped[name] = module
            _set(model, name, float_linear(module))
    return swapped


def _restore(model: nn.Module, swapped: Mapping[str, nn.Module]) -> None:
    for name, module in swapped.items():
        _set(model, name, module)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _module_name(node: Any, wanted: set[str]) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].m.", "m."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    return path if path in wanted else None


def _value(graph_module: Any, arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        if arg.op == "get_attr":
            return operator.attrgetter(str(arg.target))(graph_module)
        raise IncUnavailable(f"unexpected node {arg.op} {arg.target} where a constant was expected")
    return arg


def _read_qparams(graph_module: Any, wanted: set[str], mode: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or "linear" not in str(node.target):
            continue
        name = _module_name(node, wanted)
        if name is None or name in found:
            continue
        x, w = node.args[0], node.args[1]
        if not isinstance(w, torch.fx.Node):
            continue
        if "dequantize_per_channel" in str(w.target):  # static: per-channel symmetric weights
            per_channel = True
        elif "dequantize_per_tensor" in str(w.target):  # dynamic: one scale per weight
            per_channel = False
        else:
            continue  # INC left this linear in fp32
        if w.args[-1] != torch.int8:
            continue
        scales = torch.as_tensor(_value(graph_module, w.args[1])).detach().double().flatten()
        zero_points = torch.as_tensor(_value(graph_module, w.args[2])).detach().long().flatten()
        entry: dict[str, Any] = {"weight": (scales, zero_points, per_channel), "act": None}
        if mode == "static":
            if not (isinstance(x, torch.fx.Node) and "dequantize_per_tensor" in str(x.target)):
                continue
            scale = float(torch.as_tensor(_value(graph_module, x.args[1])))
            zero_point = int(torch.as_tensor(_value(graph_module, x.args[2])))
            low, high, dtype = x.args[3], x.args[4], x.args[5]
            if dtype != torch.uint8 or low != 0 or high != 255:
                continue  # not an activation encoding fbgemm's static kernel takes
            entry["act"] = {"scale": scale, "zero_point": zero_point}
        found[name] = entry
    return found


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
