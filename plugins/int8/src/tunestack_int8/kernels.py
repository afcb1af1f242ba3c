"""The int8 modules this plugin puts into a model, how they are built, stored and rebuilt.

One *kind* per kernel family; each quantized module replaces one float module (``nn.Linear``,
transformers' ``Conv1D`` treated as a transposed linear, or ``nn.Embedding``):

* ``fbgemm-dynamic``: ``torch.ao.nn.quantized.dynamic.Linear`` made by
  ``torch.ao.quantization.quantize_dynamic`` (int8 weights per output channel; activations quantized
  per call; fbgemm/x86 ``quantized::linear_dynamic``).
* ``fbgemm-static``: :class:`StaticQuantizedLinear` (the same packed int8 weights; uint8 activations
  with a calibrated scale and zero point; ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``).
* ``torchao-dynamic`` / ``torchao-static``: ``nn.Linear`` whose weight is a torchao ``Int8Tensor``
  (``Int8DynamicActivationInt8WeightConfig`` / ``Int8StaticActivationInt8WeightConfig``; int8 x int8
  ``torch._int_mm`` in eager mode, fused by inductor under ``torch.compile``).
* ``fbgemm-embedding``: :class:`Int8Embedding`, a ``torch.ao.nn.quantized.Embedding`` (8-bit rows with float scale and
  offset; ``quantized::embedding_byte``).

Storage is plain tensors (safetensors) plus JSON metadata: no pickles, no ``torch.save``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from tunestack_int8 import _quiet

FBGEMM_DYNAMIC = "fbgemm-dynamic"
FBGEMM_STATIC = "fbgemm-static"
TORCHAO_DYNAMIC = "torchao-dynamic"
TORCHAO_STATIC = "torchao-static"
EMBEDDING = "fbgemm-embedding"
LINEAR_KINDS = (FBGEMM_DYNAMIC, FBGEMM_STATIC, TORCHAO_DYNAMIC, TORCHAO_STATIC)

KERNELS = {
    FBGEMM_DYNAMIC: "fbgemm quantized::linear_dynamic (int8 weights, activations quantized per call)",
    FBGEMM_STATIC: "fbgemm quantized::linear_with_input_q_dq_qweight_dq_output_fp32 "
    "(int8 weights per channel, uint8 activations with calibrated scale and zero point)",
    TORCHAO_DYNAMIC: "torchao Int8Tensor: int8 x int8 torch._int_mm (weights per row, activations per token "
    "quantized per call)",
    TORCHAO_STATIC: "torchao Int8Tensor: int8 x int8 torch._int_mm (weights per row, activations with a "
    "calibrated per-tensor scale)",
    EMBEDDING: "fbgemm quantized::embedding_byte (8-bit rows with float scale and offset)",
}


def vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products without int16 saturation)."""
    for owner in (getattr(torch._C, "_cpu", None), getattr(torch, "cpu", None)):
        probe = getattr(owner, "_is_vnni_supported", None)
        if probe is not None:
            try:
                return bool(probe())
            except Exception:  # pragma: no cover - private API
                return False
    return False


# ------------------------------------------------------------------------------------------------
# what can be quantized
# ------------------------------------------------------------------------------------------------


def conv1d_class() -> Any:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def source_kind(module: Any) -> str | None:
    """'linear', 'conv1d' (GPT-2's transposed linear) or 'embedding'; None for anything else."""
    conv1d = conv1d_class()
    if type(module) is nn.Linear:
        return "linear"
    if conv1d is not None and type(module) is conv1d:
        return "conv1d"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


def float_linear(module: Any) -> nn.Linear:
    """An ``nn.Linear`` computing what ``module`` computes, sharing its tensors where it can.

    A ``Conv1D`` (weight stored as in x out) becomes a linear with the transposed weight.
    """
    if type(module) is nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = module.weight
        linear.bias = module.bias
        return linear
    weight = module.weight.detach()
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
    linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias
    return linear


def placeholder(source: str, meta: dict[str, Any]) -> nn.Module:
    """An empty (meta-device) float module of the original class, for the peeled model."""
    with torch.device("meta"):
        if source == "embedding":
            return nn.Embedding(meta["num_embeddings"], meta["embedding_dim"], padding_idx=meta.get("padding_idx"))
        if source == "conv1d":
            return conv1d_class()(meta["out_features"], meta["in_features"])
        return nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"])


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


class StaticQuantizedLinear(DynamicQuantizedLinear):
    """Packed int8 weights (fbgemm) with a calibrated input scale and zero point; fp32 in and out."""

    def __init__(
        self, in_features: int, out_features: int, input_scale: float, input_zero_point: int, bias_: bool = True
    ) -> None:
        super().__init__(in_features, out_features, bias_=bias_, dtype=torch.qint8)
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)

    def _get_name(self) -> str:
        return "StaticQuantizedLinear"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"input_scale={self.input_scale:.6g}, input_zero_point={self.input_zero_point}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.contiguous(), self.input_scale, self.input_zero_point, self._packed_params._packed_params
        )


