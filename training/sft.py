"""TRL's SFTTrainer, runnable under the fsdp and deepspeed-tp trainers."""

from trl import SFTTrainer

from training.distributed import DistributedTrainerMixin


class PrefqSFTTrainer(DistributedTrainerMixin, SFTTrainer):
    pass
