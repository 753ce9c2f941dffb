"""Training and evaluation splits as `datasets.Dataset`, and token-length statistics for a report."""

from __future__ import annotations

import random

from datasets import Dataset

from training.chat import tools_of, trained_spans
from training.formats import read_examples
from training.spec import SpecError, TrainingSpec


def _read(path: str, method: str, field: str) -> list[dict]:
    try:
        return read_examples(path, method, source=f"{field} {path}")
    except OSError as exc:
        raise SpecError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None


def load_splits(spec: TrainingSpec) -> tuple[Dataset, Dataset | None]:
    """Train and eval datasets of normalised rows; eval is split off train when no eval_file is given."""
    train = _read(spec.train_file, spec.data_kinds, "train_file")
    if spec.eval_file:
        held_out = _read(spec.eval_file, spec.data_kinds, "eval_file")
    elif spec.eval_fraction > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(spec.seed).shuffle(order)
        n_eval = max(1, round(len(train) * spec.eval_fraction))
        held_out = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    else:
        held_out = []
    if spec.method == "kto":  # after the split: a pair's two halves stay on one side of it
        train, held_out = _kto_rows(train, spec.seed), _kto_rows(held_out, spec.seed)
    return Dataset.from_list(train), (Dataset.from_list(held_out) if held_out else None)


def _kto_rows(rows: list[dict], seed: int) -> list[dict]:
    """KTO's rows, in a seeded random order: pairs unrolled into their chosen answer (desirable) and their rejected
    one (undesirable). TRL's KTO reads its batches in order and estimates the KL term from each row's prompt with
    the next row's answer, so rows of one prompt, or of one label, must not sit side by side."""
    out = []
    for row in rows:
        if "chosen" in row:
            out += [
                {"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                {"prompt": row["prompt"], "completion": row["rejected"], "label": False},
            ]
        else:
            out.append(row)
    random.Random(seed).shuffle(out)
    return out


def _texts(example: dict, tokenizer) -> list[str]:
    """The full sequences a row trains on, rendered as text."""

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    if "chosen" in example:
        if isinstance(example["prompt"], list):
            return [render(example["prompt"] + example[k]) for k in ("chosen", "rejected")]
        return [example["prompt"] + example[k] for k in ("chosen", "rejected")]
    if "messages" in example:
        return [trained_spans(tokenizer, example["messages"], tools_of(example))[0]]
    if "text" in example:
        return [example["text"]]
    if isinstance(example["prompt"], list):  # SFT's and KTO's prompt and completion
        return [render(example["prompt"] + example["completion"])]
    return [example["prompt"] + example["completion"]]


def token_length_stats(examples: list[dict], tokenizer, max_length: int) -> dict:
    """p50/p95/max of the longest sequence per row, and how many rows `max_length` would cut."""
    lengths = sorted(
        max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in _texts(ex, tokenizer))
        for ex in examples
    )
    if not lengths:
        return {}

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    return {
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": lengths[-1],
        "max_length": max_length,
        "truncated_rows": sum(n > max_length for n in lengths),
    }
