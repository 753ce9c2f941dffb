"""Shared fixtures: a tiny model and toy data built once per session, a helper to run training, and the real
services: one stack per session with every feature on (the OpenAI face on an offline hub cache, the playground's
`prefq serve`, MLflow and W&B tracking), one DPO job trained on it that read-only tests share, and migrated
databases cloned from one upgrade.

Markers say what a test starts; they are set here from the fixtures a test uses, so they cannot drift:
`stack` (the session stack), `faults` (the faults stack of tests/test_faults.py, which kills and cuts its
processes), `browser` (headless chromium); `cuda` and `chaos` are set by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


MARKED_BY_FIXTURE = {"stack": "stack", "faulty": "faults", "browser": "browser"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the markers set here count there
def pytest_collection_modifyitems(config, items):
    """Each test gets the markers of what it starts (its fixtures). Tests marked `cuda` are skipped, saying why,
    where torch sees no CUDA device (and only there)."""
    for item in items:
        for fixture, marker in MARKED_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = f"needs a CUDA device; torch {torch.__version__} sees none on this machine"
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


def _built_model(tmp_path_factory, size: str) -> Path:
    from training.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("models") / size
    make_tiny_model(path, size)
    return path


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    return _built_model(tmp_path_factory, "micro")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A 23M-parameter Llama: big enough that its weights, not the interpreter, fill a measured memory peak."""
    return _built_model(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def toy_dpo(tmp_path_factory) -> Path:
    from training.toy_data import write_toy_data

    path = tmp_path_factory.mktemp("data") / "dpo.jsonl"
    write_toy_data(path, "dpo", rows=400, seed=1)
    return path


@pytest.fixture(scope="session")
def mixed_dpo(tmp_path_factory) -> Path:
    """Preference pairs of mixed lengths (prompts of 1 to 40 filler words, answers of 1 to 12): batches with padding."""
    import random

    from training.toy_data import FILLER

    rng = random.Random(3)

    def words(n: int) -> str:
        return " ".join(rng.choice(FILLER) for _ in range(n))

    rows = [
        {
            "prompt": words(rng.randint(1, 40)) + "?",
            "chosen": " " + words(rng.randint(1, 12)) + ".",
            "rejected": " " + words(rng.randint(1, 12)) + ".",
        }
        for _ in range(64)
    ]
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def long_rows(tmp_path_factory) -> dict[str, Path]:
    """Preference pairs and demonstrations that every batch cuts to max_length at 128 or 256 tokens: memory
    measurements at full-length batches (`tests/test_memory.py`, `tests/test_cuda.py`)."""
    import random

    # long words, several tokens each to the toy tokenizer: rows pass max_length (128 for pairs, 256 for SFT)
    greek = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(greek) for _ in range(n))

    folder = tmp_path_factory.mktemp("long")
    pairs = [{"prompt": words(8) + "?", "chosen": " " + words(60), "rejected": " " + words(60)} for _ in range(40)]
    sft = [{"prompt": words(8) + "?", "completion": " " + words(100)} for _ in range(40)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return {"dpo": folder / "pairs.jsonl", "sft": folder / "sft.jsonl"}


@pytest.fixture(scope="session")
def toy_sft(tmp_path_factory) -> Path:
    from training.toy_data import write_toy_data

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_toy_data(path, "sft", rows=400, seed=1)
    return path


def dpo_spec(model: Path, data: Path, **overrides) -> dict:
    """A DPO spec that learns the toy data on the micro model in a few seconds; without samples, which cost a run on
    the micro model about 2 s (a test of samples sets `sample_prompts`)."""
    spec = {
        "method": "dpo",
        "model": str(model),
        "train_file": str(data),
        "eval_fraction": 0.15,
        "max_steps": 20,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "max_length": 64,
        "save_steps": 100,
        "sample_prompts": 0,
    }
    spec.update(overrides)
    return spec


# Variables that W&B and MLflow set in this process's environment for themselves when a test uses them in-process
# (`WANDB_SERVICE`, `_MLFLOW_TELEMETRY_SESSION_ID`): not the tests' environment. Passed on, they would make every run
# after such a test differ from the warm starter's environment and start cold (5 s more each; measured: the test
# of SIGTERM and resume took 22 s after the tracking tests instead of 4 s).
LIBRARY_OWN = ("WANDB_", "_MLFLOW_")
SESSION_ENV = frozenset(os.environ)


def python_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k in SESSION_ENV or not k.startswith(LIBRARY_OWN)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spec_file(spec: dict, out: Path) -> Path:
    """`spec` written beside the run's folder `out` (made here)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}-spec.json"
    path.write_text(json.dumps(spec))
    return path


def start_training(spec: dict, out: Path, *extra: str):
    """`python -m training run` started, its events on `.stdout` (a `Popen`, or its warm equivalent): forked by the
    session's warm starter where it can be, else started cold."""
    return _Warm.start(["run", str(_spec_file(spec, out)), "--out", str(out), *extra]) or start_cold(spec, out, *extra)


def start_cold(spec: dict, out: Path, *extra: str) -> subprocess.Popen:
    """`python -m training run` started as a process of its own (nothing imported: a distributed run's ranks then come
    from `accelerate launch`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "training", "run", str(_spec_file(spec, out)), "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=python_env(),
        cwd=ROOT,
    )


def run_cold(spec: dict, out: Path, *extra: str) -> tuple[int, list[dict]]:
    """`start_cold` to the end: the exit code and the parsed events."""
    proc = start_cold(spec, out, *extra)
    stdout, _ = proc.communicate(timeout=600)
    return proc.returncode, [json.loads(line) for line in stdout.splitlines()]


class _Started:
    """A warm run as much of a `Popen` as the tests use: `stdout` (text), `pid`, `send_signal`, `wait`."""

    def __init__(self, run, stdout):
        self.run, self.stdout, self.pid = run, stdout, run.pid

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        return self.run.wait(timeout)


class _Warm:
    """The session's warm starter (`training.warm`, as a worker's), started on first use (again if it stopped)."""

    starter = None

    @classmethod
    def _start(cls, argv: list[str], stdout: int):
        """`python -m training ARGV` forked warm in this process's environment, or None where it starts cold."""
        import atexit

        from training.warm import ColdStart, WarmStarter

        env = {k: v for k, v in python_env().items() if k != "PYTEST_CURRENT_TEST"}  # as a worker's, the same per run
        if cls.starter is None or not cls.starter.alive():
            cls.starter = WarmStarter(env, ROOT)
            atexit.register(cls.starter.close)
        with open(os.devnull, "wb") as err:
            try:
                return cls.starter.start(argv, env, ROOT, stdout, err.fileno(), wait_s=120)
            except ColdStart:
                return None

    @classmethod
    def run(cls, argv: list[str], stdout: Path) -> int | None:
        """The exit code of `python -m training ARGV` forked warm, its stdout into `stdout`; None where it starts
        cold instead."""
        with open(stdout, "wb") as out:
            run = cls._start(argv, out.fileno())
        return None if run is None else run.wait(600)

    @classmethod
    def start(cls, argv: list[str]) -> _Started | None:
        """`python -m training ARGV` forked warm, its stdout a pipe to read; None where it starts cold instead."""
        read, write = os.pipe()
        try:
            run = cls._start(argv, write)
        finally:
            os.close(write)
        if run is None:
            os.close(read)
            return None
        return _Started(run, os.fdopen(read, "r"))


