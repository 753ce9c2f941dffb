"""A GRPO run's grading service, in the worker (`training.grpo` asks it on a local socket, one JSON line each way).

- The judges of model graders (`jobs.judges`): resolved for the job's tenant before the run starts, asked with the
  credentials that only the worker holds. A question that names another model is refused.
- Python graders: the sandboxed child (`training.graders.run_python`), started here with the server's limits
  (PREFQ_GRADER_*), because a run, confined without capabilities, cannot start it as nobody.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx

from jobs import judges
from jobs.served import Folders
from training import graders
from training.spec import ADAPTER, CONSOLIDATED, MANIFEST_NAME
from worker.attempt import Attempt, JobFailed

log = logging.getLogger("prefq.worker")
FOLDERS = Folders(MANIFEST_NAME, ADAPTER, CONSOLIDATED)
MAX_QUESTION_BYTES = 16 << 20
# A judge's answer, retries and rate limit included, within the run's wait for the socket (`training.grpo`, 600 s)
ANSWER_BUDGET_S = 540.0


def resolve(a: Attempt, found_graders: dict[str, dict]) -> dict[str, judges.Endpoint]:
    """The judge of each model grader of the job's graders, checked again for its tenant."""
    config = judges.Config.of(a.settings)
    try:
        return judges.resolve_all(config, a.store, a.storage, a.job.tenant, found_graders, FOLDERS)
    except judges.NoJudge as exc:
        raise JobFailed("invalid_grader", f"hyperparameters.{exc.param}: {exc}", user_error=True) from None


def needs_service(found_graders: dict[str, dict]) -> bool:
    """Whether the graders have a python or a model grader, which the worker runs for the run."""
    return bool(graders.run_by_worker(found_graders))


def socket_path(a: Attempt) -> Path:
    """The attempt's socket, in a short private folder that `serving` makes: a socket's path has at most 107 bytes,
    and attempt folders may be deep."""
    return Path(tempfile.gettempdir()) / f"prefq-grading-{a.job.id}-{a.attempt}" / "grading.sock"


@contextlib.contextmanager
def serving(a: Attempt, endpoints: dict[str, judges.Endpoint], path: Path | None) -> Iterator[None]:
    """Answer the run's questions on `path` while the block runs (nothing where `path` is None); the socket's folder
    is removed after."""
    if path is None:
        yield
        return
    s = a.settings
    limits = graders.Limits(seconds=s.grader_timeout_s, memory_bytes=s.grader_memory_mb << 20)
    http = httpx.Client()

    def answer(question: dict) -> dict:
        if "python" in question:
            asked = question["python"]
            return {"result": asdict(graders.run_python(asked["source"], asked["sample"], asked["item"], limits))}
        asked = question["judge"]
        endpoint = endpoints.get(asked.get("model"))
        if endpoint is None:
            raise ValueError(f"{asked.get('model')!r} is not a judge of this job")
        params = asked.get("params") or {}
        text = judges.ask(
            http,
            endpoint,
            asked["messages"],
            params,
            s.judge_timeout_s,
            s.judge_retries,
            s.judge_requests_per_s,
            budget_s=ANSWER_BUDGET_S,
        )
        return {"text": text}

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                reply = answer(json.loads(self.rfile.readline(MAX_QUESTION_BYTES)))
            except Exception as exc:  # noqa: BLE001 - the grader scores 0 and says why
                reply = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                log.warning("job %s: a grader's question failed: %s", a.job_id, reply["error"])
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    shutil.rmtree(path.parent, ignore_errors=True)  # an earlier process's, of this attempt
    path.parent.mkdir(mode=0o700)
    server = Server(str(path), Handler)
    path.chmod(0o600)
    thread = threading.Thread(target=server.serve_forever, name="grading", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        http.close()
        shutil.rmtree(path.parent, ignore_errors=True)
