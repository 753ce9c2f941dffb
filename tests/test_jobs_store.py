"""The job store on SQLite and on the PostgreSQL server: transitions, leases, fencing, queries, events."""

import time

import pytest
from sqlalchemy import text

from jobs.db import make_engine
from jobs.models import INF_BUCKET, Dataset, Job, JobStatus, new_id
from jobs.outbox import Outbox
from jobs.service import ServiceLeases, count_by_status, duration_buckets
from jobs.store import JobStore
from tests.conftest import copy_sqlite


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = copy_sqlite(request.getfixturevalue("sqlite_template"), tmp_path / "jobs.db")
    else:
        url = request.getfixturevalue("pg_store_url")
        with make_engine(url).begin() as conn:
            conn.execute(text("TRUNCATE job_events, callbacks, jobs, datasets, workers"))
            conn.execute(text("UPDATE job_duration_buckets SET count = 0, sum_s = 0"))
            conn.execute(text("UPDATE service_leases SET holder = NULL, expires_at = 0, last_run_at = NULL"))
    return JobStore(make_engine(url))


@pytest.fixture(scope="module")
def pg_store_url(pg_template):
    """A migrated database of these tests' own: the stack's database must keep its rows."""
    from tests.services import create_pg_database, drop_pg_database

    url, name = create_pg_database(template=pg_template)
    yield url
    drop_pg_database(name)


def create(store, **fields) -> tuple[Job, bool]:
    base = dict(id=new_id("job"), method="dpo", trainer="basic", gpus=1, model="/m", dataset_id="ds_x")
    return store.create_jobs([(Job(**{**base, **fields}), [("queued", {"queue": "gpu1"})])])[0]


def test_claim_is_exclusive_and_fenced(store):
    job, created = create(store)
    assert created and job.status == JobStatus.queued and job.attempt == 1
    claimed = store.claim(job.id, 1, "w1", ttl_s=30)
    assert claimed.status == JobStatus.running and claimed.lease_owner == "w1" and claimed.started_at
    assert store.claim(job.id, 1, "w2", ttl_s=30) is None, "a redelivered message must not train twice"
    assert store.record(job.id, 1, "w2", 30) is None, "a writer without the lease is fenced off"
    assert store.record(job.id, 1, "w1", 30, [("progress", {"step": 3})], step=3) == JobStatus.running
    assert store.get_job(job.id).step == 3
    assert store.finish(job.id, 1, "w1", JobStatus.succeeded, result_uri="s3://b/m")
    assert not store.finish(job.id, 1, "w1", JobStatus.failed), "a finished job does not move again"
    assert store.claim(job.id, 1, "w3", ttl_s=30) is None
    done = store.get_job(job.id)
    assert done.status == JobStatus.succeeded and done.lease_owner is None and done.finished_at >= done.started_at


def test_cancel_queued_at_once_and_running_through_cancelling(store):
    queued, _ = create(store)
    assert store.request_cancel(queued.id)[0] == JobStatus.cancelled
    assert store.claim(queued.id, 1, "w", 30) is None
    running, _ = create(store)
    store.claim(running.id, 1, "w", 30)
    assert store.request_cancel(running.id) == (JobStatus.cancelling, None)
    assert store.record(running.id, 1, "w", 30) == JobStatus.cancelling, "the worker sees it at its heartbeat"
    assert store.finish(running.id, 1, "w", JobStatus.cancelled)
    assert store.request_cancel(running.id) is None


def test_retry_makes_a_new_attempt_and_fences_the_old_one(store):
    job, _ = create(store)
    store.claim(job.id, 1, "w", 30)
    store.finish(job.id, 1, "w", JobStatus.failed, error_code="run_crashed", error_is_user=False)
    assert store.retry(job.id, auto_attempts=3) == 2
    again = store.get_job(job.id)
    assert again.status == JobStatus.queued and again.attempt == 2 and again.error_code is None
    assert again.max_attempts == 4
    assert store.claim(job.id, 1, "w", 30) is None, "the old attempt's message is stale"
    assert store.claim(job.id, 2, "w", 30) is not None
    assert store.retry(job.id, 3) is None, "a running job is not retried"


def test_expired_lease_is_requeued_once_and_the_old_worker_is_fenced(store):
    job, _ = create(store)
    store.claim(job.id, 1, "dead", ttl_s=0.2)
    assert store.expired() == []
    time.sleep(0.4)
    (expired,) = store.expired()
    assert expired.id == job.id
    assert store.requeue(job.id, 1)
    assert not store.requeue(job.id, 1), "two reconcilers cannot both move it"
    assert store.record(job.id, 1, "dead", 30) is None
    assert store.get_job(job.id).attempt == 2 and store.get_job(job.id).status == JobStatus.queued


