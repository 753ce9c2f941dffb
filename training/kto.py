"""TRL's KTOTrainer (Ethayarajh et al. 2024) with prefq's length accounting: single answers labelled desirable or
not, or pairs unrolled into them (`training.data`), against a frozen reference (or the base under LoRA).

TRL's collator cuts each sequence to `max_length` from its start, so a row whose prompt fills `max_length` keeps no
answer token and trains on nothing: those rows are counted and dropped here, with the split's `lengths` event, and a
split left with none is the user's error `rows_too_long` (`training.lengths`). The `basic` trainer only: this
subclass adds nothing for `fsdp` or `deepspeed-tp` (the spec refuses them for KTO).
"""

from __future__ import annotations

from trl import KTOTrainer
from trl.trainer.utils import global_then_local_main_first

from training import lengths


class PrefqKTOTrainer(KTOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        limit = args.max_length
        if limit is None:
            return dataset
        with global_then_local_main_first():
            prompts = [len(ids) for ids in dataset["prompt_ids"]]
            sizes = [p + len(c) for p, c in zip(prompts, dataset["completion_ids"], strict=True)]
            kept = [p < limit for p in prompts]
            return lengths.keep(dataset_name, dataset, sizes, kept, limit)
