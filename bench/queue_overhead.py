"""What the queue costs around training, measured in one run on the embedded stack (Valkey, SQLite, local folder).

    .venv/bin/python bench/queue_overhead.py [--postgres] [--api-workers N]

1. submit -> training process started, with an idle worker: POST /jobs until the worker has launched
   `python -m training run` (and until that process has printed `started`), p50 and p95.
2. POST /jobs throughput (8 keep-alive connections) against raw Celery `send_task` to the same broker (4 threads).
3. GET /jobs/{id} latency at a fixed request rate (open loop: latency counts from the scheduled send time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.dev import free_port, start_stack, stop  # noqa: E402
from queue_config import Settings, make_celery  # noqa: E402
from training.tiny import make_tiny_model  # noqa: E402
from training.toy_data import write_toy_data  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_event(http: httpx.Client, job_id: str, kind: str) -> dict:
    while True:
        for e in http.get(f"/jobs/{job_id}/events").json()["data"]:
            if e["type"] == kind:
                return e
        time.sleep(0.01)


def start_latency(http: httpx.Client, body: dict, n: int) -> tuple[list[float], list[float]]:
    """Seconds from POST to `launched` (process started) and to `started` (training began), per job."""
    launched, started = [], []
    for _ in range(n):
        t0 = time.time()
        job = http.post("/jobs", json=body).json()
        launched.append(wait_event(http, job["id"], "launched")["created_at"] - t0)
        started.append(wait_event(http, job["id"], "started")["created_at"] - t0)
        http.post(f"/jobs/{job['id']}/cancel")
        while http.get(f"/jobs/{job['id']}").json()["status"] != "cancelled":
            time.sleep(0.05)
    return launched, started


def throughput(fn, n: int, threads: int = 4) -> float:
    """Calls per second of `fn(i)` for i in range(n), spread over threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, range(n)))
    return n / (time.perf_counter() - t0)


def post_throughput(url: str, path: str, body: dict, n: int, connections: int = 8) -> float:
    """POSTs per second over keep-alive connections from a minimal asyncio client (a few microseconds of CPU
    per request, so that the load generator does not take the server's cores); every answer must be 202."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload  # fmt: skip

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(count):
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if status != 202:
                raise RuntimeError(f"POST {path} answered {status}")
        writer.close()

    async def run() -> None:
        await asyncio.gather(*[connection(n // connections) for _ in range(connections)])

    t0 = time.perf_counter()
    asyncio.run(run())
    return n // connections * connections / (time.perf_counter() - t0)


async def fixed_rate(url: str, rate: float, seconds: float) -> list[float]:
    """Latency (ms) of GET url at `rate` requests per second, measured from each request's scheduled time."""
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:

        async def one(scheduled: float) -> None:
            await client.get(url)
            latencies.append((time.perf_counter() - scheduled) * 1000)

        start, tasks = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10, help="jobs timed from submit to start")
    parser.add_argument("--posts", type=int, default=800, help="jobs posted per throughput round (3 rounds)")
    parser.add_argument("--rate", type=float, default=200.0, help="GET /jobs/{id} per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--postgres", action="store_true",
                        help="a fresh database on the PostgreSQL server at 127.0.0.1:5432 instead of SQLite")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes of the API")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prefq-bench-"))
    make_tiny_model(work / "model", "micro")
    write_toy_data(work / "pairs.jsonl", "dpo", rows=64, seed=0)
    database = None
    if args.postgres:
        import psycopg

        database = f"prefq_bench_{os.getpid()}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        os.environ["PREFQ_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    procs, env = start_stack(work / "data", free_port(), flower_port=None, api_workers=args.api_workers)
    try:
        http = httpx.Client(base_url=env["PREFQ_API_URL"], timeout=60)
        with open(work / "pairs.jsonl", "rb") as fh:
            dataset = http.post("/datasets", files={"file": ("pairs.jsonl", fh)}).json()["id"]
        body = {"model": str(work / "model"), "dataset": dataset, "method": "dpo", "hyperparameters": {"max_steps": 1000}}
        start_latency(http, body, 1)  # warm-up: the first run reads torch into the page cache
        launched, started = start_latency(http, body, args.starts)

        queued_body = {**body, "gpus": 8, "trainer": "fsdp"}  # a queue no worker consumes: nothing trains
        celery = make_celery(Settings(broker_url=env["PREFQ_BROKER_URL"]), "bench")
        time.sleep(3)  # the last cancelled run has exited
        job_id = http.post("/jobs", json=queued_body).json()["id"]
        latencies = asyncio.run(fixed_rate(f"{env['PREFQ_API_URL']}/jobs/{job_id}", args.rate, args.seconds))
        posts, raw = [], []
        for _ in range(3):  # alternated, medians
            posts.append(post_throughput(env["PREFQ_API_URL"], "/jobs", queued_body, args.posts))
            raw.append(throughput(lambda i: celery.send_task("bench.noop", args=[i, 1], queue="bench"), args.posts))
        posts, raw = statistics.median(posts), statistics.median(raw)
        after = asyncio.run(fixed_rate(f"{env['PREFQ_API_URL']}/jobs/{job_id}", args.rate, args.seconds))

    finally:
        stop(procs)
        if database:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    database = "PostgreSQL" if args.postgres else "SQLite (WAL)"
    print(f"\nprefq queue overhead: Valkey broker, {database}, local storage, {args.api_workers} API process(es), "
          "idle worker\n")
    print(f"{'measure':46} {'prefq':>12} {'baseline':>12} {'ratio':>7}  goal")
    print(f"{'submit -> process started, p50 (s)':46} {statistics.median(launched):12.3f} {'':>12} {'':>7}  <= 1 s")
    print(f"{'submit -> process started, p95 (s)':46} {pct(launched, 0.95):12.3f}")
    print(f"{'submit -> training started, p50 (s)':46} {statistics.median(started):12.3f}")
    print(f"{'submit -> training started, p95 (s)':46} {pct(started, 0.95):12.3f}")
    print(f"{'POST /jobs vs raw send_task (per s)':46} {posts:12.0f} {raw:12.0f} {posts / raw:7.2f}  >= 0.5x")
    print(f"{f'GET /jobs/id at {args.rate:.0f}/s, p50 (ms)':46} {pct(latencies, 0.50):12.1f}")
    print(f"{f'GET /jobs/id at {args.rate:.0f}/s, p99 (ms)':46} {pct(latencies, 0.99):12.1f} {'':>12} {'':>7}  <= 20 ms")
    print(f"{'  the same after the POST rounds, p50 (ms)':46} {pct(after, 0.50):12.1f}")
    print(f"{'  the same after the POST rounds, p99 (ms)':46} {pct(after, 0.99):12.1f}")
    print(f"\n({args.starts} starts, 3 x {args.posts} posts over 8 connections, {len(latencies)} GETs; baseline: Celery "
          "send_task from 4 threads to the same broker)")


if __name__ == "__main__":
    main()
