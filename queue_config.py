"""Celery's options, derived from the settings (`settings.Settings`): broker, queues per device count, routes,
late ack, prefetch 1, visibility timeout; the task names and the helpers that send them; kombu's Redis layout."""

from __future__ import annotations

import json

from celery import Celery

from settings import Settings

RUN_JOB = "prefq.run_job"
DELIVER_CALLBACK = "prefq.deliver_callback"
RECONCILE = "prefq.reconcile"
MIRROR_MODEL_VERSION = "prefq.mirror_model_version"  # the service worker copies a registry version to MLflow
CPU_QUEUE = "cpu"
SERVICE_QUEUE = "service"  # callbacks and the reconciler: never behind a training run


# kombu's Redis layout: a list per queue and priority step, and the delivered-but-unacknowledged messages in
# a hash (delivery tag -> [message, exchange, routing key]) with their delivery times in a sorted set.
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, one per priority step."""
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def task_ids_in_broker(client, queues: list[str]) -> tuple[set[str], dict[str, tuple[str, float]]]:
    """Task ids of the messages waiting in `queues`, and of the delivered, unacknowledged ones (task id ->
    (delivery tag, delivered at)) of every queue. One pass over the lists: O(messages waiting)."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in queue_keys(queue):
                pipe.lrange(key, 0, -1)
        pipe.hgetall(UNACKED)
        pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
        *lists, unacked, index = pipe.execute()
    waiting = {_task_id(m) for messages in lists for m in messages}
    delivered_at = {_text(tag): score for tag, score in index}
    held = {
        _task_id(value, unacked=True): (_text(tag), delivered_at.get(_text(tag), 0.0)) for tag, value in unacked.items()
    }
    return waiting - {None}, {k: v for k, v in held.items() if k is not None}


def waiting_counts(client, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each of `queues` (all its priority steps), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in queue_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
    n = len(PRIORITY_STEPS)
    return {queue: sum(lengths[i * n : (i + 1) * n]) for i, queue in enumerate(queues)}


def forget_unacked(client, tag: str) -> None:
    """Drop a delivered, unacknowledged message (by delivery tag) from kombu's unacked hash and its index, so that
    kombu never restores it to its queue."""
    with client.pipeline() as pipe:
        pipe.zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _task_id(raw: bytes, unacked: bool = False) -> str | None:
    """The Celery task id of a raw kombu message (None for a message that is not a Celery task)."""
    try:
        message = json.loads(raw)
        return (message[0] if unacked else message)["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def gpu_queue(gpus: int) -> str:
    """The queue of jobs that need `gpus` devices; `gpus == 0` runs on a CPU."""
    return CPU_QUEUE if gpus == 0 else f"gpu{gpus}"


def worker_queues(settings: Settings) -> list[str]:
    """A worker with N devices takes jobs of 1..N devices (a job uses the first ones); CPU jobs without GPUs."""
    queues = [gpu_queue(n) for n in range(1, settings.devices + 1)]
    return queues if settings.gpu_ids else [CPU_QUEUE, *queues]


def _restore_sweep(settings: Settings) -> dict:
    if settings.visibility_timeout_s >= 600:
        return {}
    return {"unacked_restore_interval": max(1, settings.visibility_timeout_s // 5), "unacked_restore_throttle": 1}


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # The job table holds every result and state: Celery keeps none.
        "task_ignore_result": True,
        "result_backend": None,
        # Ack after the task body returns: a worker that dies mid-job leaves its message to be re-sent.
        # Safe because run_job is idempotent by (job id, attempt): the lease makes a second copy exit.
        "task_acks_late": True,
        # A pool child killed by the OOM killer or SIGKILL: re-queue the message instead of acking it.
        "task_reject_on_worker_lost": True,
        # One job at a time per worker, and no second job reserved behind a running one.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # Redis re-sends an unacked message after this: keep it above the longest job (the lease decides).
        # kombu sweeps for expired unacked messages only every interval x throttle (10 x 10 s): with a short
        # visibility timeout (chaos runs, tests), sweep at a fifth of it instead.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s, **_restore_sweep(settings)},
        # Routes live here, not on decorators: training by device count, the rest on the service queue.
        "task_routes": {
            DELIVER_CALLBACK: {"queue": SERVICE_QUEUE},
            RECONCILE: {"queue": SERVICE_QUEUE},
            MIRROR_MODEL_VERSION: {"queue": SERVICE_QUEUE},
        },
        "task_default_queue": SERVICE_QUEUE,
        "task_create_missing_queues": True,
        # Flower shows tasks and workers from these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # No Celery time limit: a job's length is the user's; cancel and the lease bound it instead.
        "task_time_limit": None,
        # The reconciler runs on the service worker's embedded beat, whose schedule lives in memory: nothing
        # to write, so nothing that a missing or read-only data folder can break.
        "beat_schedule": {
            "reconcile": {"task": RECONCILE, "schedule": settings.reconcile_interval_s},
        },
        "beat_scheduler": "celery.beat:Scheduler",
        # A worker keeps reconnecting to a broker that went away (restarted, failed over) instead of exiting.
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings, name: str = "prefq") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def enqueue_job(
    app: Celery, job_id: str, attempt: int, gpus: int, producer=None, countdown: float | None = None
) -> None:
    """Send one attempt of a job to the queue for its device count; the job row must be committed first.
    Within `with producer.batch():` the message waits for the batch's one pipelined write to the broker.
    The task id names the attempt (`job_….2`), so Flower and the broker show which job a message is. With
    `countdown`, a worker takes it and runs it that many seconds later (Celery's ETA), taking other tasks meanwhile."""
    app.send_task(
        RUN_JOB,
        args=[job_id, attempt],
        queue=gpu_queue(gpus),
        producer=producer,
        task_id=f"{job_id}.{attempt}",
        countdown=countdown or None,
    )


def send_callback(app: Celery, callback_id: str) -> None:
    """Ask the service worker to deliver a callback of the outbox now; if this message is lost, the reconciler
    sends it again."""
    app.send_task(DELIVER_CALLBACK, args=[callback_id])


def send_model_mirror(
    app: Celery,
    tenant: str,
    name: str,
    version: int,
    source_uri: str,
    aliases: list[str],
    metrics: dict[str, float],
    job_id: str | None,
) -> None:
    """Ask the service worker to mirror a registered model version (and its aliases) into MLflow's registry
    (`worker.tracking.mirror_model_version`); send it after the promotion commits. Without MLflow it does nothing."""
    app.send_task(
        MIRROR_MODEL_VERSION,
        kwargs={
            "tenant": tenant,
            "name": name,
            "version": version,
            "source_uri": source_uri,
            "aliases": aliases,
            "metrics": metrics,
            "job_id": job_id,
        },
    )
