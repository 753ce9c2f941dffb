"""What an evaluation run computes from texts, torch-free: reference metrics, pairwise verdicts and their win rate
with a bootstrap interval.

Reference metrics compare a model's answer with the row's reference answer:
- `exact_match`: 1 when both are equal after SQuAD's normalisation (lower case, punctuation and the articles a, an,
  the removed, white space collapsed), else 0;
- `f1`: SQuAD's token F1 on the same normalised words (the harmonic mean of precision and recall of the common
  words, counted with multiplicity);
- `rouge_l`: ROUGE-L's F-measure (beta 1) from the longest common subsequence of the words (lower case, punctuation
  removed);
- `bleu`: corpus BLEU-4 (Papineni et al. 2002) on the same words: the geometric mean of the clipped 1- to 4-gram
  precisions summed over the corpus, times the brevity penalty, no smoothing (0 when an order has no match);
- perplexity is the model's, computed where the model is (`training.evaluate`).

A pairwise judge is asked twice per prompt, the answers in both orders, so that a judge that prefers a position
cancels out: each order scores 1 for a win of the model, 0.5 for a tie (or a reply that names neither), 0 for a
loss, and the prompt's score is the mean of its two orders. The win rate is the mean over prompts, and its interval
the percentile bootstrap over prompts (seeded).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter

METRICS = ("exact_match", "f1", "rouge_l", "bleu", "perplexity", "reward_accuracy")
_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation (ROUGE-L's and BLEU's tokens)."""
    return text.lower().translate(_PUNCT).split()


def squad_words(text: str) -> list[str]:
    """SQuAD's normalised words: `words` without the articles."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(squad_words(prediction) == squad_words(reference))


def f1(prediction: str, reference: str) -> float:
    pred, ref = squad_words(prediction), squad_words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    lcs = _lcs(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: list[str], references: list[str], max_order: int = 4) -> float:
    """Corpus BLEU of `predictions` against one reference each, in [0, 1]."""
    matches, totals = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = words(prediction), words(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_order + 1):
            mine, theirs = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum((mine & theirs).values())
            totals[n - 1] += sum(mine.values())
    if pred_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def reference_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The means of exact match, F1 and ROUGE-L, and corpus BLEU."""
    n = len(predictions)
    if n == 0:
        return {}
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / n,
        "f1": sum(f1(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "bleu": bleu(predictions, references),
    }


# The pairwise judge's question; {prompt}, {first} and {second} are filled in. The reply names "A", "B" or "tie".
JUDGE_TEMPLATE = (
    "Which answer to the request is better: more correct, more helpful, more honest?\n\n"
    "Request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
    'Reply with one word: "A", "B", or "tie".'
)
# The answers by their capital letters (the article "a" is no verdict), a tie in any case
_VERDICT = re.compile(r"\b(A|B)\b|\b([Tt][Ii][Ee])\b")


def verdict(reply: str) -> str | None:
    """The verdict "A", "B" or "tie" of a judge's reply: the whole reply when it is one of them ("a", "b." or
    "**B**"), else the first capital A or B or "tie" it names; None when it names none."""
    bare = (reply or "").strip().strip("*_.:!\"'`() ").lower()
    if bare in ("a", "b", "tie"):
        return "tie" if bare == "tie" else bare.upper()
    found = _VERDICT.search(reply or "")
    if found is None:
        return None
    return "tie" if found.group(2) else found.group(1)


def pair_score(first_order: str | None, second_order: str | None) -> float:
    """The model's score on one prompt from the judge's verdicts: the model's answer is A in the first order and B in
    the second. A reply that names neither counts as a tie."""

    def score(v: str | None, mine: str) -> float:
        return 0.5 if v in (None, "tie") else float(v == mine)

    return (score(first_order, "A") + score(second_order, "B")) / 2


def bootstrap_interval(
    values: list[float], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values`."""
    if not values:
        return (math.nan, math.nan)
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    lo = means[min(resamples - 1, int(math.floor(tail * resamples)))]
    hi = means[min(resamples - 1, int(math.ceil((1 - tail) * resamples)) - 1)]
    return (lo, hi)


def win_rate(scores: list[float], resamples: int = 1000, seed: int = 0) -> dict:
    """The win rate of the model over prompts (ties half), its 95% interval, and wins, ties and losses by prompt."""
    if not scores:
        return {"win_rate": None, "interval": None, "wins": 0, "ties": 0, "losses": 0, "prompts": 0}
    lo, hi = bootstrap_interval(scores, resamples, 0.95, seed)
    return {
        "win_rate": sum(scores) / len(scores),
        "interval": [lo, hi],
        "wins": sum(s > 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "prompts": len(scores),
    }
