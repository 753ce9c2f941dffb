"""Experiment tracking of a job: MLflow runs and W&B offline runs fed from the run's events, and the MLflow mirror
of the model registry. Torch-free: `mlflow` (the skinny client is enough) and `wandb` are imported when first used.

The attempt calls `Tracker.start(params)` once the spec is written, `on_event(kind, data)` for each event and
`finish(status, result_uri)` when the attempt ends (status None: handed back, a later attempt goes on). Each sink
runs on its own thread behind a bounded queue: a slow or unreachable tracking server costs dropped events and a
warning in the worker's log, never the job; the end waits for the sinks at most `FLUSH_S`.

- MLflow (`PREFQ_MLFLOW_TRACKING_URI`): one run per job across attempts, named after the job and tagged
  `prefq.job_id` (a later attempt finds the run by that tag and continues it), in the experiment
  `PREFQ_MLFLOW_EXPERIMENT` of the tenant (`prefq/<tenant>`). Params: the resolved spec (paths replaced by the
  job's model and dataset ids); metrics per step from `progress` and `eval` events (TRL's names, `eval_` prefixed);
  each `samples` event as the artifact `samples/step-<N>-<model>.json`; at the end `result_uri` (tag and param)
  and the status FINISHED, FAILED or KILLED (cancelled).
- W&B (`PREFQ_WANDB_MODE=offline`): an offline run per attempt under the attempt's folder, with the same params,
  metrics and samples (a `wandb.Table` per event), uploaded at the attempt's end to the job's artifacts under
  `wandb/<offline run folder>/`, for `wandb sync`. The job's OpenAI `integrations` entry of type `wandb` names its
  project, name, entity and tags.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from jobs import layout
from jobs.models import Job, JobStatus
from settings import Settings
from storage import Storage, put_dir
from training.events import metrics_of

log = logging.getLogger("prefq.worker")
QUEUE_SIZE = 1000  # events waiting for one sink; beyond, they are dropped
FLUSH_S = 30.0  # how long the end of an attempt waits for its sinks
JOB_TAG = "prefq.job_id"
MLFLOW_STATUS = {JobStatus.succeeded: "FINISHED", JobStatus.failed: "FAILED", JobStatus.cancelled: "KILLED"}
# paths and settings of this worker (and its Ray cluster, with the attempt in its name): not the job's params
LOCAL_FIELDS = ("model", "train_file", "eval_file", "ref_cache_dir", "grading", "cluster")
SAMPLE_COLUMNS = ["step", "model", "index", "prompt", "completion", "tokens", "reward"]


def job_params(job: Job, spec: dict) -> dict[str, str]:
    """The job's params as trackers take them: the resolved spec flattened with `.` (`lora.r`), the job's model and
    dataset ids in place of local paths."""
    flat = {"model": job.model, "dataset": job.dataset_id, "eval_dataset": job.eval_dataset_id or ""}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = "" if value is None else str(value)

    walk("", {k: v for k, v in spec.items() if k not in LOCAL_FIELDS})
    return flat


def experiment_name(settings: Settings, tenant: str) -> str:
    return settings.mlflow_experiment.format(tenant=tenant)


def find_run(client, experiment: str, job_id: str) -> str | None:
    """The id of the job's MLflow run, if one exists (any earlier attempt's)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


class MlflowSink:
    name = "MLflow"

    def __init__(self, settings: Settings, job: Job):
        self.uri, self.job = settings.mlflow_tracking_uri.get_secret_value(), job
        self.experiment = experiment_name(settings, job.tenant)

    def open(self) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = client = MlflowClient(self.uri)
        self.run_id = find_run(client, self.experiment, self.job.id)
        if self.run_id is None:
            found = client.get_experiment_by_name(self.experiment)
            try:
                experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            except MlflowException:  # made meanwhile by another job of the tenant
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            tags = {JOB_TAG: self.job.id, "prefq.tenant": self.job.tenant}
            self.run_id = client.create_run(experiment_id, run_name=self.job.id, tags=tags).info.run_id
        else:
            client.update_run(self.run_id, status="RUNNING")
        client.set_tag(self.run_id, "prefq.attempt", str(self.job.attempt))

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes up to 100 params a batch; the same values again are fine
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def event(self, kind: str, data: dict) -> None:
        from mlflow.entities import Metric

        if kind == "samples":
            self.client.log_dict(self.run_id, data, f"samples/step-{data['step']}-{data['model']}.json")
        elif found := metrics_of(kind, data):
            step, values = found
            at_ms = int(data.get("time", time.time()) * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, at_ms, step) for k, v in values.items()])

    def end(self, status: JobStatus | None, result_uri: str | None, keep: bool) -> None:
        if result_uri:
            self.client.set_tag(self.run_id, "prefq.result_uri", result_uri)
            self.client.log_param(self.run_id, "result_uri", result_uri)
        if status in MLFLOW_STATUS:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def wandb_options(job: Job) -> dict:
    """The `wandb` object of the job's first OpenAI integration of type `wandb` (project, name, entity, tags)."""
    return next((i.get("wandb") or {} for i in job.integrations or [] if i.get("type") == "wandb"), {})


