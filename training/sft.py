"""TRL's SFTTrainer, runnable under the fsdp and deepspeed-tp trainers, telling how `max_length` treats the rows.

Conversations (`messages` rows, with tools, tool calls and weights) are tokenized here, through the model's chat
template, with the mask of OpenAI's rule (`training.chat`): TRL then builds the labels from `assistant_masks`.

Padding-free (`padding_free`, on by default where the model takes `training.packing`'s varlen attention): TRL's
collator flattens each batch into one row with per-sequence position ids and the sequence boundaries
(`cu_seq_lens_q`), which that attention reads, so no token attends across sequences and none is padding. TRL
refuses `max_length` with padding-free batches; its own stays unset and `max_length` is applied here, where rows
are cut, dropped and counted anyway.
"""

from trl import SFTTrainer
from trl.trainer.utils import global_then_local_main_first

from training import chat, lengths
from training.distributed import DistributedTrainerMixin


class PrefqSFTTrainer(DistributedTrainerMixin, SFTTrainer):
    def __init__(self, *args, max_length: int | None, **kwargs):
        self.length_limit = max_length  # set before TRL's constructor, which prepares the datasets
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # TRL cuts rows to max_length and drops those left without a trainable token, without a word: prefq
        # prepares them whole, then cuts (TRL's way: `truncation_mode`), drops and counts itself.
        if "messages" in dataset.column_names:
            with global_then_local_main_first():
                dataset = dataset.map(
                    lambda row: dict(
                        zip(
                            ("input_ids", "assistant_masks"),
                            chat.tokenize(processing_class, row["messages"], chat.tools_of(row)),
                            strict=True,
                        )
                    ),
                    remove_columns=dataset.column_names,
                    desc=f"Rendering {dataset_name} conversations",
                )
        limit = self.length_limit
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if limit is None or packing:
            return dataset
        cut = slice(None, limit) if args.truncation_mode == "keep_start" else slice(-limit, None)
        with global_then_local_main_first():
            sizes = [len(ids) for ids in dataset["input_ids"]]
            kept = [any(label != -100 for label in labels[cut]) for labels in dataset["labels"]]
            dataset = lengths.keep(dataset_name, dataset, sizes, kept, limit)
            return dataset.map(
                lambda ex: {"input_ids": ex["input_ids"][cut], "labels": ex["labels"][cut]},
                desc=f"Truncating {dataset_name} dataset",
            )
