"""One attempt of one job: claim the lease, fetch the inputs, run training as a child process, follow it.

The worker process never imports torch: training runs as `python -m training run` in its own process
group (so cancel can stop every process of it, including the ranks that `accelerate launch` starts).
Its JSON-lines events become event rows, job progress and lease renewals; each checkpoint it saves is
uploaded (manifest last) while it trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobs import layout
from jobs.models import Job, JobStatus
from jobs.store import JobStore
from queue_config import Settings
from storage import Storage, StorageError, get_dir, open_uri, put_dir
from training.spec import EXIT_OK, EXIT_STOPPED, MANIFEST_NAME, SpecError, parse_spec

log = logging.getLogger("prefq.worker")
_EOF = object()


class JobFailed(Exception):
    """The attempt cannot go on; recorded on the job as (code, message, user's fault)."""

    def __init__(self, code: str, message: str, user_error: bool):
        super().__init__(message)
        self.code, self.message, self.user_error = code, message, user_error


class LeaseLost(Exception):
    """Another attempt owns the job now: stop without writing anything more."""


@dataclass
class Outcome:
    returncode: int | None = None
    done: dict | None = None
    error: dict | None = None
    cancelled: bool = False


class Uploader:
    """Uploads checkpoint folders in order on one thread, so training and heartbeats go on meanwhile."""

    def __init__(self, storage: Storage):
        self.storage, self.jobs, self.errors = storage, queue.Queue(), []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            local, prefix = item
            try:
                put_dir(self.storage, local, prefix, last=MANIFEST_NAME)
            except (StorageError, OSError) as exc:
                self.errors.append(f"upload of {local} failed: {exc}")

    def add(self, local: Path, prefix: str) -> None:
        self.jobs.put((local, prefix))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the worker process that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_run(pid_file: Path) -> None:
    """Ask the run recorded in `pid_file` to checkpoint and stop (the worker is shutting down)."""
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


class JobRun:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage, job_id: str, attempt: int, owner: str,
                 pid_file: Path):  # fmt: skip
        self.settings, self.store, self.storage = settings, store, storage
        self.job_id, self.attempt, self.owner = job_id, attempt, owner
        self.work = settings.work_dir / job_id / f"attempt-{attempt}"
        self.pid_file = pid_file  # where the worker's main process finds the run to stop it on shutdown
        self.proc: subprocess.Popen | None = None

    # -- store writes, fenced by the lease ---------------------------------------------------------

    def record(self, event: tuple[str, dict] | None = None, **fields) -> JobStatus:
        status = self.store.record(self.job_id, self.attempt, self.owner, self.settings.lease_ttl_s, event, **fields)
        if status is None:
            raise LeaseLost(f"Job {self.job_id}: attempt {self.attempt} lost its lease")
        return status

    def finish(self, status: JobStatus, **fields) -> bool:
        done = self.store.finish(self.job_id, self.attempt, self.owner, status, **fields)
        log.info("Job %s: attempt %s %s", self.job_id, self.attempt, status.value if done else "lost its lease")
        return done

    # -- inputs -------------------------------------------------------------------------------------

    def _fetch(self, uri: str, local: Path, what: str, prefix: bool = False) -> None:
        try:
            storage, key = open_uri(uri, **self.settings.storage_options())
            if prefix:
                get_dir(storage, key, local)
            else:
                storage.get_file(key, local)
        except StorageError as exc:
            raise JobFailed(f"{what}_unavailable", f"{what}: {exc}", user_error=False) from None

    def _dataset(self, ref: str, local: Path) -> Path:
        uri = ref
        if ref.startswith("ds_"):
            dataset = self.store.get_dataset(ref)
            if dataset is None:
                raise JobFailed("dataset_unavailable", f"dataset: no dataset {ref}", user_error=True)
            uri = dataset.uri
        self._fetch(uri, local, "dataset")
        return local

    def _model(self, model: str) -> str:
        if "://" not in model:
            if not (Path(model) / "config.json").is_file():
                raise JobFailed("invalid_model", f"model: no model folder at {model} on this worker", user_error=True)
            return model
        cache = self.settings.work_dir / "models" / hashlib.sha1(model.encode()).hexdigest()[:16]
        if not (cache / ".complete").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            self._fetch(model, cache, "model", prefix=True)
            (cache / ".complete").touch()
        return str(cache)

    def _resume_checkpoint(self, out: Path) -> int | None:
        """Download the newest complete checkpoint of the job, if it has one; returns its step."""
        keys = self.storage.list(layout.checkpoints_prefix(self.job_id))
        steps = layout.complete_checkpoints(self.job_id, keys, MANIFEST_NAME)
        if not steps:
            return None
        step = max(steps)
        get_dir(self.storage, steps[step], out / f"checkpoint-{step}")
        return step

    def prepare(self, job: Job) -> tuple[Path, bool]:
        """Fetch data, model and checkpoint into the work folder and write the spec; returns (spec, resume)."""
        shutil.rmtree(self.work, ignore_errors=True)
        out = self.work / "out"
        out.mkdir(parents=True)
        data = {**job.hyperparameters, "method": job.method, "trainer": job.trainer, "gpus": max(1, job.gpus),
                "model": self._model(job.model),
                "train_file": str(self._dataset(job.dataset_id, self.work / "train.jsonl"))}  # fmt: skip
        if job.eval_dataset_id:
            data["eval_file"] = str(self._dataset(job.eval_dataset_id, self.work / "eval.jsonl"))
        try:
            spec = parse_spec(data)
        except SpecError as exc:
            raise JobFailed("invalid_spec", str(exc), user_error=True) from None
        spec_path = self.work / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        step = self._resume_checkpoint(out)
        if step is not None:
            self.record(("resuming", {"step": step}))
        return spec_path, step is not None

    # -- the run ------------------------------------------------------------------------------------

    def _launch(self, spec_path: Path, resume: bool, gpus: int) -> None:
        cmd = [sys.executable, "-m", "training", "run", str(spec_path), "--out", str(self.work / "out")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.settings.gpu_ids[:gpus])
        stderr = open(self.work / "train.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=self.work, start_new_session=True,
                                     preexec_fn=_die_with_parent)  # fmt: skip
        stderr.close()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(str(self.proc.pid))
        self.record(("launched", {"pid": self.proc.pid, "resume": resume}))

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reader(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:
            lines.put(line)
        lines.put(_EOF)

    def _handle(self, event: dict, outcome: Outcome, uploader: Uploader) -> JobStatus:
        kind = event.get("event")
        data = {k: v for k, v in event.items() if k != "event"}
        fields = {}
        if kind == "started":
            fields["total_steps"] = event["total_steps"]
        elif kind == "progress":
            fields.update(step=event["step"], total_steps=event["total_steps"],
                          metrics={"loss": event["loss"], "learning_rate": event["learning_rate"],
                                   **event["metrics"]})  # fmt: skip
        elif kind == "eval":
            fields["eval_metrics"] = event["metrics"]
        elif kind == "checkpoint":
            uploader.add(Path(event["path"]), layout.checkpoint_prefix(self.job_id, event["step"]))
        elif kind == "done":
            outcome.done = event
        elif kind == "error":
            outcome.error = event
        return self.record((kind, data), **fields)

    def supervise(self, spec_path: Path, resume: bool, gpus: int) -> Outcome:
        outcome, uploader, lines = Outcome(), Uploader(self.storage), queue.Queue()
        self._launch(spec_path, resume, gpus)
        threading.Thread(target=self._reader, args=(lines,), daemon=True).start()
        kill_at = None
        next_beat = time.monotonic() + self.settings.heartbeat_s
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.05, next_beat - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is _EOF:
                    break
                if line is not None:
                    try:
                        status = self._handle(json.loads(line), outcome, uploader)
                    except (json.JSONDecodeError, TypeError, KeyError):
                        log.warning("Job %s: unreadable event line %r", self.job_id, line[:200])
                        continue
                elif time.monotonic() >= next_beat:
                    status = self.record()
                else:
                    continue
                next_beat = time.monotonic() + self.settings.heartbeat_s
                if status == JobStatus.cancelling and not outcome.cancelled:
                    log.info("Job %s: cancelling, SIGTERM to the run", self.job_id)
                    outcome.cancelled = True
                    self._signal_group(signal.SIGTERM)
                    kill_at = time.monotonic() + self.settings.cancel_grace_s
                if kill_at is not None and time.monotonic() >= kill_at and self.proc.poll() is None:
                    log.warning("Job %s: run ignored SIGTERM for %ss, SIGKILL", self.job_id, self.settings.cancel_grace_s)
                    self._signal_group(signal.SIGKILL)
        except LeaseLost:
            self._signal_group(signal.SIGKILL)
            raise
        finally:
            outcome.returncode = self.proc.wait()
            self._signal_group(signal.SIGKILL)  # no process of the run outlives it
            self.pid_file.unlink(missing_ok=True)
            uploader.close()
        if uploader.errors:
            raise JobFailed("storage_error", "; ".join(uploader.errors), user_error=False)
        return outcome

    def conclude(self, outcome: Outcome) -> int | None:
        """Set the final status; returns the number of a new attempt to enqueue, if the run was interrupted."""
        if outcome.cancelled:
            self.finish(JobStatus.cancelled)
        elif outcome.returncode == EXIT_OK and outcome.done:
            prefix = layout.model_prefix(self.job_id)
            try:
                put_dir(self.storage, Path(outcome.done["final_path"]), prefix)
            except (StorageError, OSError) as exc:
                raise JobFailed("storage_error", f"upload of the final model failed: {exc}", user_error=False) from exc
            metrics = outcome.done.get("metrics", {})
            self.finish(JobStatus.succeeded, result_uri=self.storage.uri(prefix), step=metrics.get("step", 0),
                        eval_metrics=metrics.get("eval") or {})  # fmt: skip
        elif outcome.error:
            err = outcome.error
            raise JobFailed(err.get("code", "training_failed"), err.get("message", ""), bool(err.get("user_error")))
        elif outcome.returncode == EXIT_STOPPED:  # the worker is shutting down: another worker resumes it
            if self.store.requeue(self.job_id, self.attempt, self.owner):
                self.store.add_event(self.job_id, self.attempt + 1, "requeued", {"interrupted_attempt": self.attempt})
                return self.attempt + 1
        else:
            tail = "".join(self._stderr_tail())
            raise JobFailed("run_crashed", f"training exited with {outcome.returncode}: {tail}", user_error=False)
        return None

    def _stderr_tail(self, lines: int = 15) -> list[str]:
        try:
            text = (self.work / "train.log").read_text(errors="replace").splitlines(keepends=True)
        except OSError:
            return []
        return text[-lines:]

    def run(self, job: Job) -> int | None:
        """The attempt from claimed to finished; returns a new attempt to enqueue if this one was interrupted."""
        try:
            spec_path, resume = self.prepare(job)
            outcome = self.supervise(spec_path, resume, job.gpus)
            return self.conclude(outcome)
        except JobFailed as exc:
            log.warning("Job %s: attempt %s failed: %s: %s", self.job_id, self.attempt, exc.code, exc.message)
            self.finish(JobStatus.failed, error_code=exc.code, error_message=exc.message[:4000],
                        error_is_user=exc.user_error)  # fmt: skip
        except LeaseLost as exc:
            log.warning("%s; stopped its run", exc)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