def run_training(spec: dict, out: Path, *extra: str) -> tuple[int, list[dict]]:
    """Run `python -m training run` to the end; returns the exit code and the parsed events. Forked by the session's
    warm starter (`training.warm`: the imports paid once) where it can be, else started."""
    events = out.parent / f"{out.name}-events.jsonl"
    code = _Warm.run(["run", str(_spec_file(spec, out)), "--out", str(out), *extra], events)
    if code is None:
        return run_cold(spec, out, *extra)
    return code, [json.loads(line) for line in events.read_text().splitlines()]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


# -- real services ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory):
    from cli.stack import free_port, start_valkey, stop

    port = free_port()
    proc = start_valkey(port, tmp_path_factory.mktemp("valkey"))
    yield f"redis://127.0.0.1:{port}/0"
    stop([proc])


@pytest.fixture(scope="session")
def pg_template():
    """The name of a PostgreSQL database upgraded once to the newest migration: `create_pg_database(template=...)`
    clones it (a file copy on the server), instead of running every migration again for each database."""
    from jobs.db import upgrade
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database()
    upgrade(url)
    yield name
    drop_pg_database(name)


@pytest.fixture(scope="session")
def pg_url(pg_template):
    """A migrated PostgreSQL database for the session (the stack's)."""
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database(template=pg_template)
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 endpoint with credentials; yields the settings that reach it."""
    from cli.stack import stop
    from tests.services import S3_BUCKET, S3_KEY, S3_SECRET, start_seaweedfs

    proc, endpoint = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield {"endpoint_url": endpoint, "access_key_id": S3_KEY, "secret_access_key": S3_SECRET, "bucket": S3_BUCKET}
    stop([proc])


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, micro_model) -> Path:
    """An offline Hugging Face hub cache that holds the micro model as `HUB_ID` (at main and at the tag v1)."""
    from tests.services import fill_hub_cache

    cache = tmp_path_factory.mktemp("hf") / "hub"
    fill_hub_cache(cache, micro_model)
    return cache


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (SQLite store, served artifacts) on a free port, and a proxy in front of it that the stack's
    workers report through: a test cuts the proxy for an MLflow outage. Yields `uri` (direct), `proxy`, `proc` and
    `ready()`, which waits until it answers (the stack starts meanwhile)."""
    from types import SimpleNamespace

    from cli.stack import stop
    from tests.proxy import Proxy
    from tests.services import start_mlflow, wait_for_mlflow

    proc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    proxy = Proxy("127.0.0.1", int(uri.rsplit(":", 1)[1]))
    yield SimpleNamespace(uri=uri, proxy=proxy, proc=proc, ready=lambda: wait_for_mlflow(proc, uri))
    proxy.close()
    stop([proc])


