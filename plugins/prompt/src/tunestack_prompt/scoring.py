"""The prompt wrapper: a classifier whose logits come from templates and verbalizers.

Imports torch; the plugin module imports it only inside hooks. No parameter is trained: label
embeddings, class prototypes, in-context token ids and verbalizer token ids are buffers, saved as
safetensors beside a JSON description.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

SETTINGS_FILE = "prompt.json"
TENSORS_FILE = "prompt.safetensors"

BUFFERS: dict[str, tuple[str, ...]] = {
    "similarity": ("label_vectors", "description_vectors", "prototypes"),
    "lm": ("prefix_ids", "verbalizer_ids", "verbalizer_lengths", "verbalizer_labels"),
    "cloze": ("prefix_ids", "verbalizer_ids", "verbalizer_lengths", "verbalizer_labels"),
}

#: sequences per forward pass when full-vocabulary logits must be materialised
CHUNK_ELEMENTS = 2**26


class PromptClassifier(nn.Module):
    """Wraps a Hugging Face model (``inner``) and scores each label through the prompt.

    ``settings`` is JSON (mode, labels, token layout, ...); ``tensors`` are the buffers of the mode
    (see :data:`BUFFERS`).
    """

    inner: nn.Module
    label_vectors: torch.Tensor
    description_vectors: torch.Tensor
    prototypes: torch.Tensor
    prefix_ids: torch.Tensor
    verbalizer_ids: torch.Tensor
    verbalizer_lengths: torch.Tensor
    verbalizer_labels: torch.Tensor

    def __init__(self, inner: nn.Module, settings: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.settings = dict(settings)
        self.mode = str(settings["scoring"])
        self.num_labels = len(settings["labels"])
        missing = [name for name in BUFFERS[self.mode] if name not in tensors]
        if missing:
            raise ValueError(f"prompt wrapper ({self.mode}) needs tensors {missing}")
        for name in BUFFERS[self.mode]:
            self.register_buffer(name, tensors[name].detach().clone())
        self._keeps_logits: bool | None = None

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """``.logits`` [batch, num_labels]; ``.loss`` (cross-entropy) when ``labels`` are given."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.mode == "similarity":
            logits = self.similarity_logits(input_ids, attention_mask, token_type_ids)
        elif self.mode == "lm":
            logits = self.aggregate(self.lm_scores(input_ids, attention_mask))
        else:
            logits = self.aggregate(self.cloze_scores(input_ids, attention_mask, token_type_ids))
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # -- similarity ----------------------------------------------------------------------------

    def similarity_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        pooled = embed(self.inner, input_ids, attention_mask, token_type_ids)
        vectors = self.label_vectors.to(pooled.dtype)
        return pooled @ vectors.T / float(self.settings["temperature"])

    # -- causal LM -----------------------------------------------------------------------------

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, strip_tail: bool) -> list[torch.Tensor]:
        """Each example's tokens without padding, the in-context prefix after the leading specials,
        and (for LM scoring) without the trailing special tokens a BERT-style tokenizer adds."""
        head = int(self.settings["head"])
        tail = int(self.settings["tail"]) if strip_tail else 0
        prefix = self.prefix_ids.to(input_ids.device)
        found = []
        for ids, mask in zip(input_ids, attention_mask):
            ids = ids[mask.bool()]
            end = max(ids.numel() - tail, min(head, ids.numel()))
            row = torch.cat([ids[:head], prefix, ids[head:end]])
            if row.numel() == 0:
                row = torch.tensor([int(self.settings["start_id"])], dtype=ids.dtype, device=ids.device)
            found.append(row)
        return found

    def lm_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of every verbalizer after each prompt: [batch, verbalizers]."""
        rows = self.rows(input_ids, attention_mask, strip_tail=True)
        lengths = [int(n) for n in self.verbalizer_lengths.tolist()]
        words = [self.verbalizer_ids[v, :n] for v, n in enumerate(lengths)]
        longest = max(lengths)
        if longest == 1:  # one pass per example; every verbalizer is read at the last position
            ids, mask = left_pad(rows, [None] * len(rows), 0, int(self.settings["pad_id"]))
            logits = self.last_logits(ids, mask, 1)[:, -1].float().log_softmax(-1)
            return logits[:, self.verbalizer_ids[:, 0].to(logits.device)]
        pairs = [(row, word) for row in rows for word in words]
        ids, mask = left_pad([p[0] for p in pairs], [p[1] for p in pairs], longest, int(self.settings["pad_id"]))
        logits = self.last_logits(ids, mask, longest + 1)[:, :-1].float().log_softmax(-1)  # [N, longest, vocab]
        targets = torch.zeros(len(pairs), longest, dtype=torch.long, device=logits.device)
        valid = torch.zeros(len(pairs), longest, dtype=torch.bool, device=logits.device)
        for i, (_, word) in enumerate(pairs):
            targets[i, : word.numel()] = word
            valid[i, : word.numel()] = True
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0).sum(-1)
        if self.settings.get("length_normalize", True):
            picked = picked / valid.sum(-1).clamp(min=1)
        return picked.view(len(rows), len(words))

    def last_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions (left-padded input), without materialising the
        whole vocabulary for every position when the model supports ``logits_to_keep``."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._keeps_logits is None:
            self._keeps_logits = "logits_to_keep" in inspect.signature(self.inner.forward).parameters
        outputs = []
        width = keep if self._keeps_logits else ids.shape[1]
        per_chunk = max(1, CHUNK_ELEMENTS // max(1, width * _vocab(self.inner)))
        for start in range(0, ids.shape[0], per_chunk):
            part = slice(start, start + per_chunk)
            kwargs: dict[str, Any] = {
                "input_ids": ids[part],
                "attention_mask": mask[part],
                "position_ids": positions[part],
                "use_cache": False,
            }
            if self._keeps_logits:
                kwargs["logits_to_keep"] = keep
            outputs.append(self.inner(**kwargs).logits[:, -keep:])
        return torch.cat(outputs)

    # -- cloze ---------------------------------------------------------------------------------

    def cloze_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Log-probability of every verbalizer token at the mask: [batch, verbalizers]."""
        if self.prefix_ids.numel():
            rows = self.rows(input_ids, attention_mask, strip_tail=False)
            ids, mask = right_pad(rows, int(self.settings["pad_id"]))
            types = None
        else:
            ids, mask, types = input_ids, attention_mask, token_type_ids
        mask_id = int(self.settings["mask_id"])
        is_mask = ids == mask_id
        has_mask = is_mask.any(-1)
        where = is_mask.int().argmax(-1)
        vocab = _vocab(self.inner)
        per_chunk = max(1, CHUNK_ELEMENTS // max(1, ids.shape[1] * vocab))
        picked = []
        for start in range(0, ids.shape[0], per_chunk):
            part = slice(start, start + per_chunk)
            kwargs: dict[str, Any] = {"input_ids": ids[part], "attention_mask": mask[part]}
            if types is not None and _type_vocab(self.inner):
                kwargs["token_type_ids"] = types[part]
            logits = self.inner(**kwargs).logits
            index = torch.arange(logits.shape[0], device=logits.device)
            picked.append(logits[index, where[part].to(logits.device)].float().log_softmax(-1))
        at_mask = torch.cat(picked)
        scores = at_mask[:, self.verbalizer_ids[:, 0].to(at_mask.device)]
        return scores.masked_fill(~has_mask.to(scores.device).unsqueeze(-1), 0.0)  # no mask left: no preference

    # -- shared --------------------------------------------------------------------------------

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        """Label score = log of the mean probability of its verbalizers."""
        return aggregate(scores, self.verbalizer_labels.to(scores.device), self.num_labels)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def aggregate(scores: torch.Tensor, verbalizer_labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    member = F.one_hot(verbalizer_labels.long(), num_labels).T.bool()  # [labels, verbalizers]
    expanded = scores.unsqueeze(1).expand(-1, num_labels, -1).masked_fill(~member, float("-inf"))
    return torch.logsumexp(expanded, -1) - member.sum(-1).clamp(min=1).float().log()


def embed(
    inner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalised last hidden states."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None and _type_vocab(inner):
        kwargs["token_type_ids"] = token_type_ids
    outputs = inner(**kwargs, output_hidden_states=True, return_dict=True)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs.hidden_states[-1]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def left_pad(
    rows: Sequence[torch.Tensor], tails: Sequence[torch.Tensor | None], tail_width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows aligned on their last token (left padding), each followed by its tail and right padding
    up to ``tail_width``, so every tail starts in the same column."""
    width = max(r.numel() for r in rows)
    device = rows[0].device
    ids = torch.full((len(rows), width + tail_width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, (row, tail) in enumerate(zip(rows, tails)):
        ids[i, width - row.numel() : width] = row
        mask[i, width - row.numel() : width] = 1
        if tail is not None and tail.numel():
            ids[i, width : width + tail.numel()] = tail.to(device)
            mask[i, width : width + tail.numel()] = 1
    return ids, mask


def right_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    return ids, mask


def _vocab(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 0) or 50000)


def _type_vocab(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "type_vocab_size", 0) or 0)


def special_layout(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a single text."""
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start, len(full) - start - len(plain)
    return 0, 0


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@torch.no_grad()
def embed_texts(
    inner: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str | None] | None,
    max_length: int,
    batch_size: int,
) -> torch.Tensor:
    """Embeddings of texts (pairs encoded as the task encodes them), [len(texts), hidden]."""
    device = model_device(inner)
    found = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        chunk_pairs = list(pairs[start : start + batch_size]) if pairs is not None else None
        args: tuple[Any, ...] = (chunk,)
        if chunk_pairs is not None and any(p is not None for p in chunk_pairs):
            args = (chunk, [p or "" for p in chunk_pairs])
        enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        found.append(
            embed(
                inner,
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device),
                enc["token_type_ids"].to(device) if "token_type_ids" in enc else None,
            )
        )
    return torch.cat(found)


def _mean_direction(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.mean(0), dim=-1)


def build_similarity(
    inner: nn.Module,
    tokenizer: Any,
    settings: dict[str, Any],
    descriptions: Mapping[str, Sequence[str]],
    shots: Mapping[str, Sequence[tuple[str, str | None]]],
    max_length: int,
    batch_size: int,
) -> PromptClassifier:
    """Label vectors = mean description embedding, mixed with the class prototype when shots > 0."""
    labels = settings["labels"]
    weight = float(settings["prototype_weight"])
    desc, protos, combined = [], [], []
    inner.eval()
    for label in labels:
        d = _mean_direction(embed_texts(inner, tokenizer, list(descriptions[label]), None, max_length, batch_size))
        examples = list(shots.get(label, []))
        if examples:
            p = _mean_direction(
                embed_texts(
                    inner, tokenizer, [t for t, _ in examples], [q for _, q in examples], max_length, batch_size
                )
            )
            c = F.normalize((1.0 - weight) * d + weight * p, dim=-1)
        else:
            p = torch.zeros_like(d)
            c = d
        desc.append(d)
        protos.append(p)
        combined.append(c)
    tensors = {
        "label_vectors": torch.stack(combined),
        "description_vectors": torch.stack(desc),
        "prototypes": torch.stack(protos),
    }
    return PromptClassifier(inner, settings, tensors)


def _verbalizer_tensors(word_ids: Sequence[Sequence[int]], owners: Sequence[int]) -> dict[str, torch.Tensor]:
    longest = max(len(w) for w in word_ids)
    ids = torch.zeros(len(word_ids), longest, dtype=torch.long)
    for i, word in enumerate(word_ids):
        ids[i, : len(word)] = torch.tensor(word, dtype=torch.long)
    return {
        "verbalizer_ids": ids,
        "verbalizer_lengths": torch.tensor([len(w) for w in word_ids], dtype=torch.long),
        "verbalizer_labels": torch.tensor(list(owners), dtype=torch.long),
    }


def build_token_scorer(
    inner: nn.Module,
    settings: dict[str, Any],
    word_ids: Sequence[Sequence[int]],
    owners: Sequence[int],
    prefix_ids: Sequence[int],
) -> PromptClassifier:
    """The wrapper of ``lm`` and ``cloze`` scoring, from token ids worked out by the caller."""
    device = model_device(inner)
    tensors = {k: v.to(device) for k, v in _verbalizer_tensors(word_ids, owners).items()}
    tensors["prefix_ids"] = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)
    return PromptClassifier(inner, settings, tensors)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def save_wrapper(wrapper: PromptClassifier, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: buf.detach().to("cpu").contiguous() for name, buf in wrapper.named_buffers(recurse=False)}
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": "tunestack-prompt/1"})
    (folder / SETTINGS_FILE).write_text(json.dumps(wrapper.settings, indent=2) + "\n", encoding="utf-8")


def load_wrapper(inner: nn.Module, folder: Path) -> PromptClassifier:
    from safetensors.torch import load_file

    settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / TENSORS_FILE))
    device = model_device(inner)
    wrapper = PromptClassifier(inner, settings, {k: v.to(device) for k, v in tensors.items()})
    return wrapper


def log_mean_exp(values: Sequence[float]) -> float:
    """log(mean(exp(values))), as :func:`aggregate` computes it (used by tests)."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))