def test_a_hand_back_keeps_the_jobs_automatic_attempts_and_says_why_it_waits(store):
    """Handed back by its worker (its nodes not placed): queued as the next attempt with the reason, none of its
    automatic attempts spent, its task due `later_s` from now (not re-sent by the reconciler before); a worker
    that takes it clears the reason. The reconciler's requeue of an expired lease spends one."""
    job, _ = create(store)
    store.claim(job.id, 1, "w", 30)
    assert not store.requeue(job.id, 1, "other", "waiting"), "fenced by its owner"
    assert store.requeue(job.id, 1, "w", "waiting for 2 nodes", later_s=60)
    waiting = store.get_job(job.id)
    assert (waiting.status, waiting.attempt, waiting.max_attempts) == (JobStatus.queued, 2, job.max_attempts + 1)
    assert waiting.queued_reason == "waiting for 2 nodes" and waiting.enqueued_at > time.time() + 50
    assert store.unclaimed(older_than_s=0) == [], "its task is due later: not lost"
    assert store.claim(job.id, 2, "w", ttl_s=0.2).queued_reason is None
    time.sleep(0.4)
    assert store.requeue(job.id, 2)
    assert store.get_job(job.id).max_attempts == job.max_attempts + 1


def test_idempotency_key_returns_the_same_job(store):
    first, created = create(store, idempotency_key="key-1")
    second, created_again = create(store, idempotency_key="key-1")
    assert created and not created_again and second.id == first.id


def test_a_batch_is_one_commit_and_twins_by_key_share_one_job(store):
    held, _ = create(store, idempotency_key="held")
    base = dict(method="dpo", trainer="basic", gpus=1, model="/m", dataset_id="ds_x")
    jobs = [Job(id=new_id("job"), **base, idempotency_key=key) for key in ("held", "twin", None, "twin")]
    results = store.create_jobs([(job, [("queued", {"queue": "gpu1"})]) for job in jobs])
    assert [(job.id, created) for job, created in results] == [
        (held.id, False),
        (jobs[1].id, True),
        (jobs[2].id, True),
        (jobs[1].id, False),
    ]
    assert count_by_status(store.engine) == {"queued": 3}
    assert [e.type for e in store.events_after(jobs[2].id, 0)] == ["queued"]


def test_a_batch_that_loses_a_key_race_falls_back_to_one_job_at_a_time(store):
    base = dict(method="dpo", trainer="basic", gpus=1, model="/m", dataset_id="ds_x")
    raced = Job(id=new_id("job"), **base, idempotency_key="raced")
    fresh = Job(id=new_id("job"), **base)
    winner, _ = create(store, idempotency_key="raced")
    real, calls = store._by_keys, []

    def stale_once(keys):  # the batch looks the key up just before another API process inserts it
        calls.append(keys)
        return {} if len(calls) == 1 else real(keys)

    store._by_keys = stale_once
    results = store.create_jobs([(raced, []), (fresh, [])])
    assert [(job.id, created) for job, created in results] == [(winner.id, False), (fresh.id, True)]
    assert store.get_job(raced.id) is None and store.get_job(fresh.id) is not None and len(calls) == 2


def test_list_filters_and_pages_newest_first(store):
    ids = []
    for i in range(7):
        job, _ = create(store)
        ids.append(job.id)
        if i % 2:
            store.request_cancel(job.id)
        time.sleep(0.002)
    page, more = store.list_jobs(limit=3)
    assert [j.id for j in page] == ids[::-1][:3] and more
    page2, more2 = store.list_jobs(limit=3, after=page[-1].id)
    page3, more3 = store.list_jobs(limit=3, after=page2[-1].id)
    assert [j.id for j in page2 + page3] == ids[::-1][3:] and more2 and not more3
    cancelled, _ = store.list_jobs(status=JobStatus.cancelled)
    assert [j.id for j in cancelled] == [ids[5], ids[3], ids[1]]
    recent, _ = store.list_jobs(since=store.get_job(ids[4]).created_at)
    assert [j.id for j in recent] == ids[4:][::-1]
    assert count_by_status(store.engine) == {"queued": 4, "cancelled": 3}


def test_events_are_numbered_per_job_and_read_after_a_sequence(store):
    job, _ = create(store)
    other, _ = create(store)
    store.claim(job.id, 1, "w", 30)
    for step in (1, 2):
        store.record(job.id, 1, "w", 30, [("progress", {"step": step})])
    store.record(job.id, 1, "w", 30, [("progress", {"step": 3})])
    store.add_event(other.id, 1, "cancel_requested")
    events = store.events_after(job.id)
    assert [(e.seq, e.type) for e in events] == [(1, "queued"), (2, "progress"), (3, "progress"), (4, "progress")]
    assert [e.data["step"] for e in store.events_after(job.id, after=2)] == [2, 3]
    assert [(e.seq, e.type) for e in store.events_after(other.id)] == [(1, "queued"), (2, "cancel_requested")]


def test_datasets_round_trip(store):
    ds = Dataset(
        id=new_id("ds"),
        filename="a.jsonl",
        uri="s3://b/a",
        bytes=10,
        sha256="00",
        rows=2,
        format="dpo_pairs",
        method="dpo",
        warnings=[{"line": 2, "field": "-", "reason": "dup"}],
    )
    store.add(ds)
    assert store.get_dataset(ds.id).warnings == ds.warnings
    assert store.get_dataset("ds_missing") is None


