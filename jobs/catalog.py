"""The job table's plain rows and reads: datasets, job lists, events, workers. `jobs.store.JobStore` adds the
job's state transitions (compare-and-set, fenced by the lease) on top of these.
"""

from __future__ import annotations

from sqlalchemy import String, cast, func, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from jobs.db import session
from jobs.models import FINISHED, Dataset, Eval, Job, JobEvent, JobStatus, Worker

TRIES = 10  # transactions retried when a concurrent writer took the same event sequence number


def _literal(text: str) -> str:
    """`text` matched as it is by LIKE (with `escape="\\"`): its wildcards and the escape itself escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Catalog:
    def __init__(self, engine: Engine):
        self.engine = engine

    # -- rows -------------------------------------------------------------------------------------------

    def add(self, row: Dataset | Worker | Eval) -> None:
        with session(self.engine) as s:
            s.merge(row)
            s.commit()

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with session(self.engine) as s:
            return s.get(Dataset, dataset_id)

    def _by_keys(self, keys: list[str]) -> dict[str, Job]:
        with session(self.engine) as s:
            return {j.idempotency_key: j for j in s.exec(select(Job).where(col(Job.idempotency_key).in_(keys)))}

    def get_eval(self, eval_id: str) -> Eval | None:
        with session(self.engine) as s:
            return s.get(Eval, eval_id)

    def _page(self, table, tenant: str | None, limit: int, after: str | None) -> tuple[list, bool]:
        """A page of a tenant's rows (None: every tenant's), newest id first, after the id `after`; and whether more
        follow."""
        query = select(table).order_by(col(table.id).desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(table.tenant == tenant)
        if after is not None:
            query = query.where(table.id < after)
        with session(self.engine) as s:
            rows = list(s.exec(query))
        return rows[:limit], len(rows) > limit

    def list_evals(self, tenant: str | None, limit: int = 20, after: str | None = None) -> tuple[list[Eval], bool]:
        return self._page(Eval, tenant, limit, after)

    def delete_eval(self, eval_id: str) -> None:
        self._delete(Eval, eval_id)

    def eval_runs(
        self, tenant: str, models: list[str], limit: int = 10, succeeded: bool = False, prefix: str | None = None
    ) -> list[Job]:
        """The tenant's newest evaluation runs of any of `models` (as the runs name them), or of a model whose name
        starts with `prefix` (a job's checkpoints), newest first."""
        named = col(Job.model).in_(models)
        if prefix is not None:
            named = or_(named, col(Job.model).like(_literal(prefix) + "%", escape="\\"))
        query = select(Job).where(Job.tenant == tenant, Job.method == "eval", named)
        if succeeded:
            query = query.where(Job.status == JobStatus.succeeded)
        with session(self.engine) as s:
            return list(s.exec(query.order_by(col(Job.id).desc()).limit(limit)))

    def get_job(self, job_id: str) -> Job | None:
        with session(self.engine) as s:
            return s.get(Job, job_id)

    def list_jobs(
        self,
        status: JobStatus | None = None,
        since: float | None = None,
        limit: int = 20,
        after: str | None = None,
        tenant: str | None = None,
        metadata: dict[str, str] | None = None,
        search: str | None = None,
        eval_id: str | None = None,
        training_only: bool = False,
    ) -> tuple[list[Job], bool]:
        """Newest first (of `tenant`'s; None: every tenant's); `after` is the last id of the previous page;
        `metadata`: jobs whose metadata holds every one of these key/value pairs; `search`: a part of the id or of
        the metadata's keys and values. Returns the page and whether more exist."""
        query = select(Job).order_by(col(Job.id).desc()).limit(limit + 1)
        for key, value in (metadata or {}).items():
            query = query.where(col(Job.user_metadata)[key].as_string() == value)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        if eval_id is not None:
            query = query.where(Job.eval_id == eval_id)
        if training_only:  # not evaluation runs
            query = query.where(Job.method != "eval")
        if status is not None:
            query = query.where(Job.status == status)
        if since is not None:
            query = query.where(Job.created_at >= since)
        if after is not None:
            query = query.where(Job.id < after)
        if search:
            like = "%" + _literal(search) + "%"
            query = query.where(
                or_(col(Job.id).ilike(like, escape="\\"), cast(Job.user_metadata, String).ilike(like, escape="\\"))
            )
        with session(self.engine) as s:
            rows = list(s.exec(query))
        return rows[:limit], len(rows) > limit

    def list_datasets(
        self, tenant: str | None, limit: int = 20, after: str | None = None
    ) -> tuple[list[Dataset], bool]:
        return self._page(Dataset, tenant, limit, after)

    def delete_dataset(self, dataset_id: str) -> None:
        self._delete(Dataset, dataset_id)

    def unfinished_using(self, dataset_id: str) -> str | None:
        """An unfinished job that trains or evaluates on the dataset, if any."""
        query = (
            select(Job.id)
            .where(
                col(Job.status).not_in(FINISHED), (Job.dataset_id == dataset_id) | (Job.eval_dataset_id == dataset_id)
            )
            .limit(1)
        )
        with session(self.engine) as s:
            return s.exec(query).first()

    def count_unfinished(self, tenant: str) -> int:
        query = select(func.count()).select_from(Job).where(Job.tenant == tenant, col(Job.status).not_in(FINISHED))
        with session(self.engine) as s:
            return s.exec(query).one()

    # -- events -------------------------------------------------------------------------------------

    @staticmethod
    def _insert_event(s, job_id: str, attempt: int, kind: str, data: dict) -> None:
        seq = s.exec(select(func.coalesce(func.max(JobEvent.seq), 0)).where(JobEvent.job_id == job_id)).one() + 1
        s.add(JobEvent(job_id=job_id, seq=seq, attempt=attempt, type=kind, data=data))
        s.flush()

    def add_event(self, job_id: str, attempt: int, kind: str, data: dict | None = None) -> None:
        """An event outside a lease (API actions, the reconciler); retried if another writer took the seq."""
        for _ in range(TRIES):
            with session(self.engine) as s:
                try:
                    self._insert_event(s, job_id, attempt, kind, data or {})
                    s.commit()
                    return
                except IntegrityError:
                    s.rollback()
        raise RuntimeError(f"Job {job_id}: could not append event {kind}")

    def events_after(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        query = (
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(col(JobEvent.seq))
            .limit(limit)
        )
        with session(self.engine) as s:
            return list(s.exec(query))

    def events_before(
        self,
        job_id: str,
        before: int | None,
        limit: int,
        types: set[str] | None = None,
    ) -> list[JobEvent]:
        """Newest first: the events with a sequence number below `before` (None: from the newest), of `types`."""
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.seq).desc()).limit(limit)
        if before is not None:
            query = query.where(JobEvent.seq < before)
        if types is not None:
            query = query.where(col(JobEvent.type).in_(types))
        with session(self.engine) as s:
            return list(s.exec(query))

    # -- workers ------------------------------------------------------------------------------------

    def workers(self, live_since: float | None = None) -> list[Worker]:
        query = select(Worker).order_by(col(Worker.name))
        if live_since is not None:
            query = query.where(Worker.last_heartbeat >= live_since)
        with session(self.engine) as s:
            return list(s.exec(query))

    def update_worker(self, name: str, **values) -> bool:
        with session(self.engine) as s:
            changed = s.execute(update(Worker).where(Worker.name == name).values(**values)).rowcount == 1
            s.commit()
        return changed

    def remove_worker(self, name: str) -> None:
        self._delete(Worker, name)

    def _delete(self, table, key: str) -> None:
        """Delete the row of `table` with this primary key, if there is one."""
        with session(self.engine) as s:
            if (row := s.get(table, key)) is not None:
                s.delete(row)
                s.commit()
