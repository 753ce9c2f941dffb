"""A job's events: pages of them, and a live stream that the SSE faces frame (`api.routes.jobs`, the dashboard)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from api.deps import Services
from jobs.models import JobEvent

MAX_SEQ = 2**31 - 1  # event sequence numbers are 32-bit integers in the database
POLL_S = 0.5
IDLE_S = 15.0  # a quiet stream yields None this often, so that its face can send a keep-alive


def start_after(last_event_id: str | None, default: int) -> int:
    """Where a stream resumes: after the `Last-Event-ID` a reconnecting client sends, else after `default`."""
    last = last_event_id or ""
    return int(last) if last.isdigit() and int(last) <= MAX_SEQ else default


async def follow(
    svc: Services, job_id: str, after: int, disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[JobEvent | None]:
    """The job's events with a sequence number above `after` as they are written, until the job has finished and its
    terminal event (written in the transaction of the status change) has been yielded; None after each `IDLE_S`
    without one. Stops early when `disconnected()` says the client left."""
    idle, finished = 0.0, False
    while not await disconnected():
        events = await asyncio.to_thread(svc.store.events_after, job_id, after)
        for e in events:
            after = e.seq
            yield e
        if events:
            continue
        if finished:
            return  # one more read after the job finished: its terminal event is in
        job = await asyncio.to_thread(svc.store.get_job, job_id)
        if job is None or job.status.finished:
            finished = True
            continue
        idle += POLL_S
        if idle >= IDLE_S:
            idle = 0.0
            yield None
        await asyncio.sleep(POLL_S)


def all_events(svc: Services, job_id: str, types: set[str] | None = None) -> list[JobEvent]:
    """Every event of the job, oldest first (of `types`, where given)."""
    out: list[JobEvent] = []
    after = 0
    while True:
        page = svc.store.events_after(job_id, after, 1000)
        out.extend(e for e in page if types is None or e.type in types)
        if len(page) < 1000:
            return out
        after = page[-1].seq