class Int8Embedding(QuantizedEmbedding):
    """``torch.ao.nn.quantized.Embedding`` that also takes non-contiguous indices.

    (BERT's default token types are an expanded view; fbgemm's kernel wants contiguous indices.)
    """

    def _get_name(self) -> str:
        return "Int8Embedding"

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())


def is_quantized(module: Any) -> bool:
    """True for every int8 module this plugin makes (checked on types and weight dtypes)."""
    if isinstance(module, DynamicQuantizedLinear | QuantizedEmbedding):
        return True
    weight = getattr(module, "weight", None)
    qdata = getattr(weight, "qdata", None)
    return isinstance(qdata, torch.Tensor) and qdata.dtype == torch.int8


def kind_of(module: Any) -> str | None:
    if isinstance(module, StaticQuantizedLinear):
        return FBGEMM_STATIC
    if isinstance(module, DynamicQuantizedLinear):
        return FBGEMM_DYNAMIC
    if isinstance(module, QuantizedEmbedding):
        return EMBEDDING
    weight = getattr(module, "weight", None)
    if getattr(weight, "qdata", None) is not None:
        return TORCHAO_STATIC if getattr(weight, "act_quant_scale", None) is not None else TORCHAO_DYNAMIC
    return None


def weight_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 scales and zero points (torch's default weight observer)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight.detach().float())
    scales, zero_points = observer.calculate_qparams()
    return scales.double(), zero_points.long()


def _packed(module: DynamicQuantizedLinear, linear: nn.Linear, qparams: tuple[Any, ...]) -> None:
    """Pack ``linear``'s weight with (scales, zero points[, per_channel]) as qint8."""
    scales, zero_points = qparams[0], qparams[1]
    per_channel = qparams[2] if len(qparams) > 2 else True
    weight = linear.weight.detach().float()
    if per_channel:
        qweight = torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)
    else:
        qweight = torch.quantize_per_tensor(
            weight, float(scales.flatten()[0]), int(zero_points.flatten()[0]), torch.qint8
        )
    bias = linear.bias.detach().float() if linear.bias is not None else None
    module.set_weight_bias(qweight, bias)


def build(
    kind: str,
    module: Any,
    act: dict[str, Any] | None = None,
    weight: tuple[Any, ...] | None = None,
) -> nn.Module:
    """The int8 replacement of ``module`` (left untouched).

    ``act``: calibrated activation statistics (static kinds): ``{"scale", "zero_point"}`` for
    fbgemm, ``{"absmax", "ndim"}`` for torchao. ``weight``: (scales, zero points, per_channel) to use
    instead of the default per-channel observer's (neural-compressor's calibration).
    """
    if kind == EMBEDDING:
        return _embedding(module)
    linear = float_linear(module)
    if kind == FBGEMM_DYNAMIC:
        if weight is not None:
            quantized = DynamicQuantizedLinear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
            _packed(quantized, linear, weight)
            return quantized
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        holder = nn.Sequential(linear)
        _quiet.silence()
        quantize_dynamic(holder, {"0": per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return holder[0]
    if kind == FBGEMM_STATIC:
        if act is None:
            raise ValueError("static quantization needs calibrated activation ranges")
        quantized = StaticQuantizedLinear(
            linear.in_features, linear.out_features, act["scale"], act["zero_point"], bias_=linear.bias is not None
        )
        _packed(quantized, linear, weight if weight is not None else weight_qparams(linear.weight))
        return quantized
    if kind in (TORCHAO_DYNAMIC, TORCHAO_STATIC):
        _quiet.import_torchao()
        from torchao.quantization import quantize_

        quantize_(linear, torchao_config(kind, act), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        if kind_of(linear) != kind:
            raise RuntimeError(f"torchao left {type(linear.weight).__name__} weights, not Int8Tensor")
        return linear
    raise ValueError(f"unknown int8 kind {kind!r}")


def torchao_config(kind: str, act: dict[str, Any] | None) -> Any:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8StaticActivationInt8WeightConfig,
        PerRow,
        PerTensor,
    )

    reduce_range = not vnni()
    if kind == TORCHAO_DYNAMIC:
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, reduce_range=reduce_range)
    if act is None:
        raise ValueError("static quantization needs calibrated activation ranges")
    top = 63.0 if reduce_range else 127.0
    scale = torch.full((1,) * int(act["ndim"]), max(float(act["absmax"]), 1e-8) / top, dtype=torch.float32)
    return Int8StaticActivationInt8WeightConfig(
        act_quant_scale=scale,
        granularity=[PerTensor(), PerRow()],
        set_inductor_config=False,
        reduce_range=reduce_range,
    )


def _embedding(module: nn.Embedding) -> QuantizedEmbedding:
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams)
    weight = module.weight.detach().float()
    observer(weight)
    scales, offsets = observer.calculate_qparams()
    qweight = torch.quantize_per_channel(weight, scales, offsets, 0, torch.quint8)
    quantized = Int8Embedding(module.num_embeddings, module.embedding_dim, dtype=torch.quint8)
    quantized.set_weight(qweight)
    return quantized


