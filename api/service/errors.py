"""What the service layer refuses, by kind; each face maps the kinds to its answers (`api.errors` for the native API
and the dashboard, `api.openai` for OpenAI's shape). An error carries a stable `code`, the `reason` without the
field, and the native `field` it is about, so that a face can name the field its way without rewriting text.

    ServiceError
     ├── Invalid       the request names something wrong or not allowed (native 422)
     ├── NotFound      no such object, or another tenant's (404)
     ├── Conflict      the object is not in a state that allows this (409)
     ├── TooMany       a limit of unfinished work is reached (429, with `retry_after_s`)
     ├── Unavailable   a service the action needs (the broker, storage, prefq serve) is away (503)
     └── Upstream      the generation service answered an error: its status (502, 504, or a refusal of its own)
"""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, code: str, reason: str, field: str | None = None, details: list | None = None):
        super().__init__(reason)
        self.code, self.reason, self.field, self.details = code, reason, field, details

    @property
    def message(self) -> str:
        """The text as the native API says it: the field first, where there is one."""
        return f"{self.field}: {self.reason}" if self.field else self.reason


class Invalid(ServiceError):
    pass


class NotFound(ServiceError):
    """`what` and `ident` name the missing object (a face may call it its own way)."""

    def __init__(self, code: str, reason: str, field: str | None = None, what: str = "", ident: str = ""):
        super().__init__(code, reason, field)
        self.what, self.ident = what, ident

    @property
    def message(self) -> str:
        return self.reason  # "no job with id 'x'" reads whole; `field` says which request field named it


def no_such(what: str, ident: str, field: str | None = None) -> NotFound:
    """ "no job with id 'x'" (code `job_not_found`)."""
    return NotFound(f"{what.replace(' ', '_')}_not_found", f"no {what} with id {ident!r}", field, what, ident)


class Conflict(ServiceError):
    pass


class TooMany(ServiceError):
    def __init__(self, code: str, reason: str, retry_after_s: int):
        super().__init__(code, reason)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    pass


class Upstream(ServiceError):
    """A service the action went through (the generation service) answered an error of its own, with its status."""

    def __init__(self, status: int, code: str, reason: str, field: str | None = None):
        super().__init__(code, reason, field)
        self.status = status
