"""The lease of one attempt, and every store write the attempt makes while it trains.

The invariant (also in the README): an attempt trains only while it holds an unexpired lease. The lease
expires `lease_ttl_s` after its last renewal, on the database's clock; a renewal after expiry fails; the
reconciler starts a new attempt only once the lease has expired. So the supervisor stops its run before
`valid_until` (the monotonic time the last successful renewal was *sent*, plus the TTL, which is never later
than the expiry in the database), and no two attempts of a job ever train at once, whatever the database,
the broker or the network do.

One thread writes: events and progress fields queued by `post` go to the store, with the renewal, in one
transaction, as soon as they are queued and at least every `heartbeat_s`. A store error is retried with
jittered exponential backoff (tenacity) while events wait in memory, in order.
"""

from __future__ import annotations

import logging
import threading
import time

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from jobs.models import JobStatus
from jobs.store import JobStore

log = logging.getLogger("prefq.worker")


class LeaseLost(Exception):
    """Another attempt owns the job now, or the lease expired: stop without writing anything more."""


class Lease:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        attempt: int,
        owner: str,
        ttl_s: float,
        heartbeat_s: float,
        claim_sent: float,
    ):
        """`claim_sent`: the monotonic time at which the claim that took the lease was sent."""
        self.store, self.job_id, self.attempt, self.owner = store, job_id, attempt, owner
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.valid_until = claim_sent + ttl_s
        self.status = JobStatus.running
        self.lost = threading.Event()
        self._events: list[tuple[str, dict]] = []
        self._fields: dict = {}
        self._written = 0  # events posted and committed so far (a counter over the attempt)
        self._posted = 0
        self._wake = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)
        self._thread.start()

    # -- what the supervisor calls --------------------------------------------------------------------

    def post(self, event: tuple[str, dict] | None = None, **fields) -> None:
        """Queue an event and progress fields for the next write (at once, unless the store is down)."""
        with self._wake:
            if event is not None:
                self._events.append(event)
                self._posted += 1
            self._fields.update(fields)
            self._wake.notify()

    def remaining_s(self) -> float:
        """Seconds until the lease may have expired; negative once it may have."""
        return -1.0 if self.lost.is_set() else self.valid_until - time.monotonic()

    def valid(self) -> bool:
        return self.remaining_s() > 0

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything posted so far is written; False if it was not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            target = self._posted
            self._wake.notify()
            while self._written < target or self._fields:
                left = deadline - time.monotonic()
                if left <= 0 or self.lost.is_set():
                    return False
                self._wake.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        """Stop renewing (the attempt is over: finished, handed back or lost)."""
        self._closing.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the writer thread -----------------------------------------------------------------------------

    def _write_once(self) -> None:
        with self._wake:
            events, fields = list(self._events), dict(self._fields)
        sent = time.monotonic()
        status = self.store.record(self.job_id, self.attempt, self.owner, self.ttl_s, events, **fields)
        if status is None:
            self.lost.set()
            return
        with self._wake:
            del self._events[: len(events)]
            for key, value in fields.items():
                if self._fields.get(key) is value:
                    del self._fields[key]
            self._written += len(events)
            self.valid_until = sent + self.ttl_s
            self.status = status
            self._wake.notify_all()

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if state.attempt_number in (1, 10) or state.attempt_number % 50 == 0:
            log.warning(
                "Job %s: lease write failed (try %s, %.1fs of the lease left): %s",
                self.job_id,
                state.attempt_number,
                self.remaining_s(),
                exc,
            )

    def _loop(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(multiplier=0.2, max=min(5.0, max(0.5, self.heartbeat_s))),
            stop=lambda state: self._closing.is_set() or self.lost.is_set(),
            sleep=self._closing.wait,
            before_sleep=self._log_retry,
            reraise=False,
            retry_error_callback=lambda state: None,
        )
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._closing.is_set() and not self.lost.is_set():
            with self._wake:
                if not self._events and not self._fields:
                    self._wake.wait(max(0.0, next_beat - time.monotonic()))
            if self._closing.is_set():
                return
            if not self._events and not self._fields and time.monotonic() < next_beat:
                continue
            retrying(self._write_once)
            next_beat = time.monotonic() + self.heartbeat_s
