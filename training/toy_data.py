"""Synthetic data with a learnable signal, so that tests and demos need no download.

DPO: "What is a plus b?" with chosen "The answer is {a+b}." and rejected off by 10 to 20 (a small model
learns this in a few dozen steps; off by 1 to 3 it does not). SFT: the same prompts with the right answer. RFT (GRPO): the prompts with the right number as `answer`, for a grader.
`context_words` puts filler text before the question, to make long sequences for benchmarks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MAX_OPERAND = 5  # sums below 9: a wrong answer off by 10 to 20 has two digits or a sign

FILLER = (
    "the a of and to in is was for on that with as by at from this be it are or an which have has had not "
    "but all were when we there can been one if more will would who so about out up them some could into "
    "than then its time only new two may first any these other like over such our how most also made after "
    "well way even back just where much many before must through those years right still own see men work "
    "long here both between life being under never day same another know while last might great old year off "
    "come since against go came around three small however large world end home number part high small "
    "river stone garden window market letter winter summer morning evening table paper light water field"
).split()


def question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def answer(n: int) -> str:
    return f" The answer is {n}."


def toy_rows(method: str, rows: int, seed: int, context_words: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
        prompt = question(a, b)
        if context_words:
            prompt = " ".join(rng.choice(FILLER) for _ in range(context_words)) + ". " + prompt
        if method == "dpo":
            wrong = a + b + rng.choice((-1, 1)) * rng.randint(10, 20)
            out.append({"prompt": prompt, "chosen": answer(a + b), "rejected": answer(wrong)})
        elif method == "sft":
            out.append({"prompt": prompt, "completion": answer(a + b)})
        elif method == "kto":  # thumbs up or down on one answer: right ones desirable, about a third wrong
            wrong = rng.random() < 1 / 3
            total = a + b + (rng.choice((-1, 1)) * rng.randint(10, 20) if wrong else 0)
            out.append({"prompt": prompt, "completion": answer(total), "label": not wrong})
        elif method == "rft":  # a prompt and the reference its grader reads ({{item.answer}})
            out.append({"prompt": prompt, "answer": str(a + b)})
        else:
            raise ValueError(f"Unknown method: {method}")
    return out


def write_toy_data(path: str | Path, method: str, rows: int, seed: int, context_words: int = 0) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in toy_rows(method, rows, seed, context_words)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    """Local text to train the tiny tokenizer on: the toy questions and answers, and filler prose."""
    rng = random.Random(seed)
    text = [f"{question(a, b)}{answer(a + b)}" for a in range(0, 100, 3) for b in range(0, 100, 7)]
    text += [str(n) for n in range(200)]
    text += [" ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 20))) + "." for _ in range(sentences)]
    return text
