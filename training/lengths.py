"""What `max_length` does to a split's rows, said out loud: a `lengths` event per split (rows, how many are cut to
`max_length`, how many are dropped because nothing trainable would be left, and the token lengths seen), and a
user's error when no row is left, before any training step.

A row's length is its tokens after the chat template: DPO, the prompt and the longer of its two answers; SFT, the
whole sequence. DPO drops a row whose prompt alone fills `max_length` (the answers would be cut away); SFT drops a
row whose trainable tokens all lie beyond it. The trainers (`training.dpo`, `training.sft`) call `account` in
their dataset preparation, through `unlimited` and `keep`.
"""

from __future__ import annotations

import contextlib

from training.events import emit


class TooLong(ValueError):
    """No row of a split is left to train on at this `max_length`: the user's to fix (raise it, shorten rows)."""


def _pct(lengths: list[int], q: float) -> int:
    return lengths[min(len(lengths) - 1, int(q * len(lengths)))]


@contextlib.contextmanager
def unlimited(args):
    """TRL's preparation of a split with its `max_length` unset, so that TRL drops nothing: the trainer then cuts,
    drops and counts itself (`keep`). Yields the limit."""
    limit, args.max_length = args.max_length, None
    try:
        yield limit
    finally:
        args.max_length = limit


def keep(split: str, dataset, lengths: list[int], kept: list[bool], max_length: int):
    """`account` for the split, then the split without the rows that keep nothing to train on."""
    account(split, lengths, kept, max_length)
    return dataset if all(kept) else dataset.select([i for i, k in enumerate(kept) if k])


def account(split: str, lengths: list[int], kept: list[bool], max_length: int) -> None:
    """Emit the split's `lengths` event; `TooLong` when every row is dropped. `lengths[i]`: row i's tokens;
    `kept[i]`: whether row i keeps something to train on at `max_length`."""
    rows, left = len(lengths), sum(kept)
    ordered = sorted(lengths)
    stats = {"p50": _pct(ordered, 0.5), "p95": _pct(ordered, 0.95), "max": ordered[-1]} if ordered else {}
    truncated = sum(1 for n, k in zip(lengths, kept, strict=True) if k and n > max_length)
    emit("lengths", split=split, rows=rows, truncated=truncated, dropped=rows - left, max_length=max_length, **stats)
    if rows and not left:
        raise TooLong(
            f"max_length: no {split} row fits in max_length={max_length} tokens (after the chat template, "
            f"rows take {ordered[0]} to {ordered[-1]} tokens, median {stats['p50']}): raise max_length "
            "above the prompts' length, or shorten the prompts"
        )
