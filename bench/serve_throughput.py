"""Concurrent requests to one served model, measured in one run against a real `prefq serve` (local storage).

    .venv/bin/python bench/serve_throughput.py [--size tiny] [--requests 8] [--tokens 64]

The model (`training.tiny`, built here) is put where a job's model lives in storage; `prefq serve` runs it in a
child process. Every request is greedy and runs to `--tokens` (special tokens biased out), so each does the same
work. Each round is timed `--rounds` times; the table gives the median. Rows:

- first request: fetch into the model cache, start the child (imports), load, answer: what the first user waits;
- N sequential requests: one after the other (the baseline);
- N concurrent requests with PREFQ_SERVE_MAX_BATCH=1: one at a time in the child, as before batching;
- N concurrent requests, batched (the default PREFQ_SERVE_MAX_BATCH=8).

The texts of every round must equal the sequential ones, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.stack import free_port, wait_for_port  # noqa: E402
from training.tiny import SPECIAL_TOKENS, make_tiny_model  # noqa: E402


def start_serve(data: Path, batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFQ_DATA_DIR": str(data),
        "PREFQ_SERVE_MAX_BATCH": str(batch),
        "PREFQ_SERVE_TIMEOUT_S": "600",
    }
    env.pop("PREFQ_SERVE_TOKEN", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefq")), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port, 60)
    return proc, f"http://127.0.0.1:{port}"


async def ask(client: httpx.AsyncClient, body: dict, i: int) -> str:
    """One request's whole text."""
    import json

    text = ""
    async with client.stream("POST", "/generate", json={**body, "id": f"r{i}-{time.monotonic_ns()}"}) as answer:
        async for line in answer.aiter_lines():
            if line:
                part = json.loads(line)
                if "error" in part:
                    raise RuntimeError(part["error"])
                text += part.get("delta", "")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["micro", "tiny", "small"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="each round is timed this many times (the median)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="prefq-serve-bench-"))
    try:
        model = work / "storage" / "tenants" / "bench" / "jobs" / "job_bench" / "model"
        make_tiny_model(model, args.size)
        tokenizer = AutoTokenizer.from_pretrained(model)
        bias = {str(tokenizer.convert_tokens_to_ids(t)): -100 for t in SPECIAL_TOKENS}
        prompts = [f"What is {i} plus {i + 2}?" for i in range(args.requests)]

        def body(prompt: str) -> dict:
            return {
                "model_uri": model.as_uri() + "/",
                "prompt": prompt,
                "max_tokens": args.tokens,
                "temperature": 0,
                "logit_bias": bias,
            }

        rows, texts = [], {}
        for batch in (8, 1):
            proc, url = start_serve(work, batch)
            try:

                async def run(url: str, batch: int) -> None:
                    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                        t0 = time.perf_counter()
                        await ask(client, body("Hello"), -1)
                        if batch == 8:
                            rows.append(("first request (fetch, start, load, answer)", time.perf_counter() - t0))
                            times = []
                            for _ in range(args.rounds):
                                t0 = time.perf_counter()
                                texts["sequential"] = [await ask(client, body(p), i) for i, p in enumerate(prompts)]
                                times.append(time.perf_counter() - t0)
                            rows.append((f"{args.requests} sequential requests", statistics.median(times)))
                        name = f"{args.requests} concurrent, " + ("batched" if batch > 1 else "PREFQ_SERVE_MAX_BATCH=1")
                        times = []
                        for _ in range(args.rounds):
                            t0 = time.perf_counter()
                            asked = (ask(client, body(p), i) for i, p in enumerate(prompts))
                            texts[name] = list(await asyncio.gather(*asked))
                            times.append(time.perf_counter() - t0)
                        rows.append((name, statistics.median(times)))

                asyncio.run(run(url, batch))
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(30)
            shutil.rmtree(work / "work", ignore_errors=True)  # the next serve fetches and starts afresh
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for name, got in texts.items():
        if got != texts["sequential"]:
            raise SystemExit(f"{name}: texts differ from the sequential ones")
    baseline = dict(rows)[f"{args.requests} sequential requests"]
    print(
        f"model: {args.size}, {args.requests} requests of {args.tokens} tokens, greedy; median of {args.rounds} rounds;"
        " the same texts in every round"
    )
    print(f"{'round':52} {'seconds':>8} {'vs sequential':>14}")
    for name, seconds in rows:
        ratio = "" if name.startswith("first") else f"{baseline / seconds:13.2f}x"
        print(f"{name:52} {seconds:8.2f} {ratio:>14}")


if __name__ == "__main__":
    main()
