"""Memory of the API while it takes a dataset upload: the upload streams through validation, so the API process's
resident memory grows only by duplicate detection's index of distinct rows, whatever the file's size.

    .venv/bin/python bench/upload_memory.py [--rows 1000000 10000000] [--mb 1024]

Starts `prefq api` (SQLite, local storage, a key of its own), uploads a file and samples the API's resident set
size every 20 ms. `--rows`: files of that many distinct short SFT rows; prints the peak above idle per row beside
the figure `training.fingerprints` documents (the default). `--mb`: a file of DPO pairs of about 2 kB a row (a
long-tailed mix of lengths); prints idle RSS, peak RSS, the peak above idle, rows, and upload throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.stack import free_port, stop, wait_for_port  # noqa: E402
from jobs.db import upgrade  # noqa: E402
from settings import Settings  # noqa: E402
from tests.services import make_key  # noqa: E402
from training.fingerprints import ROW_BYTES  # noqa: E402
from training.parent import die_with_parent  # noqa: E402


def write_pairs(path: Path, target_bytes: int) -> int:
    rng, rows, size = random.Random(0), 0, 0
    words = [f"w{i}" for i in range(5000)]
    with open(path, "w") as out:
        while size < target_bytes:
            n = min(2000, int(rng.lognormvariate(5.0, 0.8)))
            text = " ".join(rng.choices(words, k=n))
            line = json.dumps({"prompt": f"Q{rows}: {text[:200]}", "chosen": text, "rejected": text[::-1]}) + "\n"
            out.write(line)
            size += len(line)
            rows += 1
    return rows


def write_distinct(path: Path, rows: int) -> int:
    """`rows` distinct SFT rows of about 20 bytes: the file is small, the index of distinct rows is not."""
    with open(path, "w") as out:
        for start in range(0, rows, 100_000):
            out.write("".join(f'{{"text": "row {i}"}}\n' for i in range(start, min(rows, start + 100_000))))
    return rows


def measure(megabytes: int) -> dict:
    """Upload about `megabytes` MiB of DPO pairs."""
    return upload(lambda path: write_pairs(path, megabytes << 20), "dpo")


def measure_rows(rows: int) -> dict:
    """Upload `rows` distinct rows; adds the peak above idle per row."""
    result = upload(lambda path: write_distinct(path, rows), "sft")
    return result | {"bytes_per_row": result["above_idle_mb"] * 2**20 / rows}


def upload(write, method: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="prefq-upload-"))
    settings = Settings(data_dir=root)
    upgrade(settings.database_url)
    key = make_key(settings.database_url, "bench")
    data = root / "data.jsonl"
    rows = write(data)
    port = free_port()
    env = dict(os.environ, PREFQ_DATA_DIR=str(root), PREFQ_MAX_UPLOAD_BYTES=str(4 << 30))
    api = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefq")), "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        wait_for_port(port, 60)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=None
        )
        http.get("/healthz")
        proc = psutil.Process(api.pid)
        time.sleep(1)
        idle = proc.memory_info().rss
        peak, done = [idle], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], proc.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        with open(data, "rb") as fh:
            answer = http.post("/datasets", files={"file": ("data.jsonl", fh)}, data={"method": method})
        seconds = time.monotonic() - started
        done.set()
        answer.raise_for_status()
        assert answer.json()["rows"] == rows, answer.text
    finally:
        stop([api])
        size = data.stat().st_size
        shutil.rmtree(root, ignore_errors=True)
    return {
        "bytes": size,
        "rows": rows,
        "idle_rss_mb": idle / 2**20,
        "peak_rss_mb": peak[0] / 2**20,
        "above_idle_mb": (peak[0] - idle) / 2**20,
        "seconds": seconds,
        "mb_per_s": size / 2**20 / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000], help="distinct rows a file")
    parser.add_argument("--mb", type=int, help="also a file of DPO pairs of this many MiB")
    args = parser.parse_args()
    print("| distinct rows | file | API RSS idle | peak above idle | bytes a row | documented | time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows in args.rows:
        r = measure_rows(rows)
        print(
            f"| {rows:.0e} | {r['bytes'] / 2**20:.0f} MiB | {r['idle_rss_mb']:.0f} MiB | {r['above_idle_mb']:.1f} MiB "
            f"| {r['bytes_per_row']:.1f} | {ROW_BYTES} | {r['seconds']:.1f} s |",
            flush=True,
        )
    if args.mb:
        r = measure(args.mb)
        print("\n| upload | rows | API RSS idle | API RSS peak | peak above idle | time | throughput |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {r['bytes'] / 2**20:.0f} MiB | {r['rows']} | {r['idle_rss_mb']:.0f} MiB | {r['peak_rss_mb']:.0f} MiB "
            f"| {r['above_idle_mb']:.1f} MiB | {r['seconds']:.1f} s | {r['mb_per_s']:.1f} MiB/s |"
        )


if __name__ == "__main__":
    main()
