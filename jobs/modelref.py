"""What a job's `model` names, read the same way by the API (which checks it) and the worker (which fetches it).

- a Hugging Face Hub id, `org/name` or `name`, with an optional revision: `org/name@rev` (a branch, tag or commit);
- a fine-tuned model name, `ft:<base>:<tenant>:<suffix>:<job id>` (what a succeeded job answers as its
  `fine_tuned_model`), or a checkpoint of one, `...:<job id>:ckpt-step-<N>`;
- a job id, `job_...`: that job's final model;
- a registered model of the tenant's (`jobs.registry`): `models:/NAME` (its newest version), `models:/NAME/3`,
  `models:/NAME@production`, or the bare `NAME` / `NAME@production` when the tenant has registered NAME (a name
  of the tenant's comes before a hub id spelled the same);
- a storage URI (`s3://...`, `file://...`) or an absolute local folder (`jobs.perimeter` confines both).

`PREFQ_ALLOWED_HUB_MODELS` (fnmatch patterns, e.g. `Qwen/*,meta-llama/Llama-3.2-*`) restricts hub ids; the
default `*` allows every one.

`resolve` is the one reading of what a name gives a tenant (the API when it checks a job or serves a model, the
worker when it fetches one); `jobs.perimeter` confines a name before it is resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from jobs.models import Job, ModelVersion, RegisteredModel

# The hub's own rule for repo ids: name parts of letters, digits, '-', '_', '.', no '--' or '..', at most 96 chars
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{{0,199}}))?")
JOB_ID = re.compile(r"job_[A-Za-z0-9]+")
REGISTERED = re.compile(
    r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
    r"(?:/(?P<version>[1-9]\d{0,8})|@(?P<alias>[a-z][a-z0-9_-]{0,31}))?"
)
FT_NAME = re.compile(
    r"ft:(?P<base>[^:]{1,300}):(?P<tenant>[a-z0-9][a-z0-9_-]{0,62}):(?P<suffix>[A-Za-z0-9._-]{0,64})"
    r":(?P<job>job_[A-Za-z0-9]+)(?::ckpt-step-(?P<step>\d{1,9}))?"
)


@dataclass(frozen=True)
class ModelRef:
    kind: str  # hub | job | registered | path (a storage URI or a local folder)
    value: str  # the hub repo id, the job id, the registered name, or the path
    revision: str | None = None  # hub: the revision, None is the default branch; registered: the alias
    step: int | None = None  # job: a checkpoint's step, None is the final model; registered: the version


class BadModelRef(ValueError):
    """A `model` that names nothing prefq can read: the message says why."""


class ModelNotFound(LookupError):
    """A name that gives the tenant no model: another tenant's, a job that has not succeeded, a checkpoint or a
    registered version that does not exist. `field` names the request's field, `message` says why."""

    def __init__(self, message: str, field: str = "model"):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def parse(ref: str) -> ModelRef:
    """What `ref` names; `BadModelRef` when it looks like a hub id or a fine-tuned name but is not a valid one."""
    if "://" in ref or ref.startswith("/"):
        return ModelRef("path", ref)
    if ref.startswith("models:"):
        match = REGISTERED.fullmatch(ref)
        if not match or ".." in ref:
            raise BadModelRef(
                f"{ref!r} is not a registered model (models:/NAME, models:/NAME/VERSION or models:/NAME@ALIAS)"
            )
        version = match.group("version")
        return ModelRef(
            "registered", match.group("name"), revision=match.group("alias"), step=int(version) if version else None
        )
    if ref.startswith("ft:"):
        match = FT_NAME.fullmatch(ref)
        if not match:
            raise BadModelRef(f"{ref!r} is not a fine-tuned model name (ft:<base>:<tenant>:<suffix>:<job id>)")
        step = match.group("step")
        return ModelRef("job", match.group("job"), step=int(step) if step else None)
    if JOB_ID.fullmatch(ref):
        return ModelRef("job", ref)
    match = HUB_ID.fullmatch(ref)
    if not match or "--" in match.group("repo") or ".." in ref:
        raise BadModelRef(
            f"{ref!r} is not a hub id (org/name or org/name@revision), a fine-tuned model name, a job "
            "id, a storage URI or an absolute folder"
        )
    return ModelRef("hub", match.group("repo"), revision=match.group("revision"))


def as_registered(ref: ModelRef) -> ModelRef | None:
    """The registered-model reading of a bare hub-like `NAME` or `NAME@ALIAS` (no org part), if it has one."""
    if ref.kind != "hub" or "/" in ref.value or ".." in ref.value:
        return None
    if ref.revision is not None and not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", ref.revision):
        return None
    if len(ref.value) > 64:
        return None
    return ModelRef("registered", ref.value, revision=ref.revision)


def registered_name(name: str, version: int) -> str:
    return f"models:/{name}/{version}"


def hub_allowed(repo: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(repo, p) for p in patterns)


def base_name(ref: str) -> str:
    """The base model's name in a fine-tuned model name: a hub id as it is, a fine-tuned name's own base, a
    folder's or URI's last part."""
    match = FT_NAME.fullmatch(ref)
    if match:
        return match.group("base")
    return ref.rstrip("/").rsplit("/", 1)[-1] if "://" in ref or ref.startswith("/") else ref.split("@")[0]


