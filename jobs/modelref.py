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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

# The hub's own rule for repo ids: name parts of letters, digits, '-', '_', '.', no '--' or '..', at most 96 chars
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{{0,199}}))?")
JOB_ID = re.compile(r"job_[A-Za-z0-9]+")
REGISTERED = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
                        r"(?:/(?P<version>[1-9]\d{0,8})|@(?P<alias>[a-z][a-z0-9_-]{0,31}))?")
FT_NAME = re.compile(r"ft:(?P<base>[^:]{1,300}):(?P<tenant>[a-z0-9][a-z0-9_-]{0,62}):(?P<suffix>[A-Za-z0-9._-]{0,64})"
                     r":(?P<job>job_[A-Za-z0-9]+)(?::ckpt-step-(?P<step>\d{1,9}))?")  # fmt: skip


@dataclass(frozen=True)
class ModelRef:
    kind: str  # hub | job | registered | path (a storage URI or a local folder)
    value: str  # the hub repo id, the job id, the registered name, or the path
    revision: str | None = None  # hub: the revision, None is the default branch; registered: the alias
    step: int | None = None  # job: a checkpoint's step, None is the final model; registered: the version


class BadModelRef(ValueError):
    """A `model` that names nothing prefq can read: the message says why."""


def parse(ref: str) -> ModelRef:
    """What `ref` names; `BadModelRef` when it looks like a hub id or a fine-tuned name but is not a valid one."""
    if "://" in ref or ref.startswith("/"):
        return ModelRef("path", ref)
    if ref.startswith("models:"):
        match = REGISTERED.fullmatch(ref)
        if not match or ".." in ref:
            raise BadModelRef(f"{ref!r} is not a registered model (models:/NAME, models:/NAME/VERSION or "
                              "models:/NAME@ALIAS)")  # fmt: skip
        version = match.group("version")
        return ModelRef("registered", match.group("name"), revision=match.group("alias"),
                        step=int(version) if version else None)  # fmt: skip
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
        raise BadModelRef(f"{ref!r} is not a hub id (org/name or org/name@revision), a fine-tuned model name, a job "
                          "id, a storage URI or an absolute folder")  # fmt: skip
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
