"""TRL's RewardTrainer with prefq's length accounting: a model that scores answers, trained on pairs (the
Bradley-Terry loss, -log sigmoid(score(chosen) - score(rejected))), its held-out `accuracy` the share of pairs it
ranks right.

TRL drops the pairs whose chosen or rejected sequence exceeds `max_length` without a word (a score read from a cut
sequence would judge half an answer): here they are dropped and counted, with the split's `lengths` event, and a
split left with none is the user's error `rows_too_long` (`training.lengths`). The `basic` trainer only (the spec
refuses `fsdp` and `deepspeed-tp` for it).
"""

from __future__ import annotations

from trl import RewardTrainer
from trl.trainer.utils import global_then_local_main_first

from training import lengths


class PrefqRewardTrainer(RewardTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        with lengths.unlimited(args) as limit:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if limit is None:
            return dataset
        with global_then_local_main_first():
            sizes = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
            kept = [n <= limit for n in sizes]
            return lengths.keep(dataset_name, dataset, sizes, kept, limit)
