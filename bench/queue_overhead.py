"""What the queue costs around training, measured in one run on the embedded stack (Valkey, SQLite, local folder).

    .venv/bin/python bench/queue_overhead.py [--postgres] [--api-workers N]

1. submit -> training process started, with an idle worker: POST /jobs until the worker has launched
   `python -m training run` (and until that process has printed `started`), p50 and p95; forked by the worker's warm
   starter (PREFQ_WARM_START, the default) against started cold (a second stack with PREFQ_WARM_START=0).
2. POST /jobs throughput (8 keep-alive connections) against raw Celery `send_task` to the same broker (4 threads).
   POST /jobs writes and sends the jobs of concurrent requests together (api/submit.py); the row below it shows
   what send_task alone gains from the same pipelining.
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

from cli.stack import admin_key, free_port, start_stack, stop  # noqa: E402
from queue_config import make_celery  # noqa: E402
from settings import Settings  # noqa: E402
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


def client(work: Path, env: dict) -> tuple[httpx.Client, dict]:
    """An admin's client of the stack, and the body of a job on the toy data (uploaded here) that trains on."""
    Connection.key = admin_key(work / "data")[0]
    http = httpx.Client(
        base_url=env["PREFQ_API_URL"], timeout=60, headers={"Authorization": f"Bearer {Connection.key}"}
    )
    with open(work / "pairs.jsonl", "rb") as fh:
        dataset = http.post("/datasets", files={"file": ("pairs.jsonl", fh)}).json()["id"]
    body = {"model": str(work / "data" / "model"), "dataset": dataset, "method": "dpo"}
    return http, body | {"hyperparameters": {"max_steps": 1000}}


def batched_sends(celery, n: int, size: int = 8) -> float:
    """send_task per second in pipelined batches of `size` (kombu's Producer.batch), as POST /jobs sends."""
    t0 = time.perf_counter()
    with celery.producer_or_acquire() as producer:
        for start in range(0, n, size):
            with producer.batch():
                for i in range(start, min(n, start + size)):
                    celery.send_task("bench.noop", args=[i, 1], queue="bench", producer=producer)
    return n / (time.perf_counter() - t0)


def settle(idle: float = 0.8, timeout_s: float = 60.0) -> None:
    """Waits until the machine is idle (the last cancelled run has exited and freed its cores)."""

    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        idle0, all0 = times()
        time.sleep(1.0)
        idle1, all1 = times()
        if (idle1 - idle0) / max(1, all1 - all0) >= idle:
            return


