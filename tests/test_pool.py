"""The worker pool's rules: which queues a worker takes, and its GPU inventory (a fake nvidia-smi: no GPU here)."""

import os

from queue_config import gpu_queue, worker_queues
from settings import Settings
from worker.pool import gpu_inventory, inventory


def test_a_worker_takes_jobs_up_to_its_device_count():
    assert worker_queues(Settings(gpus="0,1,2,3")) == ["gpu1", "gpu2", "gpu3", "gpu4"]
    assert worker_queues(Settings(gpus="")) == ["cpu"]
    assert worker_queues(Settings(cpu_devices=2)) == ["cpu", "gpu1", "gpu2"]
    assert gpu_queue(0) == "cpu" and gpu_queue(8) == "gpu8"


def test_gpu_inventory_reads_nvidia_smi_for_the_workers_gpus(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559'\necho '1, NVIDIA H100 80GB HBM3, 81559'\n"
        "echo '2, NVIDIA A10G, 23028'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu_inventory(["1", "2"]) == [
        {"index": "1", "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559},
        {"index": "2", "name": "NVIDIA A10G", "memory_mib": 23028},
    ]


def test_without_nvidia_smi_the_gpus_are_listed_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_inventory(["0"]) == [{"index": "0", "name": "unknown", "memory_mib": None}]
    inv = inventory(Settings(cpu_devices=2))
    assert inv["gpus"] == [] and inv["cpu_devices"] == 2 and inv["cpu_count"] >= 1