def test_a_renewal_after_the_lease_expired_fails(store):
    """Judged on the database's clock: an expired lease cannot be renewed, so a worker that was cut off for longer
    than the lease can never train on beside the attempt the reconciler starts."""
    job, _ = create(store)
    store.claim(job.id, 1, "w", ttl_s=0.3)
    assert store.record(job.id, 1, "w", 0.3) == JobStatus.running
    time.sleep(0.5)
    assert store.record(job.id, 1, "w", 30) is None, "expired: the renewal is refused"
    assert [j.id for j in store.expired()] == [job.id]


def test_every_terminal_transition_writes_its_event_callback_and_run_time_in_one_go(store):
    url = "https://hooks.example.com/prefq"
    ok, _ = create(store, callback_url=url)
    store.claim(ok.id, 1, "w", 30)
    time.sleep(0.05)
    done = store.finish(ok.id, 1, "w", JobStatus.succeeded, result_uri="s3://b/m")
    assert done.job.status == JobStatus.succeeded and done.callback_id.startswith("cb_")
    assert store.get_job(ok.id).callback_status == "pending"
    assert [e.type for e in store.events_after(ok.id)][-1] == "succeeded"
    callback = Outbox(store.engine).get(done.callback_id)
    assert (callback.event, callback.url, callback.status) == ("job.succeeded", url, "pending")
    assert callback.payload["id"] == ok.id and callback.payload["status"] == "succeeded"

    queued, _ = create(store, callback_url=url)  # cancelled while queued
    status, cancelled = store.request_cancel(queued.id)
    assert status == JobStatus.cancelled and cancelled.callback_id
    assert store.events_after(queued.id)[-1].type == "cancelled"
    unsent, _ = create(store, callback_url=url)  # its task could not be sent
    failed = store.fail_unsent(unsent.id, 1, "broker down")
    assert failed.callback_id and store.events_after(unsent.id)[-1].data["error"]["code"] == "enqueue_failed"
    dead, _ = create(store, callback_url=url)  # failed by the reconciler
    store.claim(dead.id, 1, "w", ttl_s=0.1)
    time.sleep(0.3)
    (expired,) = store.expired()
    ended = store.fail_expired(expired, JobStatus.failed, error_code="lease_expired", error_is_user=False)
    assert ended.callback_id and store.events_after(dead.id)[-1].type == "failed"
    assert store.fail_expired(expired, JobStatus.failed) is None, "once"
    assert store.finish(ok.id, 1, "w", JobStatus.failed) is None, "a finished job does not move, nor tell, again"
    assert len(Outbox(store.engine).overdue(grace_s=-60)) == 4

    buckets = {(b.status, b.le): b for b in duration_buckets(store.engine)}
    assert buckets[("succeeded", 10)].count == 1 and buckets[("succeeded", INF_BUCKET)].sum_s >= 0.05
    assert buckets[("failed", INF_BUCKET)].count == 1, "the never-started unsent job has no run time"
    assert buckets[("cancelled", INF_BUCKET)].count == 0


def test_a_callback_is_claimed_by_one_delivery_at_a_time(store):
    job, _ = create(store, callback_url="https://hooks.example.com/x")
    store.claim(job.id, 1, "w", 30)
    done = store.finish(job.id, 1, "w", JobStatus.succeeded)
    outbox = Outbox(store.engine)
    first = outbox.claim(done.callback_id, busy_s=30)
    assert first.tries == 1 and outbox.claim(done.callback_id, busy_s=30) is None, "a second copy waits"
    outbox.try_failed(first, "503", retry_in_s=0)
    second = outbox.claim(done.callback_id, busy_s=30)
    assert second.tries == 2
    outbox.delivered(second)
    assert outbox.claim(done.callback_id, busy_s=30) is None and outbox.get(done.callback_id).status == "delivered"
    assert store.get_job(job.id).callback_status == "delivered"


def test_a_service_lease_has_one_holder_until_it_expires_or_is_released(store):
    leases = ServiceLeases(store.engine)
    assert leases.acquire("reconciler", "a", ttl_s=0.3)
    assert not leases.acquire("reconciler", "b", ttl_s=30) and leases.acquire("reconciler", "a", ttl_s=0.3)
    time.sleep(0.5)
    assert leases.acquire("reconciler", "b", ttl_s=30), "expired: another may take it"
    leases.release("reconciler", "b", {"requeued": 2})
    lease = leases.get("reconciler")
    assert lease.holder is None and lease.last_result == {"requeued": 2} and lease.last_run_at
    assert leases.acquire("reconciler", "a", ttl_s=30)


def test_unclaimed_lists_queued_jobs_whose_task_was_sent_long_enough_ago(store):
    job, _ = create(store)
    assert store.unclaimed(older_than_s=0.2) == []
    time.sleep(0.4)
    assert [j.id for j in store.unclaimed(older_than_s=0.2)] == [job.id]
    assert store.mark_enqueued(job.id, 1) and store.unclaimed(older_than_s=0.2) == []