def fine_tuned_name(base: str, tenant: str, suffix: str | None, job_id: str, step: int | None = None) -> str:
    name = f"ft:{base_name(base).replace(':', '-')}:{tenant}:{suffix or ''}:{job_id}"
    return name if step is None else f"{name}:ckpt-step-{step}"


class JobLookup(Protocol):
    """What `resolve` reads of the job table (`jobs.store.JobStore` is one)."""

    def get_job(self, job_id: str) -> Job | None: ...


class VersionLookup(Protocol):
    """What `resolve` reads of the registry (`jobs.registry.Registry` is one)."""

    def get(self, tenant: str, name: str) -> RegisteredModel | None: ...

    def resolve(
        self, tenant: str, name: str, version: int | None = None, alias: str | None = None
    ) -> ModelVersion | None: ...


class CheckpointStore(Protocol):
    """What `resolve` reads of storage (`storage.Storage` is one)."""

    def list(self, prefix: str = "") -> list[str]: ...

    def uri(self, key: str) -> str: ...


@dataclass(frozen=True)
class Resolved:
    """What a name gives a tenant. `name` is the name as given, or the fine-tuned model a registered one stands for."""

    name: str
    ref: ModelRef  # `name` parsed: hub, job or path (never registered)
    uri: str | None = None  # the model folder: a storage URI or local folder (job, path); None for a hub id
    job: Job | None = None  # the succeeded job whose model (or checkpoint) it is
    version: ModelVersion | None = None  # the registered version it was named by

    @property
    def fine_tuned_model(self) -> str | None:
        """The job's canonical name for it (`ft:<base>:<tenant>:<suffix>:<job id>[:ckpt-step-N]`)."""
        if self.job is None:
            return None
        return fine_tuned_name(self.job.model, self.job.tenant, self.job.suffix, self.job.id, self.ref.step)


def resolve(
    name: str,
    tenant: str,
    jobs: JobLookup,
    registry: VersionLookup,
    storage: CheckpointStore,
    manifest: str,
    bare_names: bool = True,
) -> Resolved:
    """What `name` gives `tenant`; `ModelNotFound` when it gives it nothing. A registered model becomes the version's
    fine-tuned model; a fine-tuned model, a checkpoint of one or a job id become the storage URI of a succeeded job's
    model or complete checkpoint (`manifest`: `training.spec.MANIFEST_NAME`); a hub id and a path stay what they are
    (whether the hub or the folder has the model is for the caller to find out). `bare_names`: a bare `NAME` may be a
    registered model of the tenant's (a request); a job's row has none, the API pinned it when the job was queued.
    Blocking (database, storage)."""
    from jobs import layout  # jobs.layout imports jobs.perimeter, which imports this module

    try:
        ref = parse(name)
    except BadModelRef as exc:
        raise ModelNotFound(str(exc)) from None
    version = None
    wanted = ref if ref.kind == "registered" else as_registered(ref) if bare_names else None
    if wanted is not None:
        version = registry.resolve(tenant, wanted.value, wanted.step, wanted.revision)
        if version is not None:
            name, ref = version.fine_tuned_model, parse(version.fine_tuned_model)
        elif ref.kind == "registered" or registry.get(tenant, wanted.value) is not None:
            raise ModelNotFound(_no_version(registry, tenant, wanted))
        # else a bare name the tenant has not registered: a hub id
    if ref.kind in ("hub", "path"):
        return Resolved(name, ref, uri=ref.value if ref.kind == "path" else None, version=version)
    job = jobs.get_job(ref.value)
    if job is None or job.tenant != tenant:
        raise ModelNotFound(f"no fine-tuned model {name!r}")
    if job.method == "eval":
        raise ModelNotFound(f"job {job.id} is an evaluation run: it measured models and made none")
    if job.status != "succeeded" or not job.result_uri:
        raise ModelNotFound(f"job {job.id} is {job.status}; its model can be named once it has succeeded")
    if job.method == "reward":
        raise ModelNotFound(
            f"job {job.id} trained a reward model: it scores answers, and is neither trained further nor served for "
            "chat (download it from the job's model files)"
        )
    if ref.step is None:
        return Resolved(name, ref, uri=job.result_uri, job=job, version=version)
    found = layout.list_checkpoints(storage, tenant, job.id, manifest, step=ref.step)
    if ref.step not in found:
        raise ModelNotFound(f"job {job.id} has no checkpoint at step {ref.step}")
    return Resolved(name, ref, uri=storage.uri(found[ref.step].prefix), job=job, version=version)


def _no_version(registry: VersionLookup, tenant: str, wanted: ModelRef) -> str:
    if registry.get(tenant, wanted.value) is None:
        return f"{wanted.value} is not a registered model of this tenant's"
    if wanted.step is not None:
        return f"the registered model {wanted.value} has no version {wanted.step}"
    missing = f"no alias {wanted.revision!r}" if wanted.revision else "no versions"
    return f"the registered model {wanted.value} has {missing}"
