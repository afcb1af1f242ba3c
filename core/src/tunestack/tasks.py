"""The built-in tasks: how each reads data, encodes it, and scores a model.

Registered through the ``tasks`` plugin (``tunestack.builtin.tasks``) like any third-party task.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunestack.data import Example, detect_format, field_value, read_conll, read_records
from tunestack.errors import DataError
from tunestack.metrics import accuracy, per_label_report
from tunestack.stack import DataSettings

IGNORE = -100


@dataclass
class Encoded:
    features: list[dict[str, Any]]
    truncated: int  # examples that lost tokens to max_length


class Task:
    """Base class: subclasses define reading, encoding and scoring."""

    name = ""
    auto_class = "sequence-classification"
    has_labels = True

    # -- data ----------------------------------------------------------------------------------

    def read(self, path: Path, settings: DataSettings) -> list[Example]:
        raise NotImplementedError

    def label_set(self, train: Sequence[Example], settings: DataSettings) -> list[str]:
        if settings.labels:
            return list(settings.labels)
        return sorted({label for ex in train for label in self.labels_of(ex)})

    def labels_of(self, example: Example) -> list[str]:
        return []

    def check_labels(self, examples: Sequence[Example], labels: Sequence[str], split: str) -> None:
        known = set(labels)
        for ex in examples:
            for label in self.labels_of(ex):
                if label not in known:
                    raise DataError(
                        f"{ex.where}: label '{label}' does not occur in the training data "
                        f"(known: {', '.join(labels)}); list every label in data.labels"
                    )

    def example_from_text(self, text: str) -> Example:
        return Example(text=text, where="input")

    # -- tensors -------------------------------------------------------------------------------

    def encode(self, examples: Sequence[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> Encoded:
        raise NotImplementedError

    def collate(self, features: Sequence[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            if key not in features[0]:
                continue
            values = [f[key] for f in features]
            if key == "labels" and not isinstance(values[0], list):
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}[key]
            side = getattr(tokenizer, "padding_side", "right")
            padded = [
                (v + [fill] * (longest - len(v))) if side == "right" else ([fill] * (longest - len(v)) + v)
                for v in values
            ]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        return batch

    def batches(
        self, features: Sequence[dict[str, Any]], tokenizer: Any, batch_size: int, device: Any = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(features), batch_size):
            batch = self.collate(features[start : start + batch_size], tokenizer)
            yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor compared across a save/reload (logits)."""
        return model(**self.model_inputs(batch)).logits.float()

    def evaluate(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int,
        device: Any,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def predict(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def model_kwargs(self, labels: Sequence[str]) -> dict[str, Any]:
        if not self.has_labels:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }


class SequenceClassification(Task):
    name = "sequence-classification"
    auto_class = "sequence-classification"

    def read(self, path: Path, settings: DataSettings) -> list[Example]:
        fmt = detect_format(path, settings.format)
        if fmt == "conll":
            raise DataError(
                f"{path}: CoNLL column files hold token tags; sequence classification needs .tsv/.csv/.jsonl"
            )
        fields = settings.text_fields
        examples = []
        for number, record in read_records(path, fmt):
            where = f"{path}:{number}"
            texts = [field_value(record, f, path, number) for f in fields]
            label = field_value(record, settings.label, path, number)
            if label is None or str(label).strip() == "":
                raise DataError(f"{where}: the label is missing")
            for value, name in zip(texts, fields):
                if not isinstance(value, str):
                    raise DataError(f"{where}: field '{name}' must be text, got {type(value).__name__}")
            examples.append(
                Example(
                    text=texts[0].strip(),
                    text_pair=texts[1].strip() if len(texts) > 1 else None,
                    label=str(label).strip(),
                    where=where,
                )
            )
        if not examples:
            raise DataError(f"{path}: no examples")
        return examples

    def labels_of(self, example: Example) -> list[str]:
        return [example.label] if example.label is not None else []

    def encode(self, examples: Sequence[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> Encoded:
        texts = [ex.text or "" for ex in examples]
        pairs = [ex.text_pair for ex in examples]
        use_pairs = any(p is not None for p in pairs)
        args: tuple[Any, ...] = (texts, [p or "" for p in pairs]) if use_pairs else (texts,)
        full = tokenizer(*args, truncation=False, add_special_tokens=True)["input_ids"]
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        index = {label: i for i, label in enumerate(labels)}
        features = []
        for i, ex in enumerate(examples):
            feature = {k: enc[k][i] for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")}
            if ex.label is not None and ex.label in index:
                feature["labels"] = index[ex.label]
            features.append(feature)
        truncated = sum(len(f) > max_length for f in full)
        return Encoded(features, truncated)

    def evaluate(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int,
        device: Any,
    ) -> dict[str, Any]:
        encoded = self.encode(examples, tokenizer, labels, max_length)
        preds: list[str] = []
        for batch in self.batches(encoded.features, tokenizer, batch_size, device):
            logits = self.outputs(model, batch)
            preds.extend(labels[i] for i in logits.argmax(-1).tolist())
        gold = [ex.label or "" for ex in examples]
        report = per_label_report(gold, preds, labels)
        return {
            "accuracy": accuracy(gold, preds),
            "macro_f1": report["macro avg"]["f1"],
            "eval_examples": len(examples),
            "truncated_examples": encoded.truncated,
        }

    def predict(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        encoded = self.encode(examples, tokenizer, labels, max_length)
        results = []
        for batch in self.batches(encoded.features, tokenizer, batch_size):
            probs = self.outputs(model, batch).softmax(-1)
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                results.append({"label": labels[best], "score": row[best], "scores": dict(zip(labels, row))})
        for result, ex in zip(results, examples):
            result["text"] = ex.text
        return results


class TokenClassification(Task):
    name = "token-classification"
    auto_class = "token-classification"

    def read(self, path: Path, settings: DataSettings) -> list[Example]:
        fmt = detect_format(path, settings.format)
        examples = []
        if fmt == "conll":
            for number, tokens, tags in read_conll(path, settings.tag_column):
                examples.append(Example(tokens=tokens, tags=tags, where=f"{path}:{number}"))
        else:
            for number, record in read_records(path, fmt):
                where = f"{path}:{number}"
                tokens = field_value(record, settings.tokens, path, number)
                tags = field_value(record, settings.tags, path, number)
                if not isinstance(tokens, list) or not isinstance(tags, list):
                    raise DataError(f"{where}: '{settings.tokens}' and '{settings.tags}' must be lists")
                if len(tokens) != len(tags):
                    raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
                examples.append(Example(tokens=[str(t) for t in tokens], tags=[str(t) for t in tags], where=where))
        if not examples:
            raise DataError(f"{path}: no sentences")
        return examples

    def labels_of(self, example: Example) -> list[str]:
        return list(example.tags or [])

    def label_set(self, train: Sequence[Example], settings: DataSettings) -> list[str]:
        if settings.labels:
            return list(settings.labels)
        found = {tag for ex in train for tag in ex.tags or []}
        return sorted(found, key=lambda t: (t != "O", t[2:], t[:2]))

    def example_from_text(self, text: str) -> Example:
        return Example(tokens=text.split(), where="input")

    def encode(self, examples: Sequence[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> Encoded:
        words = [ex.tokens or [] for ex in examples]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        index = {label: i for i, label in enumerate(labels)}
        features = []
        truncated = 0
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            feature: dict[str, Any] = {
                k: enc[k][i] for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            seen: set[int] = set()
            label_ids = []
            for word in word_ids:
                if word is None or word in seen:
                    label_ids.append(IGNORE)
                else:
                    seen.add(word)
                    tag = (ex.tags or [])[word] if ex.tags else None
                    label_ids.append(index.get(tag, IGNORE) if tag is not None else IGNORE)
            if ex.tags is not None:
                feature["labels"] = label_ids
            feature["word_ids"] = word_ids
            if len(seen) < len(ex.tokens or []):
                truncated += 1
            features.append(feature)
        return Encoded(features, truncated)

    def collate(self, features: Sequence[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return super().collate([{k: v for k, v in f.items() if k != "word_ids"} for f in features], tokenizer)

    def _word_predictions(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int,
        device: Any,
    ) -> tuple[list[list[str]], int]:
        encoded = self.encode(examples, tokenizer, labels, max_length)
        predictions: list[list[str]] = []
        lost_words = 0
        for start in range(0, len(encoded.features), batch_size):
            chunk = encoded.features[start : start + batch_size]
            batch = {k: v.to(device) if device is not None else v for k, v in self.collate(chunk, tokenizer).items()}
            logits = self.outputs(model, batch)
            for row, feature, ex in zip(logits.argmax(-1).tolist(), chunk, examples[start : start + batch_size]):
                words = ["O"] * len(ex.tokens or [])
                seen: set[int] = set()
                for position, word in enumerate(feature["word_ids"]):
                    if word is not None and word not in seen:
                        seen.add(word)
                        words[word] = labels[row[position]]
                lost_words += len(words) - len(seen)
                predictions.append(words)
        return predictions, lost_words

    def evaluate(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int,
        device: Any,
    ) -> dict[str, Any]:
        from seqeval.metrics import classification_report as entity_report

        predictions, lost = self._word_predictions(model, examples, tokenizer, labels, max_length, batch_size, device)
        gold = [list(ex.tags or []) for ex in examples]
        entities = entity_report(gold, predictions, output_dict=True, zero_division=0)
        micro = entities.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        flat_gold = [t for sent in gold for t in sent]
        flat_pred = [t for sent in predictions for t in sent]
        tag_names = sorted(set(flat_gold) | set(labels), key=lambda t: (t == "O", t[2:], t[:2]))
        return {
            "entity_precision": float(micro["precision"]),
            "entity_recall": float(micro["recall"]),
            "entity_f1": float(micro["f1-score"]),
            "token_accuracy": accuracy(flat_gold, flat_pred),
            "entity_report": {
                k: {
                    "precision": float(v["precision"]),
                    "recall": float(v["recall"]),
                    "f1": float(v["f1-score"]),
                    "support": int(v["support"]),
                }
                for k, v in entities.items()
            },
            "tag_report": per_label_report(flat_gold, flat_pred, tag_names),
            "eval_examples": len(examples),
            "eval_tokens": len(flat_gold),
            "truncated_words": lost,
        }

    def predict(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        predictions, _ = self._word_predictions(model, examples, tokenizer, labels, max_length, batch_size, None)
        return [{"tokens": ex.tokens, "tags": tags} for ex, tags in zip(examples, predictions)]


class CausalLM(Task):
    name = "causal-lm"
    auto_class = "causal-lm"
    has_labels = False

    def read(self, path: Path, settings: DataSettings) -> list[Example]:
        fmt = detect_format(path, settings.format)
        if fmt == "conll":
            raise DataError(f"{path}: causal LM data must be JSONL with 'text' or 'prompt'/'completion'")
        examples = []
        for number, record in read_records(path, fmt):
            where = f"{path}:{number}"
            if settings.completion in record:
                prompt = record.get(settings.prompt, "")
                completion = record[settings.completion]
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise DataError(f"{where}: '{settings.prompt}' and '{settings.completion}' must be text")
                examples.append(Example(prompt=prompt, completion=completion, where=where))
            else:
                text = field_value(record, settings.text_fields[0], path, number)
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{where}: field '{settings.text_fields[0]}' must be non-empty text")
                examples.append(Example(prompt="", completion=text, where=where))
        if not examples:
            raise DataError(f"{path}: no examples")
        return examples

    def label_set(self, train: Sequence[Example], settings: DataSettings) -> list[str]:
        return []

    def example_from_text(self, text: str) -> Example:
        return Example(prompt=text, completion="", where="input")

    def encode(self, examples: Sequence[Example], tokenizer: Any, labels: Sequence[str], max_length: int) -> Encoded:
        features = []
        truncated = 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for ex in examples:
            prompt_ids = tokenizer(ex.prompt or "", add_special_tokens=False)["input_ids"] if ex.prompt else []
            completion_ids = tokenizer(ex.completion or "", add_special_tokens=False)["input_ids"] + eos
            if ex.prompt and not (ex.completion or ""):
                completion_ids = []
            ids = prompt_ids + completion_ids
            label_ids = [IGNORE] * len(prompt_ids) + completion_ids
            if len(ids) > max_length:
                truncated += 1
                ids, label_ids = ids[:max_length], label_ids[:max_length]
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label_ids})
        return Encoded(features, truncated)

    def evaluate(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int,
        device: Any,
    ) -> dict[str, Any]:
        encoded = self.encode(examples, tokenizer, labels, max_length)
        total_loss = 0.0
        total_tokens = 0
        for batch in self.batches(encoded.features, tokenizer, batch_size, device):
            logits = self.outputs(model, batch)
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = batch["labels"][:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
            total_loss += float(loss)
            total_tokens += int((shift_labels != IGNORE).sum())
        mean = total_loss / max(total_tokens, 1)
        return {
            "loss": mean,
            "perplexity": math.exp(min(mean, 50.0)),
            "eval_examples": len(examples),
            "eval_tokens": total_tokens,
            "truncated_examples": encoded.truncated,
        }

    def predict(
        self,
        model: Any,
        examples: Sequence[Example],
        tokenizer: Any,
        labels: Sequence[str],
        max_length: int,
        batch_size: int = 1,
        max_new_tokens: int = 20,
    ) -> list[dict[str, Any]]:
        results = []
        for ex in examples:
            ids = tokenizer(ex.prompt or "", return_tensors="pt", add_special_tokens=False)["input_ids"][
                :, -max_length:
            ]
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            results.append(
                {
                    "prompt": ex.prompt,
                    "completion": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
                }
            )
        return results