# ------------------------------------------------------------------------------------------------
# storage: plain tensors + JSON
# ------------------------------------------------------------------------------------------------


def export(kind: str, module: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) that :func:`restore` turns back into an identical module."""
    meta: dict[str, Any] = {"kind": kind, "source": source}
    tensors: dict[str, torch.Tensor] = {}
    if kind == EMBEDDING:
        qweight = module.weight()
        tensors["qweight"] = qweight.int_repr().contiguous()
        tensors["scale"] = qweight.q_per_channel_scales().contiguous()
        tensors["zero_point"] = qweight.q_per_channel_zero_points().contiguous()
        meta.update(num_embeddings=module.num_embeddings, embedding_dim=module.embedding_dim, padding_idx=None)
        return tensors, meta
    if kind in (FBGEMM_DYNAMIC, FBGEMM_STATIC):
        qweight, bias = module._weight_bias()
        tensors["qweight"] = qweight.int_repr().contiguous()
        per_channel = qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        if per_channel:
            tensors["scale"] = qweight.q_per_channel_scales().double().contiguous()
            tensors["zero_point"] = qweight.q_per_channel_zero_points().long().contiguous()
        else:
            tensors["scale"] = torch.tensor([qweight.q_scale()], dtype=torch.float64)
            tensors["zero_point"] = torch.tensor([qweight.q_zero_point()], dtype=torch.int64)
        if bias is not None:
            tensors["bias"] = bias.detach().contiguous()
        meta.update(
            in_features=module.in_features,
            out_features=module.out_features,
            bias=bias is not None,
            per_channel=per_channel,
            engine=torch.backends.quantized.engine,
        )
        if kind == FBGEMM_STATIC:
            meta.update(input_scale=module.input_scale, input_zero_point=module.input_zero_point)
        return tensors, meta
    if kind in (TORCHAO_DYNAMIC, TORCHAO_STATIC):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        # torchao's flattening wants a dotted name ("m.weight" -> "m._weight_qdata", ...)
        flat, info = flatten_tensor_state_dict({"m.weight": module.weight})
        tensors.update({k.removeprefix("m."): v.contiguous() for k, v in flat.items()})
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().contiguous()
        meta.update(
            in_features=module.in_features,
            out_features=module.out_features,
            bias=module.bias is not None,
            torchao=dict(info),
        )
        return tensors, meta
    raise ValueError(f"unknown int8 kind {kind!r}")


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the module :func:`export` described, from its stored tensors (no calibration)."""
    _quiet.silence()  # reloading builds quantized tensors, which torch now flags as deprecated
    kind = meta["kind"]
    if kind == EMBEDDING:
        qweight = torch._make_per_channel_quantized_tensor(
            tensors["qweight"], tensors["scale"], tensors["zero_point"], 0
        )
        embedding = Int8Embedding(meta["num_embeddings"], meta["embedding_dim"], dtype=torch.quint8)
        embedding.set_weight(qweight)
        return embedding
    if kind in (FBGEMM_DYNAMIC, FBGEMM_STATIC):
        scale, zero_point = tensors["scale"], tensors["zero_point"]
        if meta["per_channel"]:
            qweight = torch._make_per_channel_quantized_tensor(tensors["qweight"], scale, zero_point, 0)
        else:
            qweight = torch._make_per_tensor_quantized_tensor(tensors["qweight"], float(scale), int(zero_point))
        if kind == FBGEMM_STATIC:
            module: Any = StaticQuantizedLinear(
                meta["in_features"],
                meta["out_features"],
                meta["input_scale"],
                meta["input_zero_point"],
                bias_=meta["bias"],
            )
        else:
            module = DynamicQuantizedLinear(meta["in_features"], meta["out_features"], bias_=meta["bias"])
        module.set_weight_bias(qweight, tensors.get("bias"))
        return module
    if kind in (TORCHAO_DYNAMIC, TORCHAO_STATIC):
        _quiet.import_torchao()
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        flat = {f"m.{k}": v for k, v in tensors.items() if k != "bias"}
        state, leftover = unflatten_tensor_state_dict(flat, dict(meta["torchao"]))
        if leftover or "m.weight" not in state:
            raise ValueError(f"torchao tensors did not rebuild an Int8Tensor weight (left over: {sorted(leftover)})")
        with torch.device("meta"):
            linear = nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"])
        linear.weight = nn.Parameter(state["m.weight"], requires_grad=False)
        if meta["bias"]:
            linear.bias = nn.Parameter(tensors["bias"], requires_grad=False)
        return linear
    raise ValueError(f"unknown int8 kind {kind!r}")


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
