"""What the routes share: settings, the job store, storage, the Celery client, and the API key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from celery import Celery
from fastapi import Request

from api.errors import APIError
from jobs.store import JobStore
from queue_config import Settings
from storage import Storage


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    celery: Celery


def services(request: Request) -> Services:
    return request.app.state.services


def require_key(request: Request) -> None:
    key = request.app.state.services.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise APIError(401, "unauthorized", "missing or wrong API key: send Authorization: Bearer <PREFQ_API_KEY>")