@pytest.fixture(scope="session")
def ray_cluster():
    """The Ray cluster where the stack places jobs of several nodes (`training.cluster`), `tests.services.RayCluster`:
    its address, for the stack's worker. Its nodes (raylets of one CPU each) are started by the tests that place jobs
    on it (`tests/test_distributed.py`'s `ray_nodes`)."""
    from tests.services import RayCluster

    cluster = RayCluster(python_env())
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, broker_url, pg_url, s3, hub_cache, mlflow_server, ray_cluster):
    """The whole service on PostgreSQL, the broker and S3, with short heartbeats and leases, and every feature on:
    the OpenAI face with a hub model served from an offline cache, the playground's `prefq serve`, tracking to
    MLflow and W&B (offline). One training worker with 2 CPU devices and the service worker."""
    import secrets

    from cli.stack import free_port
    from tests.services import (
        ARITHMETIC_JUDGE,
        HUB_ID,
        JUDGES_TENANT,
        OPERATOR_JUDGE,
        SERVE_MAX_TOKENS,
        SERVE_TIMEOUT_S,
        JudgeEndpoint,
        Stack,
        make_key,
    )

    data_dir = tmp_path_factory.mktemp("prefq")
    env = dict(
        python_env(),
        PREFQ_DATA_DIR=str(data_dir),
        PREFQ_DATABASE_URL=pg_url,
        PREFQ_BROKER_URL=broker_url,
        PREFQ_STORAGE_URL=f"s3://{s3['bucket']}/stack-{secrets.token_hex(3)}",
        PREFQ_S3_ENDPOINT_URL=s3["endpoint_url"],
        PREFQ_S3_ACCESS_KEY_ID=s3["access_key_id"],
        PREFQ_S3_SECRET_ACCESS_KEY=s3["secret_access_key"],
        PREFQ_CALLBACK_SECRET="test-secret",
        PREFQ_HEARTBEAT_S="0.5",
        PREFQ_LEASE_TTL_S="10",
        PREFQ_RECONCILE_INTERVAL_S="2",
        PREFQ_CANCEL_GRACE_S="30",
        PREFQ_CPU_DEVICES="2",
        PREFQ_WORKER_LIVE_S="10",
        PREFQ_METRICS_PORT=str(free_port()),
        PREFQ_MODEL_ROOTS=str(tmp_path_factory.getbasetemp()),
        # the OpenAI face: hub ids of the tests' own organisation, from an offline cache
        PREFQ_ALLOWED_HUB_MODELS="prefq-test/*",
        PREFQ_BASE_MODELS=HUB_ID,
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        # the playground: room for a generation that outlasts the time limit
        PREFQ_SERVE_URL=f"http://127.0.0.1:{free_port()}",
        PREFQ_SERVE_TOKEN=secrets.token_hex(8),
        PREFQ_SERVE_MAX_TOKENS=str(SERVE_MAX_TOKENS),
        PREFQ_SERVE_TIMEOUT_S=str(SERVE_TIMEOUT_S),
        # tracking, through the proxy; a tracking server that is gone costs a job little
        PREFQ_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_server.proxy.port}",
        PREFQ_WANDB_MODE="offline",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        # jobs of several nodes, placed on the session's two-node Ray cluster
        PREFQ_RAY_ADDRESS=ray_cluster.address,
        PREFQ_RAY_PLACEMENT_TIMEOUT_S="5",
        PREFQ_RAY_PLACEMENT_RETRY_S="4",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    stack = Stack(env, tmp_path_factory.mktemp("logs"))
    # the operator's judge endpoint (`tests.services.JudgeEndpoint`): this API's own chat face as tenant `judges`
    # (`tests/test_grpo.py`), and the arithmetic judge (`tests/test_evals.py`); judges asked again after 0.5 s
    judge = JudgeEndpoint()
    judge.upstream = stack.url
    stack.judge = judge
    stack.env["PREFQ_JUDGE_URL"] = judge.url
    stack.env["PREFQ_JUDGE_API_KEY"] = make_key(pg_url, JUDGES_TENANT)
    stack.env["PREFQ_JUDGE_MODELS"] = f"{OPERATOR_JUDGE},{ARITHMETIC_JUDGE}"
    stack.env["PREFQ_JUDGE_RETRIES"] = "1"
    stack.up(serve=True)
    mlflow_server.ready()
    yield stack
    stack.down()
    judge.server.shutdown()


