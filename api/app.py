"""The FastAPI app: `uvicorn --factory api.app:create_app` (what `prefq api` runs). Torch-free."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import errors
from api.deps import Services, require_key
from api.routes import datasets, jobs, ops
from api.routes.ops import RequestCounter
from jobs.db import make_engine
from jobs.store import JobStore
from queue_config import Settings, make_celery
from storage import open_storage


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The ~110k objects of the loaded modules live as long as the server: keep them out of the collector's
    # full passes (each one otherwise stops every request for about 60 ms on this 2-core machine).
    gc.collect()
    gc.freeze()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="prefq", version="0.1.0", lifespan=_lifespan,
                  description="Preference training (DPO, SFT) of language models on your own GPU pool.")  # fmt: skip
    app.state.services = Services(
        settings=settings,
        store=JobStore(make_engine(settings.database_url)),
        storage=open_storage(settings.storage_url, **settings.storage_options()),
        celery=make_celery(settings, "prefq-api"),
    )
    errors.install(app)
    app.add_middleware(RequestCounter)
    app.include_router(ops.router)
    for router in (datasets.router, jobs.router, ops.protected):
        app.include_router(router, dependencies=[Depends(require_key)])
    return app

