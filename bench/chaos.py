"""Chaos: ordinary faults against the real service on loopback, with the invariants measured.

    .venv/bin/python bench/chaos.py [--short] [--scenario NAME ...] [--seed N]

A stack of its own: Valkey, a PostgreSQL database, SeaweedFS with credentials, the API, three training workers
(one CPU device each; they reach PostgreSQL through a proxy that the `db-outage` scenario cuts) and the service
worker (reconciler, callbacks). DPO jobs on a ~150k-parameter Llama, checkpoints every 5 steps. Scenarios:

    worker-kill    SIGKILL of a training worker's process group at random moments, and right after checkpoints
    db-outage      the workers lose PostgreSQL for 5-30 s while they train (the reconciler keeps it)
    broker-restart Valkey killed and started again, empty, with jobs running and queued
    api-kill       the API SIGKILLed under 100 concurrent POST /jobs, then started again
    redelivery     a 6 s visibility timeout: Redis hands running jobs' messages to other workers
    sigterm-group  SIGTERM to a worker's whole process group while it trains, then a new worker

A process sampler (every 0.1 s) records which attempts of a job have a training process alive. The table:
jobs succeeded / submitted, attempts per job (mean, max), the most attempts of one job alive at once (must be 1),
steps trained twice (a new attempt resumed below the last step of the previous one: lost work, beyond the newest
uploaded checkpoint), jobs stuck (not finished in time), orphan processes and leftover attempt folders once the
scenario is over. `--short` runs each scenario small, for a quick look. `pytest -m chaos` runs it at full size
(tests/test_chaos.py); the suite runs a short form of each scenario in tests/test_faults.py instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import mkdtemp

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.stack import free_port, start_valkey, stop, wait_for_port  # noqa: E402
from jobs.db import upgrade  # noqa: E402
from tests.proxy import Proxy  # noqa: E402
from tests.services import Stack, create_pg_database, drop_pg_database, start_seaweedfs  # noqa: E402
from training.tiny import make_tiny_model  # noqa: E402
from training.toy_data import write_toy_data  # noqa: E402

RUN = re.compile(r"/(job_[0-9a-f]+)/attempt-(\d+)/spec\.json")
WORKERS = ("w1", "w2", "w3")
FINISHED = {"succeeded", "failed", "cancelled"}
HYPER = {
    "batch_size": 16,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "max_length": 64,
    "save_steps": 5,
    "eval_fraction": 0,
}


class Sampler:
    """Which attempts of each job have a training process alive, every 0.1 s; the most at once per job."""

    def __init__(self, root: Path):
        self.root, self.most = str(root), defaultdict(int)
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def alive(self) -> dict[str, set[int]]:
        found = defaultdict(set)
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "training" in cmd and " run " in cmd and self.root in cmd and (m := RUN.search(cmd)):
                found[m.group(1)].add(int(m.group(2)))
        return found

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            for job, attempts in self.alive().items():
                self.most[job] = max(self.most[job], len(attempts))

    def close(self) -> None:
        self._stop.set()


class Chaos:
    def __init__(self, short: bool, seed: int):
        self.short, self.rng = short, random.Random(seed)
        self.root = Path(mkdtemp(prefix="prefq-chaos-"))
        self.model, self.data = self.root / "model", self.root / "pairs.jsonl"
        make_tiny_model(self.model, "micro")
        write_toy_data(self.data, "dpo", rows=400, seed=1)
        self.pg_url, self.pg_name = create_pg_database()
        upgrade(self.pg_url)
        self.broker_port = free_port()
        self.valkey = start_valkey(self.broker_port, self.root / "valkey")
        self.weed, endpoint = start_seaweedfs(self.root / "seaweedfs")
        from tests.services import S3_BUCKET, S3_KEY, S3_SECRET

        self.db_proxy = Proxy("127.0.0.1", 5432)
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
            PREFQ_DATA_DIR=str(self.root),
            PREFQ_DATABASE_URL=self.pg_url,
            PREFQ_BROKER_URL=f"redis://127.0.0.1:{self.broker_port}/0",
            PREFQ_STORAGE_URL=f"s3://{S3_BUCKET}/chaos-{secrets.token_hex(3)}",
            PREFQ_S3_ENDPOINT_URL=endpoint,
            PREFQ_S3_ACCESS_KEY_ID=S3_KEY,
            PREFQ_S3_SECRET_ACCESS_KEY=S3_SECRET,
            PREFQ_CALLBACK_SECRET="chaos",
            PREFQ_HEARTBEAT_S="0.5",
            PREFQ_LEASE_TTL_S="10",
            PREFQ_RECONCILE_INTERVAL_S="1",
            PREFQ_RESEND_AFTER_S="3",
            PREFQ_CANCEL_GRACE_S="15",
            PREFQ_CPU_DEVICES="1",
            PREFQ_WORKER_LIVE_S="10",
            PREFQ_MAX_ATTEMPTS="20",
            PREFQ_METRICS_PORT="0",
            PREFQ_MODEL_ROOTS=str(self.root),
        )
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
        (self.root / "logs").mkdir()
        self.stack = Stack(env, self.root / "logs")
        self.worker_env = {"PREFQ_DATABASE_URL": self.pg_url.replace(":5432/", f":{self.db_proxy.port}/")}
        self.stack.start("api", "api", "--port", str(self.stack.port))
        self.stack.start("service", "worker", "--service", "--name", "chaos-service@%h")
        for name in WORKERS:
            self.start_worker(name)
        wait_for_port(self.stack.port, 60)
        for name in WORKERS:
            self.stack.wait_for_worker(f"chaos-{name}@")
        self.http = self.stack.http
        ds = self.http.post("/datasets", files={"file": ("pairs.jsonl", self.data.read_bytes())}).json()
        self.dataset = ds["id"]
        self.sampler = Sampler(self.root)

    def start_worker(self, name: str, **extra) -> None:
        env = {**self.worker_env, "PREFQ_WORK_DIR": str(self.root / f"work-{name}"), **extra}
        self.stack.start(name, "worker", "--name", f"chaos-{name}@%h", env=env)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.stack.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=120)

    def submit(self, steps: int, n: int = 1) -> list[str]:
        body = {
            "model": str(self.model),
            "dataset": self.dataset,
            "method": "dpo",
            "hyperparameters": {**HYPER, "max_steps": steps},
        }
        return [self.http.post("/jobs", json=body).json()["id"] for _ in range(n)]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def events(self, job_id: str) -> list[dict]:
        return self.http.get(f"/jobs/{job_id}/events").json()["data"]

    def wait_all(self, ids: list[str], timeout_s: float) -> list[str]:
        """The ids still not finished after `timeout_s`."""
        deadline, left = time.monotonic() + timeout_s, list(ids)
        while left and time.monotonic() < deadline:
            left = [j for j in left if self.job(j)["status"] not in FINISHED]
            time.sleep(0.5)
        return left

    def wait_running(self, ids: list[str], timeout_s: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = [j for j in ids if self.job(j)["status"] == "running"]
            if running:
                return running
            time.sleep(0.2)
        return []

    # -- scenarios --------------------------------------------------------------------------------

    def worker_kill(self) -> list[str]:
        n_jobs, kills = (3, 2) if self.short else (12, 12)
        ids = self.submit(20 if self.short else 40, n_jobs)
        done = 0
        while done < kills and any(self.job(j)["status"] not in FINISHED for j in ids):
            victim = self.rng.choice(WORKERS)
            busy = [j for j in ids if self.job(j)["status"] == "running"]
            if done % 2 and busy:  # right after a checkpoint: the upload is under way
                job = self.rng.choice(busy)
                seen = len([e for e in self.events(job) if e["type"] == "checkpoint"])
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    events = self.events(job)
                    if len([e for e in events if e["type"] == "checkpoint"]) > seen:
                        break
                    time.sleep(0.05)
                claimed = [e["data"]["worker"] for e in events if e["type"] == "claimed"]
                victim = next((w for w in WORKERS if claimed and claimed[-1].startswith(f"chaos-{w}@")), victim)
            else:
                time.sleep(self.rng.uniform(2, 8))
            self.kill_worker(victim)
            done += 1
            time.sleep(self.rng.uniform(0.5, 2))
            self.start_worker(victim)
        self.kills = done
        return ids

    def db_outage(self) -> list[str]:
        ids = self.submit(20 if self.short else 50, 2 if self.short else 4)
        self.wait_running(ids)
        time.sleep(4)
        for outage in [6] if self.short else [5, 30, 12]:
            self.db_proxy.cut()
            time.sleep(outage)
            self.db_proxy.restore()
            time.sleep(8)
        return ids

    def broker_restart(self) -> list[str]:
        ids = self.submit(20 if self.short else 30, 3 if self.short else 8)
        self.wait_running(ids)
        time.sleep(3)
        stop([self.valkey])
        time.sleep(2)
        self.valkey = start_valkey(self.broker_port, self.root / "valkey")
        return ids

    def api_kill(self) -> list[str]:
        n = 20 if self.short else 100
        body = {
            "model": str(self.model),
            "dataset": self.dataset,
            "method": "dpo",
            "hyperparameters": {**HYPER, "max_steps": 2},
        }
        before = {j["id"] for j in self._all_jobs()}

        def post(_):
            try:
                return self.stack.http.post("/jobs", json=body, timeout=30).status_code
            except httpx.HTTPError:
                return None

        with ThreadPoolExecutor(n) as pool:
            answers = [pool.submit(post, i) for i in range(n)]
            deadline = time.monotonic() + 30  # kill while POSTs are in flight, once the first has been accepted:
            while time.monotonic() < deadline and not any(a.done() and a.result() == 202 for a in answers):
                time.sleep(0.005)  # a fixed delay killed a slow API before it had committed any job
            self.stack.procs["api"].kill()
            self.stack.procs["api"].wait()
            codes = [a.result() for a in answers]
        self.stack.start("api", "api", "--port", str(self.stack.port))
        wait_for_port(self.stack.port, 60)
        ids = [j["id"] for j in self._all_jobs() if j["id"] not in before]
        self.api_answers = (sum(c == 202 for c in codes), n)
        return ids

    def _all_jobs(self) -> list[dict]:
        out, after = [], None
        while True:
            page = self.http.get("/jobs", params={"limit": 100, **({"after": after} if after else {})}).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["next_cursor"]

    def redelivery(self) -> list[str]:
        for name in WORKERS:
            self.kill_worker(name, signal.SIGTERM)
            self.start_worker(name, PREFQ_VISIBILITY_TIMEOUT_S="6")
        for name in WORKERS:
            self.stack.wait_for_worker(f"chaos-{name}@")
        ids = self.submit(30 if self.short else 40, 2)
        self.wait_all(ids, 300)
        for name in WORKERS:  # back to the default
            self.kill_worker(name, signal.SIGTERM)
            self.start_worker(name)
        logs = [(self.root / "logs" / f"{w}.log").read_text(errors="replace") for w in WORKERS]
        self.skipped = sum(log.count("is not queued; skipping") for log in logs)
        return ids

    def sigterm_group(self) -> list[str]:
        ids = self.submit(20 if self.short else 40, 2 if self.short else 4)
        for _ in range(1 if self.short else 3):
            running = self.wait_running(ids)
            if not running:
                break
            time.sleep(3)
            claimed = [e["data"]["worker"] for e in self.events(running[0]) if e["type"] == "claimed"][-1]
            victim = next(w for w in WORKERS if claimed.startswith(f"chaos-{w}@"))
            self.kill_worker(victim, signal.SIGTERM)
            self.start_worker(victim)
            time.sleep(5)
        return ids

    # -- measures ---------------------------------------------------------------------------------

    def retrained_steps(self, job_id: str) -> int:
        """Steps an attempt trained that the next attempt trained again (it resumed below them)."""
        last, total = defaultdict(int), 0
        for e in self.events(job_id):
            if e["type"] == "progress":
                last[e["attempt"]] = max(last[e["attempt"]], e["data"]["step"])
            elif e["type"] == "started" and e["attempt"] > 1:
                total += max(0, last[e["attempt"] - 1] - (e["data"].get("resumed_from_step") or 0))
        return total

    def leftovers(self) -> tuple[int, int]:
        """(orphan processes, leftover attempt folders) once every job of the scenario has finished."""
        time.sleep(3)
        managed = {p.pid for p in [*self.stack.procs.values(), self.valkey, self.weed] if p.poll() is None}
        managed |= {c.pid for pid in list(managed) for c in _children(pid)}
        orphans = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(self.root) in " ".join(p.info["cmdline"] or []) and p.pid not in managed
        ]
        folders = list(self.root.glob("work-*/job_*/attempt-*"))
        deadline = time.monotonic() + 30
        while folders and time.monotonic() < deadline:  # a run that was told to stop may still be exiting
            time.sleep(1)
            folders = list(self.root.glob("work-*/job_*/attempt-*"))
        return len(orphans), len(folders)

    def measure(self, name: str, ids: list[str], timeout_s: float) -> dict:
        stuck = self.wait_all(ids, timeout_s)
        jobs = [self.job(j) for j in ids]
        attempts = [j["attempt"] for j in jobs] or [0]
        orphans, folders = self.leftovers()
        return {
            "scenario": name,
            "succeeded": sum(j["status"] == "succeeded" for j in jobs),
            "submitted": len(ids),
            "attempts_mean": sum(attempts) / len(attempts),
            "attempts_max": max(attempts),
            "most_at_once": max((self.sampler.most[j] for j in ids), default=0),
            "retrained_steps": sum(self.retrained_steps(j) for j in ids),
            "stuck": len(stuck),
            "orphans": orphans,
            "leftover_folders": folders,
        }

    def close(self) -> None:
        self.sampler.close()
        self.stack.down()
        self.db_proxy.close()
        stop([self.valkey, self.weed])
        drop_pg_database(self.pg_name)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


SCENARIOS = {
    "worker-kill": Chaos.worker_kill,
    "db-outage": Chaos.db_outage,
    "broker-restart": Chaos.broker_restart,
    "api-kill": Chaos.api_kill,
    "redelivery": Chaos.redelivery,
    "sigterm-group": Chaos.sigterm_group,
}


def run(names: list[str], short: bool, seed: int) -> list[dict]:
    chaos = Chaos(short, seed)
    rows = []
    try:
        for name in names:
            started = time.monotonic()
            ids = SCENARIOS[name](chaos)
            row = chaos.measure(name, ids, timeout_s=300 if short else 900)
            row["seconds"] = round(time.monotonic() - started)
            if name == "worker-kill":
                row["note"] = f"{chaos.kills} kills"
            elif name == "api-kill":
                row["note"] = f"{chaos.api_answers[0]}/{chaos.api_answers[1]} POSTs answered 202 before the kill"
            elif name == "redelivery":
                row["note"] = f"{chaos.skipped} redelivered copies exited without training"
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        chaos.close()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| scenario | succeeded / submitted | attempts per job (mean, max) | most attempts training at once | "
        "steps trained twice | stuck | orphans | leftover folders | s | note |\n| --- | --- | --- | --- | --- | "
        "--- | --- | --- | --- | --- |"
    )
    lines = [
        f"| {r['scenario']} | {r['succeeded']} / {r['submitted']} | {r['attempts_mean']:.2f}, {r['attempts_max']} "
        f"| {r['most_at_once']} | {r['retrained_steps']} | {r['stuck']} | {r['orphans']} | {r['leftover_folders']} "
        f"| {r['seconds']} | {r.get('note', '')} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="each scenario small, for a quick look")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = run(args.scenario or list(SCENARIOS), args.short, args.seed)
    print(table(rows))
    ok = all(
        r["succeeded"] == r["submitted"]
        and r["most_at_once"] <= 1
        and not r["stuck"]
        and not r["orphans"]
        and not r["leftover_folders"]
        for r in rows
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
