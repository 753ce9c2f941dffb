"""One attempt of one job: fetch the inputs, run training as a child process, follow it, hand back or finish.

The worker process never imports torch: training runs as `python -m training run` in its own process
group (so cancel can stop every process of it, including the ranks that `accelerate launch` starts).
Its JSON-lines events become event rows and job progress through the attempt's `Lease`, which renews
itself through the whole attempt (fetches and uploads included); each checkpoint the run saves is uploaded
(manifest last) while it trains. The run is stopped before the lease can expire (see `worker.lease`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from jobs import layout, modelref
from jobs.models import Job, JobStatus
from jobs.perimeter import Refused, confine
from jobs.registry import Registry
from jobs.store import Finished, JobStore
from settings import Settings
from storage import Storage, StorageError, get_dir, open_uri, put_dir
from storage.cache import ModelCache
from training.launch import run_env
from training.parent import die_with_parent
from training.spec import EXIT_OK, EXIT_STOPPED, MANIFEST_NAME, SpecError, parse_spec
from worker.lease import Lease, LeaseLost
from worker.tracking import Tracker
from worker.workdir import AttemptDir, sweep

log = logging.getLogger("prefq.worker")
_EOF = object()
HUB_SKIPPED = ["*.onnx", "onnx/*", "*.gguf", "*.msgpack", "*.h5", "tf_model*", "flax_model*", "rust_model*",
               "original/*", "*.ot"]  # weights of other frameworks: a hub model is fetched for transformers only


class JobFailed(Exception):
    """The attempt cannot go on; recorded on the job as (code, message, user's fault)."""

    def __init__(self, code: str, message: str, user_error: bool):
        super().__init__(message)
        self.code, self.message, self.user_error = code, message, user_error


@dataclass
class Outcome:
    returncode: int | None = None
    done: dict | None = None
    error: dict | None = None
    cancelled: bool = False
    lease_expiring: bool = False  # stopped because the lease could not be renewed in time
    stopping: bool = False  # stopped because the worker shuts down


@dataclass
class Result:
    """How the attempt ended: a terminal transition, a new attempt to enqueue, or neither (lease lost)."""

    finished: Finished | None = None
    requeued: int | None = None


class Uploader:
    """Uploads checkpoint folders in order on one thread, so training and heartbeats go on meanwhile. Every file
    goes up only while the lease is valid: an attempt that lost it writes nothing more to the job's prefix."""

    def __init__(self, storage: Storage, lease: Lease):
        self.storage, self.lease, self.jobs, self.errors = storage, lease, queue.Queue(), []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _put(self, local: Path, key: str) -> None:
        if not self.lease.valid():
            raise LeaseLost(f"upload of {key} stopped: the lease is gone")
        self.storage.put_file(local, key)

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            local, prefix = item
            try:
                if local.is_file():  # one file (a reference log-prob cache), to `prefix` + its name
                    self._put(local, prefix + local.name)
                else:
                    put_dir(self.storage, local, prefix, last=MANIFEST_NAME, put=self._put)
            except LeaseLost as exc:
                log.warning("%s", exc)
            except (StorageError, OSError) as exc:
                self.errors.append(f"upload of {local} failed: {exc}")

    def add(self, local: Path, prefix: str) -> None:
        self.jobs.put((local, prefix))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def hub_snapshot(ref: modelref.ModelRef, name: str) -> str:
    """A hub model's folder in the hub cache shared by this host's jobs (`HF_HOME`/`HF_HUB_CACHE`), downloaded on a
    miss with `HF_TOKEN` unless `HF_HUB_OFFLINE` is set. A model that cannot be found is the user's error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )  # fmt: skip

    try:
        return snapshot_download(ref.value, revision=ref.revision, ignore_patterns=HUB_SKIPPED)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise JobFailed("model_not_found", f"model: {name} is not on the hub, or not readable with this server's "
                        f"token ({type(exc).__name__})", user_error=True) from None  # fmt: skip
    except LocalEntryNotFoundError:
        if HF_HUB_OFFLINE:
            raise JobFailed("model_not_found", f"model: {name} is not in this worker's hub cache, and the worker is "
                            "offline (HF_HUB_OFFLINE)", user_error=True) from None  # fmt: skip
        raise JobFailed("hub_unavailable", f"model: {name} could not be downloaded: the hub is not reachable",
                        user_error=False) from None  # fmt: skip
    except (HfHubHTTPError, OSError) as exc:
        raise JobFailed("hub_unavailable", f"model: {name} could not be downloaded: {exc}", user_error=False) from None


def stop_run(pid_file: Path) -> None:
    """Ask the run recorded in `pid_file` to checkpoint and stop (the worker is shutting down)."""
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


class JobRun:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage, job: Job, owner: str,
                 pid_file: Path, claim_sent: float, stopping: threading.Event):  # fmt: skip
        self.settings, self.store, self.storage = settings, store, storage
        self.job, self.job_id, self.attempt, self.owner = job, job.id, job.attempt, owner
        self.pid_file = pid_file  # where the worker's main process finds the run to stop it on shutdown
        self.stopping = stopping  # set when this process is told to shut down (SIGTERM)
        self.lease = Lease(store, job.id, job.attempt, owner, settings.lease_ttl_s, settings.heartbeat_s, claim_sent)
        self.models = ModelCache(settings.work_dir / "models", int(settings.model_cache_gb * 1e9))
        self.proc: subprocess.Popen | None = None
        self.held_fds: list[int] = []  # locks the run inherits: its folder, the cached model it reads
        self.work: Path | None = None
        self.samples: list[dict] = []  # the job's `samples` events, kept as an artifact
        # When renewals fail, the run is SIGTERMed (it checkpoints) `stop_grace_s` before the SIGKILL that comes
        # `kill_margin_s` before the lease may expire: half the lease is tolerance, half the time to stop. A run
        # whose supervisor died stops itself within `stop_grace_s` too (`python -m training run --stop-grace-s`).
        ttl, beat = settings.lease_ttl_s, settings.heartbeat_s
        self.kill_margin_s = max(1.0, 0.1 * ttl)
        self.stop_grace_s = max(1.0, min(settings.cancel_grace_s, (ttl - beat) / 2 - self.kill_margin_s))

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

    def _confine(self, ref: str, field: str, models: bool) -> str:
        """The API checked the reference; the worker checks again before it reads anything (`jobs.perimeter`)."""
        s = self.settings
        try:
            return confine(ref, field, self.job.tenant, s.storage_url, s.shared_models, s.model_roots, models,
                           s.allowed_hub_models)  # fmt: skip
        except Refused as exc:
            raise JobFailed("reference_not_allowed", str(exc), user_error=True) from None

    def _dataset(self, ref: str, local: Path, field: str) -> Path:
        uri = self._confine(ref, field, models=False)
        if ref.startswith("ds_"):
            dataset = self.store.get_dataset(ref)
            if dataset is None or dataset.tenant != self.job.tenant:
                raise JobFailed("dataset_unavailable", f"{field}: no dataset {ref}", user_error=True)
            uri = dataset.uri
        self._fetch(uri, local, "dataset")
        return local

    def _model(self, model: str) -> str:
        model = self._confine(model, "model", models=True)
        parsed = modelref.parse(model)
        if parsed.kind == "hub":
            return hub_snapshot(parsed, model)
        if parsed.kind == "registered":  # the API pins these to a version's job; a row written otherwise still works
            version = Registry(self.store.engine).resolve(self.job.tenant, parsed.value, parsed.step, parsed.revision)
            if version is None:
                raise JobFailed("model_not_found", f"model: no registered model {model} of this tenant's",
                                user_error=True)  # fmt: skip
            model, parsed = version.fine_tuned_model, modelref.parse(version.fine_tuned_model)
        if parsed.kind == "job":
            model = self._job_model(parsed, model)
        if "://" not in model:
            if not (Path(model) / "config.json").is_file():
                raise JobFailed("invalid_model", f"model: no model folder at {model} on this worker", user_error=True)
            return model
        folder, fd = self.models.open(model, lambda local: self._fetch(model, local, "model", prefix=True))
        self.held_fds.append(fd)
        return str(folder)

    def _job_model(self, ref: modelref.ModelRef, name: str) -> str:
        """The storage URI of a succeeded job's model (or checkpoint), if the job is this job's tenant's."""
        source = self.store.get_job(ref.value)
        if source is None or source.tenant != self.job.tenant or source.status != JobStatus.succeeded:
            raise JobFailed("model_not_found", f"model: no succeeded job of this tenant's for {name}", user_error=True)
        if ref.step is None:
            return source.result_uri
        return self.storage.uri(layout.checkpoint_prefix(source.tenant, source.id, ref.step))

    def _reference_cache(self, job: Job) -> Path:
        """The reference log-probs earlier attempts and jobs of the tenant computed on this model and data, fetched
        into a local folder that the run reads and writes (`training.refcache` names each file by its full key; the
        group here only narrows what to fetch). What the run adds is uploaded back."""
        group = hashlib.sha256(json.dumps([job.model, job.dataset_id, job.eval_dataset_id]).encode()).hexdigest()[:24]
        self.refcache_prefix = layout.refcache_prefix(job.tenant, group)
        folder = self.work / "refcache"
        folder.mkdir()
        try:
            get_dir(self.storage, self.refcache_prefix, folder)
        except StorageError:
            pass  # nothing cached yet
        return folder

    def _resume_checkpoint(self, out: Path) -> int | None:
        """Download the newest complete checkpoint of the job, if it has one; returns its step."""
        keys = self.storage.list(layout.checkpoints_prefix(self.job.tenant, self.job_id))
        steps = layout.complete_checkpoints(self.job.tenant, self.job_id, keys, MANIFEST_NAME)
        if not steps:
            return None
        step = max(steps)
        get_dir(self.storage, steps[step], out / f"checkpoint-{step}")
        return step

    def prepare(self) -> tuple[Path, bool]:
        """Fetch data, model and checkpoint into the work folder and write the spec; returns (spec, resume)."""
        job, out = self.job, self.work / "out"
        out.mkdir(parents=True)
        data = {**job.hyperparameters, "method": job.method, "trainer": job.trainer, "gpus": max(1, job.gpus),
                "model": self._model(job.model),
                "train_file": str(self._dataset(job.dataset_id, self.work / "train.jsonl", "dataset"))}  # fmt: skip
        if job.eval_dataset_id:
            data["eval_file"] = str(self._dataset(job.eval_dataset_id, self.work / "eval.jsonl", "eval_dataset"))
        try:
            spec = parse_spec(data)
        except SpecError as exc:
            raise JobFailed("invalid_spec", str(exc), user_error=True) from None
        if job.method == "dpo":  # cached reference log-probs (ignored by the run without a reference)
            data["ref_cache_dir"] = str(self._reference_cache(job))
            spec = parse_spec(data)
        spec_path = self.work / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        self.tracker.start(spec.model_dump(mode="json"))
        step = self._resume_checkpoint(out)
        self.samples = self._earlier_samples()
        if step is not None:
            self.lease.post(("resuming", {"step": step}))
        return spec_path, step is not None

    # -- the run ------------------------------------------------------------------------------------

    def _launch(self, spec_path: Path, resume: bool, gpus: int) -> None:
        cmd = [sys.executable, "-P", "-m", "training", "run", str(spec_path), "--out", str(self.work / "out"),
               "--stop-grace-s", str(self.stop_grace_s)]  # fmt: skip
        env = run_env(dict(os.environ), self.settings.gpu_ids, gpus)
        stderr = open(self.work / "train.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=self.work, start_new_session=True, pass_fds=self.held_fds,
                                     preexec_fn=die_with_parent)  # fmt: skip
        stderr.close()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(str(self.proc.pid))
        self.lease.post(("launched", {"pid": self.proc.pid, "resume": resume}))

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reader(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:
            lines.put(line)
        lines.put(_EOF)

    def _handle(self, event: dict, outcome: Outcome, uploader: Uploader) -> None:
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
            uploader.add(Path(event["path"]), layout.checkpoint_prefix(self.job.tenant, self.job_id, event["step"]))
        elif kind == "ref_logprobs" and not event.get("cached") and event.get("path"):
            uploader.add(Path(event["path"]), self.refcache_prefix)  # for the next attempt or job
        elif kind == "samples":
            self._keep_samples(data, uploader)
        elif kind == "done":
            outcome.done = event
        elif kind == "error":
            outcome.error = event
        self.lease.post((kind, data), **fields)
        self.tracker.on_event(kind, data)

    def _keep_samples(self, samples: dict, uploader: Uploader) -> None:
        """Every `samples` event of the job so far, earlier attempts' included, as one artifact (`samples.json`)."""
        self.samples.append(samples)
        path = self.work / "artifacts" / layout.SAMPLES_ARTIFACT
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.samples))
        os.replace(tmp, path)  # the uploader reads one whole version
        uploader.add(path, layout.artifacts_prefix(self.job.tenant, self.job_id))

    def _earlier_samples(self) -> list[dict]:
        key = layout.artifacts_prefix(self.job.tenant, self.job_id) + layout.SAMPLES_ARTIFACT
        local = self.work / "artifacts" / layout.SAMPLES_ARTIFACT
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not self.storage.exists(key):
                return []
            self.storage.get_file(key, local)
            earlier = json.loads(local.read_text())
        except (StorageError, OSError, ValueError) as exc:
            log.warning("Job %s: earlier samples unreadable (%s); this attempt's samples start afresh", self.job_id, exc)
            return []
        return earlier if isinstance(earlier, list) else []

    def _steer(self, outcome: Outcome) -> float | None:
        """Stop the run when the job is cancelled or the lease runs short; returns when to SIGKILL, if due."""
        left = self.lease.remaining_s()
        if self.lease.lost.is_set() or left <= self.kill_margin_s:
            self._signal_group(signal.SIGKILL)
            return None
        stop = None
        if self.lease.status == JobStatus.cancelling and not outcome.cancelled:
            log.info("Job %s: cancelling, SIGTERM to the run", self.job_id)
            outcome.cancelled, stop = True, self.settings.cancel_grace_s
        if left <= self.kill_margin_s + self.stop_grace_s and not outcome.lease_expiring:
            log.warning("Job %s: the lease could not be renewed (%.1fs left); stopping the run", self.job_id, left)
            outcome.lease_expiring, stop = True, self.stop_grace_s
        if self.stopping.is_set() and not outcome.stopping:
            log.info("Job %s: the worker is shutting down, SIGTERM to the run", self.job_id)
            outcome.stopping, stop = True, self.settings.cancel_grace_s
        if stop is not None:
            self._signal_group(signal.SIGTERM)
            return time.monotonic() + stop
        return None

    def supervise(self, spec_path: Path, resume: bool, gpus: int) -> Outcome:
        outcome, uploader, lines = Outcome(), Uploader(self.storage, self.lease), queue.Queue()
        self._launch(spec_path, resume, gpus)
        threading.Thread(target=self._reader, args=(lines,), daemon=True).start()
        kill_at = None
        try:
            while True:
                try:
                    line = lines.get(timeout=0.1)
                except queue.Empty:
                    line = None
                if line is _EOF:
                    break
                if line is not None:
                    try:
                        self._handle(json.loads(line), outcome, uploader)
                    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
                        log.warning("Job %s: unreadable event line %r", self.job_id, line[:200])
                kill_at = self._steer(outcome) or kill_at
                if kill_at is not None and time.monotonic() >= kill_at and self.proc.poll() is None:
                    log.warning("Job %s: the run ignored SIGTERM, SIGKILL", self.job_id)
                    self._signal_group(signal.SIGKILL)
        finally:
            outcome.returncode = self.proc.wait()
            self._signal_group(signal.SIGKILL)  # no process of the run outlives it
            self.pid_file.unlink(missing_ok=True)
            uploader.close()
        if self.lease.lost.is_set():
            raise LeaseLost(f"Job {self.job_id}: attempt {self.attempt} lost its lease; its run is stopped")
        if uploader.errors and not outcome.lease_expiring:
            raise JobFailed("storage_error", "; ".join(uploader.errors), user_error=False)
        return outcome

    # -- the end ------------------------------------------------------------------------------------

    def _store_call(self, fn, *args, **kwargs):
        """A store write at the end of the attempt, retried through a database outage for up to a lease. If the
        database stays away, it gives up (None): the lease expires and the reconciler takes the job over."""
        retrying = Retrying(retry=retry_if_exception_type(Exception), reraise=True,
                            stop=stop_after_delay(self.settings.lease_ttl_s),
                            wait=wait_random_exponential(multiplier=0.2, max=5))  # fmt: skip
        try:
            return retrying(fn, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises; the reconciler recovers
            log.warning("Job %s: attempt %s could not write its end (%s); the reconciler will take it over",
                        self.job_id, self.attempt, exc)  # fmt: skip
            return None

    def _finish(self, status: JobStatus, **fields) -> Finished | None:
        self.tracker.finish(status, fields.get("result_uri"))  # before the job shows its end: tracking shows it too
        self.lease.flush(self.settings.lease_ttl_s)
        self.lease.close()
        done = self._store_call(self.store.finish, self.job_id, self.attempt, self.owner, status, **fields)
        log.info("Job %s: attempt %s %s", self.job_id, self.attempt, status.value if done else "lost its lease")
        return done

    def hand_back(self, reason: str) -> int | None:
        """Queue the job again as the next attempt (it resumes from the newest checkpoint), if still ours."""
        self.tracker.finish(None)
        self.lease.flush(self.settings.lease_ttl_s)
        self.lease.close()
        if not self._store_call(self.store.requeue, self.job_id, self.attempt, self.owner):
            return None
        self._store_call(self.store.add_event, self.job_id, self.attempt + 1, "requeued", {reason: self.attempt})
        return self.attempt + 1

    def conclude(self, outcome: Outcome) -> Result:
        if outcome.lease_expiring:  # stopped in time; the next attempt resumes from the newest uploaded checkpoint
            return Result(requeued=self.hand_back("lease_expiring_attempt"))
        if outcome.cancelled:
            return Result(finished=self._finish(JobStatus.cancelled))
        if outcome.returncode == EXIT_OK and outcome.done:
            prefix = layout.model_prefix(self.job.tenant, self.job_id)
            try:
                put_dir(self.storage, Path(outcome.done["final_path"]), prefix)
            except (StorageError, OSError) as exc:
                raise JobFailed("storage_error", f"upload of the final model failed: {exc}", user_error=False) from exc
            metrics = outcome.done.get("metrics", {})
            return Result(finished=self._finish(JobStatus.succeeded, result_uri=self.storage.uri(prefix),
                                                step=metrics.get("step", 0),
                                                eval_metrics=metrics.get("eval") or {}))  # fmt: skip
        if outcome.error:
            err = outcome.error
            if not err.get("user_error"):  # for the operator: the run's own traceback, in the worker's log
                log.warning("Job %s: the run's last lines:\n%s", self.job_id, "".join(self._stderr_tail(150)))
            raise JobFailed(err.get("code", "training_failed"), err.get("message", ""), bool(err.get("user_error")))
        # the worker is shutting down (or the run was told to stop some other way): another attempt resumes it.
        # A run stopped before it could install its SIGTERM handler dies of the signal: the same hand-back.
        if outcome.returncode == EXIT_STOPPED or outcome.stopping:
            return Result(requeued=self.hand_back("interrupted_attempt"))
        tail = "".join(self._stderr_tail())
        raise JobFailed("run_crashed", f"training exited with {outcome.returncode}: {tail}", user_error=False)

    def _stderr_tail(self, lines: int = 15) -> list[str]:
        try:
            text = (self.work / "train.log").read_text(errors="replace").splitlines(keepends=True)
        except OSError:
            return []
        return text[-lines:]

    def run(self) -> Result:
        """The attempt from claimed to its end."""
        sweep(self.settings.work_dir)
        attempt_dir = AttemptDir(self.settings.work_dir, self.job_id, self.attempt)
        self.work, self.held_fds = attempt_dir.path, [attempt_dir.fd]
        self.tracker = Tracker(self.settings, self.job, self.work, self.storage)
        self.lease.post(("claimed", {"worker": self.owner.split("/")[0], "attempt": self.attempt}))
        try:
            spec_path, resume = self.prepare()
            if self.lease.lost.is_set():
                raise LeaseLost(f"Job {self.job_id}: attempt {self.attempt} lost its lease while fetching")
            if self.lease.status == JobStatus.cancelling:
                return Result(finished=self._finish(JobStatus.cancelled))
            if self.stopping.is_set():
                return Result(requeued=self.hand_back("interrupted_attempt"))
            return self.conclude(self.supervise(spec_path, resume, self.job.gpus))
        except JobFailed as exc:
            log.warning("Job %s: attempt %s failed: %s: %s", self.job_id, self.attempt, exc.code, exc.message)
            return Result(finished=self._finish(JobStatus.failed, error_code=exc.code,
                                                error_message=exc.message[:4000], error_is_user=exc.user_error))  # fmt: skip
        except LeaseLost as exc:
            log.warning("%s; it writes nothing more", exc)
            return Result()
        finally:
            self.tracker.finish(None, keep=False)  # the lease was lost: nothing more to the job's storage
            self.lease.close()
            for fd in self.held_fds[1:]:
                os.close(fd)
            attempt_dir.release()
