"""The FastAPI app: `uvicorn --factory api.app:create_app` (what `prefq api` runs). Torch-free."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import errors, ui
from api.auth import DEFAULT_TENANT
from api.deps import Services
from api.limits import Gate
from api.openai import routers as openai_routers
from api.routes import datasets, evals, graders, jobs, keys, models, ops
from api.routes.ops import RequestCounter
from api.text import require_text
from jobs.db import make_engine
from jobs.keys import KeyStore
from jobs.store import JobStore
from queue_config import make_celery
from settings import Settings
from storage import open_storage


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The ~110k objects of the loaded modules live as long as the server: keep them out of the collector's
    # full passes (each one otherwise stops every request for about 60 ms on this 2-core machine).
    gc.collect()
    gc.freeze()
    yield
    await app.state.services.http.aclose()
    app.state.services.broker.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="prefq",
        version="0.1.0",
        lifespan=_lifespan,
        dependencies=[Depends(require_text)],
        description="Preference training (DPO, SFT) of language models on your own GPU pool.",
    )
    app.state.services = Services(
        settings=settings,
        store=JobStore(make_engine(settings.database_url)),
        storage=open_storage(settings.storage_url, **settings.storage_options()),
        celery=make_celery(settings, "prefq-api"),
    )
    if settings.admin_key is not None:  # the operator's bootstrap key (from a Secret), hashed on first start
        KeyStore(app.state.services.store.engine).ensure(
            settings.admin_key.get_secret_value(), DEFAULT_TENANT, admin=True, label="PREFQ_ADMIN_KEY"
        )
    errors.install(app)
    app.add_middleware(Gate, services=app.state.services)  # the key, then the body's size: before it is read
    app.add_middleware(RequestCounter)
    for router in (
        ops.router,
        datasets.router,
        jobs.router,
        models.router,
        keys.router,
        graders.router,
        evals.router,
        evals.openai_router,
        *openai_routers,
    ):
        app.include_router(router)
    ui.install(app)  # the dashboard at /ui
    return app
