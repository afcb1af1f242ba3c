"""Prompt tuning: ``P`` learned virtual-token embeddings in front of every input.

The math is peft's ``PromptTuning`` (``inputs_embeds = [prompt; embed(input_ids)]``, attention mask
and token types extended, virtual tokens never labelled), but the injection keeps ``input_ids``:
the input ids get ``P`` placeholder ids in front, and a forward hook on the input embedding
replaces the placeholders' embeddings with the learned prompt. So

* GPT-2/Llama sequence classification still finds the last real token from ``input_ids`` (with
  peft's ``inputs_embeds`` route it pools the last *position*, a pad token in a right-padded batch);
* token classification gets its labels padded with -100 for the virtual positions, and the
  logits of the virtual positions are cut off, so logits keep the input's length (core aligns them
  to word ids; peft returns ``P + L`` positions and does not pad the labels);
* causal LM logits keep the input's length too (core shifts them against the labels), and
  ``generate`` returns the input ids plus the new tokens, as a plain model does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunestack_prefix._common import IGNORE


class PromptModel(nn.Module):
    """A Hugging Face model with ``P`` learned virtual tokens prepended to its input."""

    backend = "prompt"

    def __init__(self, base: Any, prompt: torch.Tensor, virtual_token_id: int, kind: str) -> None:
        super().__init__()
        self.base = base
        self.prompt = nn.Parameter(prompt.detach().clone().to(device=_device(base), dtype=torch.float32))
        self.virtual_token_id = int(virtual_token_id)
        self.kind = kind
        self._pending = False
        self._hook = base.get_input_embeddings().register_forward_hook(self._inject)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def config(self) -> Any:
        return self.base.config

    def get_input_embeddings(self) -> Any:
        return self.base.get_input_embeddings()

    def _inject(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._pending:
            return None
        self._pending = False  # only the first embedding call of a forward/generate (the prefill)
        count = self.num_virtual_tokens
        if output.dim() != 3 or output.shape[1] < count:
            raise RuntimeError("prompt tuning: the embedding call does not hold the virtual tokens")
        prompt = self.prompt.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([prompt, output[:, count:]], dim=1)

    def _extend(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ids = inputs["input_ids"]
        batch, count = ids.shape[0], self.num_virtual_tokens
        out = dict(inputs)
        out["input_ids"] = torch.cat([ids.new_full((batch, count), self.virtual_token_id), ids], dim=1)
        mask = inputs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = torch.cat([mask.new_ones((batch, count)), mask], dim=1)
        types = inputs.get("token_type_ids")
        if types is not None:
            out["token_type_ids"] = torch.cat([types.new_zeros((batch, count)), types], dim=1)
        positions = inputs.get("position_ids")
        if positions is not None:
            head = torch.arange(count, device=positions.device, dtype=positions.dtype).expand(batch, -1)
            out["position_ids"] = torch.cat([head, positions + count], dim=1)
        labels = inputs.get("labels")
        if labels is not None and self.kind in ("token", "causal"):
            out["labels"] = torch.cat([labels.new_full((batch, count), IGNORE), labels], dim=1)
        return out

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if input_ids is None:
            raise ValueError("prompt tuning needs input_ids (inputs_embeds is not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("prompt tuning: pass input_ids, not inputs_embeds")
        inputs = self._extend({"input_ids": input_ids, **kwargs})
        self._pending = True
        try:
            out = self.base(**inputs)
        finally:
            self._pending = False
        logits = getattr(out, "logits", None)
        if logits is not None and self.kind in ("token", "causal"):
            out.logits = logits[:, self.num_virtual_tokens :]
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        inputs = self._extend({"input_ids": input_ids, "attention_mask": attention_mask})
        self._pending = True
        try:
            out = self.base.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), **kwargs
            )
        finally:
            self._pending = False
        return out[:, self.num_virtual_tokens :]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt.detach().float().cpu().contiguous()}

    def unwrap(self) -> Any:
        """Take the prompt off: the base model, unchanged except for what trained in it (the head)."""
        self._hook.remove()
        return self.base


def embeddings_of(base: Any, ids: list[int]) -> torch.Tensor:
    weight = base.get_input_embeddings().weight
    return weight.detach()[torch.tensor(ids, device=weight.device)].float().clone()


def _device(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
