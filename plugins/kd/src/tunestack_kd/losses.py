"""The distillation losses, as plain functions of tensors (imported lazily: this module needs torch).

* :func:`soft_kl` — ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the
  positions a mask keeps (examples for sequence classification, labelled tokens otherwise);
* :func:`kd_loss` — ``alpha * task + (1 - alpha) * soft_kl``;
* :func:`align_logits` — which positions are compared for each task (token classification: labels
  != -100; causal LM: the shifted next-token positions the task loss uses);
* :func:`hidden_mse` and :func:`attention_loss` — the optional intermediate terms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * mean over kept positions of KL(softmax(t/T) || softmax(s/T))`` (classes on the last dim).

    ``mask`` (bool, the logits' shape without the class dimension) selects the positions; without
    it every position counts (one per example for sequence classification: ``batchmean``).
    """
    t = float(temperature)
    classes = student_logits.size(-1)
    if mask is not None:
        student = student_logits[mask]
        teacher = teacher_logits[mask]
    else:
        student = student_logits.reshape(-1, classes)
        teacher = teacher_logits.reshape(-1, classes)
    if student.shape[0] == 0:  # nothing labelled in this batch: a zero that keeps the graph
        return student_logits.sum() * 0.0
    log_student = F.log_softmax(student.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher.float().detach() / t, dim=-1)
    per_position = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1)
    return per_position.mean() * (t * t)


def kd_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha * task + (1 - alpha) * soft, soft)``; ``alpha = 1`` returns the task loss itself."""
    soft = soft_kl(student_logits, teacher_logits, temperature, mask)
    if alpha >= 1.0:
        return task_loss, soft
    if alpha <= 0.0:
        return soft, soft
    return alpha * task_loss + (1.0 - alpha) * soft, soft


def align_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student logits, teacher logits and the mask of positions to compare.

    * one row per example (sequence classification): no mask;
    * per token (token classification): positions whose label is not -100 (padding, special
      tokens and non-first subwords are ignored, as in the task loss);
    * causal LM: position ``i`` predicts token ``i + 1``, so logits ``[:, :-1]`` are compared where
      ``labels[:, 1:] != -100`` (prompt tokens and padding are ignored, as in the task loss).
      When the vocabularies differ only by padding rows, the common part is compared.
    """
    if student_logits.dim() == 2:
        return student_logits, teacher_logits, None
    if causal:
        vocab = min(student_logits.size(-1), teacher_logits.size(-1))
        student_logits = student_logits[:, :-1, :vocab]
        teacher_logits = teacher_logits[:, :-1, :vocab]
        if labels is not None:
            mask = labels[:, 1:] != IGNORE
        elif attention_mask is not None:
            mask = attention_mask[:, 1:].bool()
        else:
            mask = None
        return student_logits, teacher_logits, mask
    if labels is not None and labels.shape == student_logits.shape[:2]:
        mask = labels != IGNORE
    elif attention_mask is not None:
        mask = attention_mask.bool()
    else:
        mask = None
    return student_logits, teacher_logits, mask


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None,
    projection: Any = None,
) -> torch.Tensor:
    """Mean squared error between hidden states, per token over the width, averaged over ``mask``.

    ``projection`` (a linear layer) maps the student's width to the teacher's when they differ.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    per_token = (student_hidden.float() - teacher_hidden.float().detach()).pow(2).mean(-1)
    if mask is not None:
        kept = per_token[mask.bool()]
        return kept.mean() if kept.numel() else per_token.sum() * 0.0
    return per_token.mean()


def attention_loss(
    student_maps: torch.Tensor,
    teacher_maps: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str = "mse",
) -> torch.Tensor:
    """Distance between attention maps ``[batch, heads, queries, keys]``, averaged over heads and
    the query positions ``mask`` keeps (``[batch, queries]``).

    ``mse``: mean squared difference over keys; ``kl``: KL(teacher row || student row) over keys.
    """
    student = student_maps.float()
    teacher = teacher_maps.float().detach()
    if kind == "kl":
        per_query = F.kl_div(torch.log(student.clamp_min(1e-12)), teacher, reduction="none").sum(-1)
    else:
        per_query = (student - teacher).pow(2).mean(-1)
    if mask is not None:
        keep = mask.bool()[:, None, :].expand_as(per_query)
        kept = per_query[keep]
        return kept.mean() if kept.numel() else per_query.sum() * 0.0
    return per_query.mean()