def throughput(fn, n: int, threads: int = 4) -> float:
    """Calls per second of `fn(i)` for i in range(n), spread over threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, range(n)))
    return n / (time.perf_counter() - t0)


class Connection:
    """A minimal HTTP/1.1 keep-alive client: little CPU per request, so that the load generator leaves the
    server its cores."""

    key = ""  # the API key every request sends

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    async def __aenter__(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Sends one request and reads the whole answer; returns its status."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: Bearer {self.key}\r\n"
        )
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return status


def post_throughput(url: str, path: str, body: dict, n: int, connections: int = 8) -> float:
    """POSTs per second over keep-alive connections; every answer must be 202."""
    payload = json.dumps(body).encode()

    async def connection(count: int) -> None:
        async with Connection(url) as conn:
            for _ in range(count):
                if (status := await conn.request("POST", path, payload)) != 202:
                    raise RuntimeError(f"POST {path} answered {status}")

    async def run() -> None:
        await asyncio.gather(*[connection(n // connections) for _ in range(connections)])

    t0 = time.perf_counter()
    asyncio.run(run())
    return n // connections * connections / (time.perf_counter() - t0)


async def fixed_rate(url: str, path: str, rate: float, seconds: float, connections: int = 32) -> list[float]:
    """Latency (ms) of GET path at `rate` requests per second, measured from each request's scheduled time
    (open loop: waiting for a free connection counts)."""
    latencies: list[float] = []
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await Connection(url).__aenter__())

    async def one(scheduled: float) -> None:
        conn = await idle.get()
        if (status := await conn.request("GET", path)) != 200:
            raise RuntimeError(f"GET {path} answered {status}")
        latencies.append((time.perf_counter() - scheduled) * 1000)
        idle.put_nowait(conn)

    start, tasks = time.perf_counter(), []
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        await idle.get_nowait().__aexit__()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10, help="jobs timed from submit to start")
    parser.add_argument("--posts", type=int, default=800, help="jobs posted per throughput round (3 rounds)")
    parser.add_argument("--rate", type=float, default=200.0, help="GET /jobs/{id} per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="a fresh database on the PostgreSQL server at 127.0.0.1:5432 instead of SQLite",
    )
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes of the API")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prefq-bench-"))
    make_tiny_model(work / "data" / "model", "micro")  # under the data folder: a model root of the dev stack
    write_toy_data(work / "pairs.jsonl", "dpo", rows=64, seed=0)
    database = None
    if args.postgres:
        import psycopg

        database = f"prefq_bench_{os.getpid()}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        os.environ["PREFQ_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    os.environ["PREFQ_TENANT_MAX_ACTIVE_JOBS"] = str(10 * args.posts)  # the rounds leave thousands queued
    os.environ["PREFQ_WARM_START"] = "0"
    procs, env = start_stack(work / "data", free_port(), flower_port=None, api_workers=args.api_workers)
    try:
        http, body = client(work, env)
        start_latency(http, body, 1)  # warm-up: the first run reads torch into the page cache
        cold_launched, cold_started = start_latency(http, body, args.starts)
    finally:
        stop(procs)
    os.environ["PREFQ_WARM_START"] = "1"
    procs, env = start_stack(work / "data", free_port(), flower_port=None, api_workers=args.api_workers)
    try:
        http, body = client(work, env)
        start_latency(http, body, 1)
        launched, started = start_latency(http, body, args.starts)

        queued_body = {**body, "gpus": 8, "trainer": "fsdp"}  # a queue no worker consumes: nothing trains
        celery = make_celery(Settings(broker_url=env["PREFQ_BROKER_URL"]), "bench")
        settle()
        job_id = http.post("/jobs", json=queued_body).json()["id"]
        latencies = asyncio.run(fixed_rate(env["PREFQ_API_URL"], f"/jobs/{job_id}", args.rate, args.seconds))
        posts, raw, batched = [], [], []
        for _ in range(3):  # alternated, medians
            posts.append(post_throughput(env["PREFQ_API_URL"], "/jobs", queued_body, args.posts))
            raw.append(throughput(lambda i: celery.send_task("bench.noop", args=[i, 1], queue="bench"), args.posts))
            batched.append(batched_sends(celery, args.posts))
        posts, raw, batched = statistics.median(posts), statistics.median(raw), statistics.median(batched)
        after = asyncio.run(fixed_rate(env["PREFQ_API_URL"], f"/jobs/{job_id}", args.rate, args.seconds))

    finally:
        stop(procs)
        if database:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    database = "PostgreSQL" if args.postgres else "SQLite (WAL)"
    print(
        f"\nprefq queue overhead: Valkey broker, {database}, local storage, {args.api_workers} API process(es), "
        "idle worker\n"
    )
    print(f"{'measure':46} {'prefq':>12} {'baseline':>12} {'ratio':>7}  goal")
    for name, warm, cold, goal in (
        ("submit -> process started, p50 (s)", statistics.median(launched), statistics.median(cold_launched), "<= 1 s"),
        ("submit -> process started, p95 (s)", pct(launched, 0.95), pct(cold_launched, 0.95), ""),
        ("submit -> training started, p50 (s)", statistics.median(started), statistics.median(cold_started), ""),
        ("submit -> training started, p95 (s)", pct(started, 0.95), pct(cold_started, 0.95), ""),
    ):
        print(f"{name:46} {warm:12.3f} {cold:12.3f} {warm / cold:7.2f}  {goal}")
    print(f"{'POST /jobs vs raw send_task (per s)':46} {posts:12.0f} {raw:12.0f} {posts / raw:7.2f}  >= 0.5x")
    print(f"{'  send_task in pipelined batches of 8 (per s)':46} {batched:12.0f} {raw:12.0f} {batched / raw:7.2f}")
    print(f"{f'GET /jobs/id at {args.rate:.0f}/s, p50 (ms)':46} {pct(latencies, 0.50):12.1f}")
    print(
        f"{f'GET /jobs/id at {args.rate:.0f}/s, p99 (ms)':46} {pct(latencies, 0.99):12.1f} {'':>12} {'':>7}  <= 20 ms"
    )
    print(f"{'  the same after the POST rounds, p50 (ms)':46} {pct(after, 0.50):12.1f}")
    print(f"{'  the same after the POST rounds, p99 (ms)':46} {pct(after, 0.99):12.1f}")
    print(
        f"\n({args.starts} starts, 3 x {args.posts} posts over 8 connections, {len(latencies)} GETs; baseline of the "
        "starts: the same stack with PREFQ_WARM_START=0 (each run imports torch and the trainers itself); of the posts: "
        "Celery send_task from 4 threads to the same broker; POST /jobs commits and sends the jobs of concurrent "
        "requests together)"
    )


if __name__ == "__main__":
    main()
