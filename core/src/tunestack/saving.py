"""The return type of ``tunestack_save``: kept apart so the hook spec imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Saved:
    """A method saved its part of the model.

    ``model`` is what remains once this method's transform is peeled off (the unwrapped model).
    ``claimed`` lists state-dict keys of ``model`` that the method stored itself (quantized weights,
    for instance): core leaves them out of the base weights and they are restored by
    ``tunestack_rebuild``.
    """

    model: Any
    claimed: set[str] = field(default_factory=set)