@pytest.fixture(scope="session")
def dpo_job(stack, toy_dpo, tmp_path_factory):
    """One DPO job on the session stack, trained once for the tests that only read a succeeded job (its events,
    checkpoints, samples, model, tracking runs, playground answers, registry). Created as a user of the OpenAI SDK
    would (the default tenant): the hub model, a suffix, a seed, metadata, DPO's beta, a W&B integration and an
    `Idempotency-Key`; 16 steps with a checkpoint, an evaluation and sample generations every 8.

    Returns `created` (the SDK's answer to the create), `sdk` (the finished job as the SDK reads it), `job` (the
    native view), `file` (the training file's SDK object) and `path` (its local copy), `client` (the SDK client of
    the default tenant), `create` (the arguments of the create)."""
    from types import SimpleNamespace

    from openai import OpenAI

    from tests.services import DPO_JOB_HYPER, HUB_ID, WANDB, openai_dpo_file

    client = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.env["PREFQ_API_KEY"], max_retries=0)
    path = openai_dpo_file(toy_dpo, tmp_path_factory.mktemp("dpo-job") / "pairs.jsonl", rows=400)
    with path.open("rb") as fh:
        file = client.files.create(file=fh, purpose="fine-tune")
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 16, "n_epochs": "auto"}}}
    create = dict(model=HUB_ID, training_file=file.id, suffix="pairs", seed=7, metadata={"team": "search"}, method=dpo)
    create |= dict(integrations=[WANDB], extra_body={"prefq": {"gpus": 1, "hyperparameters": DPO_JOB_HYPER}})
    create |= dict(extra_headers={"Idempotency-Key": "dpo-job-1"})
    created = client.fine_tuning.jobs.create(**create)
    job = stack.wait_for(created.id, {"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert job["status"] == "succeeded", job
    sdk = client.fine_tuning.jobs.retrieve(created.id)
    return SimpleNamespace(created=created, sdk=sdk, job=job, file=file, client=client, create=create, path=path)


@pytest.fixture(scope="session")
def rft_rows(tmp_path_factory):
    """RFT rows of the toy sums: `{"prompt", "answer"}`."""
    from training.toy_data import write_toy_data

    path = tmp_path_factory.mktemp("rft") / "rft.jsonl"
    write_toy_data(path, "rft", rows=400, seed=1)
    return path


@pytest.fixture(scope="session")
def rft(stack, toy_sft, rft_rows):
    """Tenant `judges`'s SFT job of 150 steps on the toy sums (its model also registered as the operator's judge
    model): its id, its model, the tenant's SDK client, native client and key, and its RFT file (`rft_rows`). Used
    by the GRPO tests (a start that knows the answers' form) and the evaluation tests (an SFT job's model)."""
    from types import SimpleNamespace

    from tests.services import HUB_ID, JUDGES_TENANT, OPERATOR_JUDGE, SFT_JOB_HYPER, tenant_clients

    client, native, key = tenant_clients(stack, JUDGES_TENANT)
    with toy_sft.open("rb") as fh:
        demonstrations = client.files.create(file=fh, purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model=HUB_ID, training_file=demonstrations.id, extra_body={"prefq": {"hyperparameters": SFT_JOB_HYPER}}
    )
    job = stack.wait_for(sft.id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    model = client.fine_tuning.jobs.retrieve(sft.id).fine_tuned_model
    registered = native.post(f"/models/{OPERATOR_JUDGE}/versions", json={"job_id": sft.id})
    assert registered.status_code == 201, registered.text
    with rft_rows.open("rb") as fh:
        file = client.files.create(file=fh, purpose="fine-tune")
    assert file.status == "processed", file
    return SimpleNamespace(client=client, native=native, key=key, model=model, file=file, job_id=sft.id)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A SQLite job table upgraded once to the newest migration; the `settings` fixture copies it."""
    from jobs.db import upgrade

    path = tmp_path_factory.mktemp("sqlite") / "prefq.db"
    upgrade(f"sqlite:///{path}")
    return path


def copy_sqlite(template: Path, path: Path) -> str:
    """A copy of the SQLite database `template` at `path` (SQLite's backup: consistent whatever its journal);
    returns its URL."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(template)) as src, closing(sqlite3.connect(path)) as dst:
        src.backup(dst)
    return f"sqlite:///{path}"


@pytest.fixture
def settings(tmp_path, tmp_path_factory, broker_url, sqlite_template):
    """Settings of an in-process API (FastAPI TestClient) on SQLite (a copy of the migrated template) and local
    storage, whose broker keyspace no worker reads."""
    import redis

    from settings import Settings

    url = broker_url.rsplit("/", 1)[0] + "/1"  # a keyspace of its own: no worker consumes these messages
    redis.Redis.from_url(url).flushdb()
    return Settings(
        data_dir=tmp_path,
        broker_url=url,
        callback_secret="s3cret",
        callback_allow_private=True,
        database_url=copy_sqlite(sqlite_template, tmp_path / "prefq.db"),
        model_roots=[str(tmp_path_factory.getbasetemp())],
    )


CHROMIUM = Path("/usr/bin/chromium")  # Debian's (scripts/setup.sh installs it); Playwright's download cannot work here
SHOTS = ROOT / "runs" / "screenshots"  # git ignores runs/
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    """Headless chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def callback_url():
    from tests.services import serve_callbacks

    server, url = serve_callbacks()
    yield url
    server.shutdown()
