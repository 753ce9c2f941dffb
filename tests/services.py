"""Real services for the tests: a Valkey broker, a PostgreSQL database, a SeaweedFS S3 server, an MLflow tracking
server, an offline hub cache, and the prefq stack (API, training worker, service worker, `prefq serve`) as separate
processes. Each is started fresh on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg

from cli.stack import free_port, stop, wait_for_port
from training.parent import die_with_parent

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parents[1]
FAST = [  # quick DPO through `prefq submit`, without samples (about 2 s of a job on the micro model)
    "--set",
    "sample_prompts=0",
    "--set",
    "batch_size=16",
    "--set",
    "learning_rate=3e-3",
    "--set",
    "lr_scheduler=constant",
    "--set",
    "max_length=64",
]
S3_KEY, S3_SECRET, S3_BUCKET = "prefq-test", secrets.token_hex(16), "prefq"
HUB_ID = "prefq-test/micro-llama"  # the micro model, as the offline hub cache of the session stack holds it
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVE_MAX_TOKENS = 2000  # PREFQ_SERVE_MAX_TOKENS of the session stack: room for a generation past the time limit
SERVE_TIMEOUT_S = 2.0  # PREFQ_SERVE_TIMEOUT_S: 2000 tokens of the micro model take about 4 s here, 16 take 50 ms
WANDB = {"type": "wandb", "wandb": {"project": "toy-project", "name": "toy-run", "tags": ["toy", "dpo"]}}
# The operator's judge model of the session stack, a model that tenant `judges` registers under that name
OPERATOR_JUDGE, JUDGES_TENANT = "operator-judge", "judges"
# The operator's arithmetic judge (`JudgeEndpoint`): stands in for a hosted LLM judge, which cannot run here
ARITHMETIC_JUDGE = "arithmetic-judge"
# GRPO's grader on the toy questions: the answer names the right number (`training.toy_data`, RFT rows)
GRADER = {
    "type": "string_check",
    "name": "right_number",
    "input": "{{sample.output_text}}",
    "reference": "is {{item.answer}}.",
    "operation": "like",
}
SFT_JOB_HYPER = {  # half the held-out answers right: room for reinforcement to gain (measured: 0.46 of them)
    "max_steps": 150,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "max_length": 64,
    "save_steps": 1000,
    "eval_fraction": 0.0,
}
DPO_JOB_HYPER = {
    "max_steps": 16,
    "save_steps": 8,
    "eval_steps": 8,
    "logging_steps": 1,
    "max_length": 64,
    "eval_fraction": 0.15,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "sample_prompts": 3,
    "sample_max_tokens": 24,
}  # the shared `dpo_job` of conftest


def create_pg_database(template: str | None = None) -> tuple[str, str]:
    """A fresh database on the local PostgreSQL, empty or a copy of `template` (conftest's `pg_template` is one
    that is migrated); returns (SQLAlchemy URL, name)."""
    name = f"prefq_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_seaweedfs(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`weed mini` on 127.0.0.1 with credentials, so that S3 signatures are checked; returns (process, endpoint)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "prefq",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "webdav")}
    flags = [f"-{name}.port={port}" for name, port in ports.items()]
    flags += [f"-{name}.port.grpc={free_port()}" for name in ("master", "volume", "filer", "admin")]
    weed = shutil.which("weed", path=str(Path(os.sys.executable).parent)) or "weed"
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            f"-bucket={S3_BUCKET}",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # ready when the bucket answers a signed request
        try:
            from storage import open_storage

            open_storage(
                f"s3://{S3_BUCKET}", endpoint_url=endpoint, access_key_id=S3_KEY, secret_access_key=S3_SECRET
            ).list("")
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    stop([proc])
    raise RuntimeError(f"SeaweedFS did not start; see {data_dir / 'weed.log'}")


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free port with a SQLite store and served artifacts under `root`; returns (process,
    tracking URI) at once: `wait_for_mlflow` waits until it answers, so that it starts while other things do."""
    port = free_port()
    store, artifacts = f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")
    command = [str(Path(os.sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store]
    command += ["--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(root / "server.log", "wb") as log:  # the child holds its own copy
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_for_mlflow(proc: subprocess.Popen, uri: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server at {uri} did not answer (exit code {proc.poll()}); see its server.log")


def fill_hub_cache(cache: Path, model: Path) -> None:
    """`model` as the hub cache holds `HUB_ID` at main (and at the tag v1): what a download would have left."""
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(HUB_COMMIT)


def openai_dpo_file(toy_dpo: Path, path: Path, rows: int = 64) -> Path:
    """The first `rows` pairs of `toy_dpo` in OpenAI's DPO format."""

    def openai_form(row: dict) -> dict:
        return {
            "input": {"messages": [{"role": "user", "content": row["prompt"]}]},
            "preferred_output": [{"role": "assistant", "content": row["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": row["rejected"]}],
        }

    rows_in = [json.loads(line) for line in toy_dpo.read_text().splitlines()[:rows]]
    path.write_text("".join(json.dumps(openai_form(r)) + "\n" for r in rows_in))
    return path


class Stack:
    """API, training worker and service worker processes sharing one environment; `prefq serve` too, where the
    environment names a PREFQ_SERVE_URL."""

    def __init__(self, env: dict, log_dir: Path):
        """`env` reaches the services; with a PREFQ_DATABASE_URL in it, an admin key is made there, which the CLI
        (PREFQ_API_KEY) and `http` send."""
        self.env, self.log_dir, self.procs = env, log_dir, {}
        self.judge: JudgeEndpoint | None = None  # the operator's judge endpoint, where the stack has one
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["PREFQ_API_URL"] = self.url
        self.env.setdefault("PREFQ_CALLBACK_ALLOW_PRIVATE", "true")  # the tests' receivers are on loopback
        self.env.setdefault("XDG_CONFIG_HOME", str(log_dir / "config"))  # never the user's CLI config
        if "PREFQ_API_KEY" not in self.env:
            self.env["PREFQ_API_KEY"] = make_key(self.env["PREFQ_DATABASE_URL"], "default", admin=True)
        self.http = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.env['PREFQ_API_KEY']}"}
        )

    def start(self, name: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """`prefq ARGS` as the process `name`; `env` overrides some of the stack's variables for it alone."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            ["prefq", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            cwd=cwd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def up(self, serve: bool = False) -> Stack:
        self.start("api", "api", "--port", str(self.port))
        self.start("worker", "worker", "--name", "prefq-test-worker@%h")
        self.start("service", "worker", "--service", "--name", "prefq-test-service@%h")
        if serve:
            self.start_serve()
        wait_for_port(self.port, 60)
        self.wait_for_worker("prefq-test-worker@")
        if serve:
            wait_for_port(self.serve_port, 60)
        return self

    @property
    def serve_port(self) -> int:
        return int(self.env["PREFQ_SERVE_URL"].rsplit(":", 1)[1])

    def start_serve(self) -> subprocess.Popen:
        """`prefq serve` on the port of PREFQ_SERVE_URL, as the process `serve`."""
        return self.start("serve", "serve", "--port", str(self.serve_port))

    def wait_for_worker(self, prefix: str, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for w in self.http.get("/workers").json()["data"]:
                if w["name"].startswith(prefix) and w["live"]:
                    return w
            time.sleep(0.3)
        raise TimeoutError(f"no live worker {prefix}*; logs in {self.log_dir}")

    def down(self) -> None:
        stop(list(self.procs.values()), timeout_s=60)

    def get(self, path: str) -> dict:
        return self.http.get(path).json()

    def wait_for(self, job_id: str, statuses: set[str], timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.http.get(f"/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} is {job['status']}, not {statuses}; logs in {self.log_dir}")

    def wait_for_event(self, job_id: str, kind: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.http.get(f"/jobs/{job_id}/events").json()["data"]:
                if event["type"] == kind:
                    return event
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} had no {kind} event; logs in {self.log_dir}")


def prefq(stack: Stack, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["prefq", *args], env=stack.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def submit(stack: Stack, model, data, *args) -> str:
    out = prefq(stack, "submit", str(data), "--model", str(model), "--method", "dpo", *FAST, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line for line in out.stdout.split() if line.startswith("job_"))


def wait(predicate, timeout_s: float, what: str, every_s: float = 0.1):
    """`predicate()`'s first truthy value, asked every `every_s`; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"not within {timeout_s}s: {what}")


class RayCluster:
    """A Ray cluster of one-CPU nodes on this machine, each a `ray start --block` in its own process group, on ports
    of `free_port` (none left to Ray's own choice, which could fall on a port handed out to a server still
    starting). Its address is known before it starts (`start`), so that the stack's worker can be given it and the
    cluster run only while tests place jobs on it: idle, its processes take about 6% of a core. The head keeps the
    GCS; a node killed (SIGKILL to its group: its raylet, its workers, and through them the ranks they started) is
    found dead in about 3 s."""

    def __init__(self, env: dict):
        self.folder = ""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(
            env,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="2",
        )
        self.procs: list[subprocess.Popen] = []

    def start(self, nodes: int) -> None:
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # its sockets' paths must stay short
        for _ in range(nodes):
            self.add_node()

    def add_node(self) -> None:
        """Start a node and wait until the cluster counts it (the first is the head)."""
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1"]
        ray += ["--disable-usage-stats", "--min-worker-port", "10002", "--max-worker-port", "19999"]
        for option in ("node-manager", "object-manager", "runtime-env-agent", "dashboard-agent-grpc"):
            ray += [f"--{option}-port", str(free_port())]
        ray += ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
        if self.procs:
            ray += ["--address", self.address]
        else:
            ray += ["--head", "--port", str(self.port), "--temp-dir", self.folder, "--include-dashboard=false"]
        want = len([p for p in self.procs if p.poll() is None]) + 1
        self.procs.append(
            subprocess.Popen(
                ray, env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        wait(lambda: self.alive_nodes() == want, 60, f"node {want} of the Ray cluster", every_s=0.5)

    def alive_nodes(self) -> int:
        probe = [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False); "
            "print('alive', sum(n['Alive'] for n in ray.nodes()))",
        ]
        out = subprocess.run(probe, env=self.env, capture_output=True, text=True, timeout=60)
        found = re.findall(r"^alive (\d+)$", out.stdout, re.M)  # Ray may print its own lines too
        return int(found[-1]) if out.returncode == 0 and found else 0

    def kill_node(self) -> None:
        """The newest node, lost at once (SIGKILL, no goodbye); returns when the cluster has found it dead."""
        proc = [p for p in self.procs if p.poll() is None][-1]
        want = len([p for p in self.procs if p.poll() is None]) - 1
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait(lambda: self.alive_nodes() == want, 60, "the lost node found dead", every_s=0.5)

    def stop(self) -> None:
        """SIGINT: `ray start --block` stops its node's processes (its group) in about a second; SIGTERM, 33 s."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left
            proc.wait()
        self.procs = []
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether any process of the process group `pid` lives."""
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Receiver(BaseHTTPRequestHandler):
    """A callback receiver: keeps every POST (headers, body)."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_callbacks() -> tuple[HTTPServer, str]:
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Receiver.received = []
    return server, f"http://127.0.0.1:{server.server_port}/hook"


def make_key(database_url: str, tenant: str, admin: bool = False) -> str:
    """A new API key in the database at `database_url` (what `prefq keys create` does)."""
    from jobs.db import make_engine
    from jobs.keys import KeyStore

    return KeyStore(make_engine(database_url)).create(tenant, admin, label="tests")[1]


class JudgeEndpoint:
    """The session stack's operator judge endpoint (`PREFQ_JUDGE_URL`), an OpenAI-compatible `/chat/completions`.

    Model `arithmetic-judge` stands in for the hosted LLM judge an operator would configure (none can run on this
    machine, and the tiny models cannot judge): it reads a pairwise question (`training.evalmetrics.JUDGE_TEMPLATE`)
    on the toy sums and answers "A" or "B" for the one answer that names the right sum, else "tie". Every other model
    is forwarded to `upstream` (the stack, whose `/v1` answers `operator-judge` as tenant `judges`). `down` makes
    every request a 503: a judge that is down. `asked` counts the requests that arrived."""

    def __init__(self):
        self.upstream: str | None = None
        self.down = False
        self.asked = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.asked += 1
                if endpoint.down:
                    return self._answer(503, b'{"error": {"message": "the judge is down"}}')
                request = json.loads(body)
                if request.get("model") != ARITHMETIC_JUDGE:
                    forwarded = httpx.post(
                        endpoint.upstream + self.path,
                        content=body,
                        headers={
                            "Authorization": self.headers.get("Authorization", ""),
                            "Content-Type": "application/json",
                        },
                        timeout=120,
                    )
                    return self._answer(forwarded.status_code, forwarded.content)
                reply = arithmetic_verdict(request["messages"][-1]["content"])
                answer = {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                }
                return self._answer(200, json.dumps(answer).encode())

            def _answer(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"


def arithmetic_verdict(question: str) -> str:
    """ "A", "B" or "tie": which answer of a pairwise question names the sum the toy question asks for."""
    asked = re.search(r"What is (\d+) plus (\d+)\?", question)
    parts = re.search(r"Answer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\nReply", question, re.S)
    if asked is None or parts is None:
        return "tie"
    right = int(asked.group(1)) + int(asked.group(2))

    def names_it(answer: str) -> bool:
        found = re.search(r"-?\d+", answer)
        return found is not None and int(found.group()) == right

    a, b = names_it(parts.group(1)), names_it(parts.group(2))
    return "A" if a and not b else "B" if b and not a else "tie"


def tenant_clients(stack: Stack, tenant: str):
    """The tenant's SDK client, native API client and key."""
    from openai import OpenAI

    key = make_key(stack.env["PREFQ_DATABASE_URL"], tenant)
    native = httpx.Client(base_url=stack.url, timeout=30, headers={"Authorization": f"Bearer {key}"})
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0), native, key
