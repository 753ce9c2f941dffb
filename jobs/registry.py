"""The model registry: a tenant's named models, each a list of versions (succeeded jobs' models) with aliases.

`promote` registers a job's final model as the next version of a name (creating the name on first use); an
alias (`production`, `staging`, ...) names one version of a model and moves when it is set again. A job's `model`
may name a registered model (`jobs.modelref`: `models:/NAME`, `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or
the bare `NAME` / `NAME@ALIAS` when the tenant has such a name); the API pins it to that version's fine-tuned
model name when the job is queued, so that moving an alias later does not change what a queued job trains on.
"""

from __future__ import annotations

import re

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, delete, select

from jobs.db import session
from jobs.models import Job, ModelAlias, ModelVersion, RegisteredModel, now

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_TRIES = 5  # promotes retried when a concurrent promote took the same version number


class RegistryError(ValueError):
    """A registry request that cannot be done: `field` names the part of the request at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"name: {name!r} is not a model name (1-64 letters, digits, '.', '_', '-', starting "
            "with a letter or digit)",
            "name",
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS.fullmatch(alias):
        raise RegistryError(
            f"alias: {alias!r} is not an alias (lowercase letters, digits, '_', '-', starting with a "
            "letter, at most 32)",
            "alias",
        )
    return alias


class Registry:
    def __init__(self, engine: Engine):
        self.engine = engine

    def promote(
        self,
        job: Job,
        name: str,
        fine_tuned_model: str,
        aliases: list[str] = (),
        description: str | None = None,
        source_uri: str | None = None,
        metrics: dict | None = None,
    ) -> ModelVersion:
        """The job's model as the next version of `name` in the job's tenant, with `aliases` pointing at it:
        its final model, or the one at `source_uri` (a checkpoint, named so by `fine_tuned_model`) with `metrics`."""
        check_name(name)
        for alias in aliases:
            check_alias(alias)
        source_uri = source_uri or job.result_uri or ""
        metrics = metrics or {"train": job.metrics or {}, "eval": job.eval_metrics or {}}
        for attempt in range(_TRIES):
            try:
                return self._promote(job, name, fine_tuned_model, list(aliases), description, source_uri, metrics)
            except IntegrityError:  # another promote of the same name took the number (or created the name)
                if attempt == _TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _promote(
        self,
        job: Job,
        name: str,
        fine_tuned_model: str,
        aliases: list[str],
        description: str | None,
        source_uri: str,
        metrics: dict,
    ) -> ModelVersion:
        with session(self.engine) as s:
            # The name's row is locked (PostgreSQL) so that concurrent promotes of one name take numbers in turn
            # instead of colliding; only the first promote of a new name can collide, and is retried.
            model = s.get(RegisteredModel, (job.tenant, name), with_for_update=True)
            if model is None:
                model = RegisteredModel(tenant=job.tenant, name=name, description=description)
                s.add(model)
                s.flush()
            last = s.exec(
                select(func.max(ModelVersion.version)).where(
                    ModelVersion.tenant == job.tenant, ModelVersion.name == name
                )
            ).one()
            version = ModelVersion(
                tenant=job.tenant,
                name=name,
                version=(last or 0) + 1,
                job_id=job.id,
                fine_tuned_model=fine_tuned_model,
                source_uri=source_uri,
                base_model=job.model,
                method=job.method,
                description=description,
                metrics=metrics,
            )
            s.add(version)
            model.updated_at = now()
            s.flush()
            for alias in aliases:
                self._point(s, job.tenant, name, alias, version.version)
            s.commit()
            s.refresh(version)
            return version

    @staticmethod
    def _point(s, tenant: str, name: str, alias: str, version: int) -> None:
        row = s.get(ModelAlias, (tenant, name, alias))
        if row is None:
            s.add(ModelAlias(tenant=tenant, name=name, alias=alias, version=version))
        else:
            row.version, row.updated_at = version, now()

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> ModelAlias:
        check_alias(alias)
        with session(self.engine) as s:
            if s.get(ModelVersion, (tenant, name, version)) is None:
                raise RegistryError(f"version: {name} has no version {version}", "version")
            self._point(s, tenant, name, alias, version)
            s.get(RegisteredModel, (tenant, name)).updated_at = now()
            s.commit()
            return s.get(ModelAlias, (tenant, name, alias))

    def delete_alias(self, tenant: str, name: str, alias: str) -> bool:
        with session(self.engine) as s:
            gone = s.exec(
                delete(ModelAlias).where(
                    ModelAlias.tenant == tenant, ModelAlias.name == name, ModelAlias.alias == alias
                )
            ).rowcount
            s.commit()
            return bool(gone)

    def get(self, tenant: str, name: str) -> RegisteredModel | None:
        with session(self.engine) as s:
            return s.get(RegisteredModel, (tenant, name))

    def models(self, tenant: str | None) -> list[RegisteredModel]:
        """A tenant's registered models (every tenant's for None), most recently changed first."""
        query = select(RegisteredModel).order_by(col(RegisteredModel.updated_at).desc()).limit(1000)
        if tenant is not None:
            query = query.where(RegisteredModel.tenant == tenant)
        with session(self.engine) as s:
            return list(s.exec(query))

    def versions(self, tenant: str, name: str) -> list[ModelVersion]:
        """Newest first."""
        with session(self.engine) as s:
            return list(
                s.exec(
                    select(ModelVersion)
                    .where(ModelVersion.tenant == tenant, ModelVersion.name == name)
                    .order_by(col(ModelVersion.version).desc())
                )
            )

    def aliases(self, tenant: str, name: str) -> dict[str, int]:
        with session(self.engine) as s:
            rows = s.exec(select(ModelAlias).where(ModelAlias.tenant == tenant, ModelAlias.name == name))
            return {a.alias: a.version for a in rows}

    def resolve(
        self,
        tenant: str,
        name: str,
        version: int | None = None,
        alias: str | None = None,
    ) -> ModelVersion | None:
        """The version a reference names: a number, an alias, or (neither) the newest; None if there is none."""
        with session(self.engine) as s:
            if alias is not None:
                row = s.get(ModelAlias, (tenant, name, alias))
                if row is None:
                    return None
                version = row.version
            if version is not None:
                return s.get(ModelVersion, (tenant, name, version))
            return s.exec(
                select(ModelVersion)
                .where(ModelVersion.tenant == tenant, ModelVersion.name == name)
                .order_by(col(ModelVersion.version).desc())
                .limit(1)
            ).first()