class WandbSink:
    name = "W&B"

    def __init__(self, job: Job, folder: Path, storage: Storage):
        self.job, self.folder, self.storage = job, folder, storage

    def open(self) -> None:
        import wandb

        opts = wandb_options(self.job)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline",
            dir=self.folder,
            id=self.job.id,
            name=opts.get("name") or self.job.id,
            project=opts.get("project") or f"prefq-{self.job.tenant}",
            entity=opts.get("entity"),
            tags=opts.get("tags"),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )
        self.run.config.update({JOB_TAG: self.job.id, "prefq.attempt": self.job.attempt}, allow_val_change=True)

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def event(self, kind: str, data: dict) -> None:
        import wandb

        if kind == "samples":
            rows = [[data["step"], data["model"], *(s.get(c) for c in SAMPLE_COLUMNS[2:])] for s in data["samples"]]
            self.run.log(
                {f"samples/{data['model']}": wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=data["step"]
            )
        elif found := metrics_of(kind, data):
            step, values = found
            self.run.log(values, step=step)

    def end(self, status: JobStatus | None, result_uri: str | None, keep: bool) -> None:
        if result_uri:
            self.run.summary["result_uri"] = result_uri
        self.run.finish(exit_code=1 if status in (JobStatus.failed, JobStatus.cancelled) else 0)
        if keep:  # the offline run folder (`offline-run-<time>-<job id>/`) to the job's artifacts
            run_dir = Path(self.run.dir).parent
            prefix = f"{layout.artifacts_prefix(self.job.tenant, self.job.id)}wandb/{run_dir.name}/"
            put_dir(self.storage, run_dir, prefix)


class _Channel:
    """One sink on its own thread behind a bounded queue. A sink that cannot open is off for the attempt; a call that
    fails is logged and dropped."""

    def __init__(self, sink, job_id: str):
        self.sink, self.job_id, self.items, self.dropped = sink, job_id, queue.Queue(QUEUE_SIZE), 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"prefq-tracking-{sink.name}")
        self.thread.start()

    def put(self, item: tuple) -> None:
        try:
            self.items.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("Job %s: %s tracking is behind; dropping its events", self.job_id, self.sink.name)

    def close(self, item: tuple, deadline: float) -> None:
        try:
            self.items.put(item, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            log.warning("Job %s: %s tracking did not finish in %ss; left behind", self.job_id, self.sink.name, FLUSH_S)

    def _loop(self) -> None:
        try:
            self.sink.open()
        except Exception as exc:  # noqa: BLE001 - whatever the client raises; tracking never fails a job
            log.warning("Job %s: %s tracking is off for this attempt: %s", self.job_id, self.sink.name, exc)
            while self.items.get()[0] != "end":
                pass
            return
        while True:
            method, *args = self.items.get()
            try:
                getattr(self.sink, method)(*args)
            except Exception as exc:  # noqa: BLE001
                log.warning("Job %s: %s tracking dropped a %s call: %s", self.job_id, self.sink.name, method, exc)
            if method == "end":
                return


class Tracker:
    """The tracking of one attempt: the sinks the operator enabled (none: every call does nothing)."""

    def __init__(self, settings: Settings, job: Job, work: Path, storage: Storage):
        sinks = []
        if settings.mlflow_tracking_uri is not None:
            sinks.append(MlflowSink(settings, job))
        if settings.wandb_mode == "offline":
            sinks.append(WandbSink(job, work / "wandb", storage))
        self.channels = [_Channel(sink, job.id) for sink in sinks]
        self.job, self.ended = job, False

    def start(self, spec: dict) -> None:
        params = job_params(self.job, spec)
        for channel in self.channels:
            channel.put(("params", params))

    def on_event(self, kind: str, data: dict) -> None:
        if kind in ("progress", "eval", "samples"):
            for channel in self.channels:
                channel.put(("event", kind, data))

    def finish(self, status: JobStatus | None, result_uri: str | None = None, keep: bool = True) -> None:
        """End the attempt's tracking: the job's status (None: it goes on in another attempt), its model's location;
        `keep=False` (the lease is lost) writes nothing to the job's storage. Only the first call counts."""
        if self.ended:
            return
        self.ended, deadline = True, time.monotonic() + FLUSH_S
        for channel in self.channels:
            channel.close(("end", status, result_uri, keep), deadline)


def registered_model_name(tenant: str, name: str) -> str:
    """The MLflow registered model that mirrors a tenant's registered model: `<tenant>.<name>`."""
    return f"{tenant}.{name}"


def mirror_model_version(
    settings: Settings,
    tenant: str,
    name: str,
    version: int,
    source_uri: str,
    aliases: list[str],
    metrics: dict[str, float],
    job_id: str | None,
) -> str:
    """Create (or find again) the MLflow model version that mirrors version `version` of the tenant's model `name`:
    source `source_uri`, the run of job `job_id` when it has one, tags `prefq.version`, `prefq.job_id` and a
    `metric.<name>` per metric; then make its aliases exactly `aliases` (an alias set here moves from another version).
    Idempotent, so that a retried task does no harm. Returns MLflow's version number."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(settings.mlflow_tracking_uri.get_secret_value())
    model = registered_model_name(tenant, name)
    try:
        client.create_registered_model(model, tags={"prefq.tenant": tenant})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.search_model_versions(f"name = '{model}' and tags.`prefq.version` = '{version}'")
    if found:
        mirrored = found[0]
    else:
        run_id = find_run(client, experiment_name(settings, tenant), job_id) if job_id else None
        tags = {
            "prefq.version": str(version),
            **({"prefq.job_id": job_id} if job_id else {}),
            **{f"metric.{k}": str(v) for k, v in (metrics or {}).items()},
        }
        mirrored = client.create_model_version(model, source_uri, run_id=run_id, tags=tags)
    for alias in aliases:
        client.set_registered_model_alias(model, alias, mirrored.version)
    for alias in set(mirrored.aliases or []) - set(aliases):  # still on this version: a later one may have taken it
        if client.get_model_version_by_alias(model, alias).version == mirrored.version:
            client.delete_registered_model_alias(model, alias)
    log.info(
        "Model %s version %s: mirrored to MLflow as %s version %s, aliases %s",
        name,
        version,
        model,
        mirrored.version,
        aliases,
    )
    return mirrored.version
