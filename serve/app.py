"""`prefq serve`: the generation service behind the playground (`POST /v1/chat/completions`, `/v1/completions`).

Internal: the API resolves a tenant's model to its storage URI and asks here; with `PREFQ_SERVE_TOKEN` set, every
request must carry it (`Authorization: Bearer <token>`). Torch-free like the worker: each model is served by a
child process of its own (`serve.pool`). A child answers one request at a time; a request that runs past
`PREFQ_SERVE_TIMEOUT_S` gets an error and its child is killed (the next request starts a fresh one).

`POST /generate` answers 200 with JSON lines, the child's (see `training.generate`): deltas, then `done`; or one
`{"error": {"status", "code", "message", "param"}}` line, whatever went wrong (the API turns it into an HTTP error).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.pool import Pool, ServeError
from settings import Settings
from training.parent import hide_process


class GenerateRequest(BaseModel):
    """One generation, for `training.generate`; the API has validated it against OpenAI's fields."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=100)
    model_uri: str = Field(max_length=4096, description="The model folder's storage URI")
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    logit_bias: dict[str, float] = Field(default_factory=dict)


async def _lines(pool: Pool, req: GenerateRequest) -> AsyncIterator[bytes]:
    limit_s = pool.settings.serve_timeout_s
    child, locked, finished = None, False, False
    try:
        if req.max_tokens > pool.settings.serve_max_tokens:
            raise ServeError(
                400, "max_tokens_too_large", f"max_tokens is at most {pool.settings.serve_max_tokens}", "max_tokens"
            )
        waited_until = None
        while True:
            child = await pool.child(req.model_uri)  # starts the model's process if need be (LOAD_TIMEOUT_S)
            # the wait for a busy model counts from here: a model's start is no other request's answer
            waited_until = waited_until or time.monotonic() + limit_s
            try:
                await asyncio.wait_for(child.lock.acquire(), max(0.0, waited_until - time.monotonic()))
            except TimeoutError:
                raise ServeError(
                    503, "serve_busy", f"the model answered other requests for {limit_s:g}s; retry later"
                ) from None
            if child.alive:
                break
            child.lock.release()  # killed while this request waited (an abandoned answer ran late): a fresh one
        locked, deadline = True, time.monotonic() + limit_s
        try:
            async for line in child.answer(req.model_dump(exclude={"model_uri"}), deadline):
                finished = bool(line.get("done") or "error" in line)  # before the yield, where the caller may leave
                yield json.dumps(line).encode() + b"\n"
        except ServeError as exc:
            child.kill(exc.line["error"]["code"])  # late or dead: the next request starts the model again
            if exc.line["error"]["code"] == "timeout":
                exc.line["error"]["message"] = (
                    f"generation stopped at the time limit of {limit_s:g}s "
                    "(PREFQ_SERVE_TIMEOUT_S); ask for fewer max_tokens"
                )
            raise
        finished = True
    except ServeError as exc:
        finished = True
        yield json.dumps(exc.line).encode() + b"\n"
    finally:
        if locked and not finished and child.alive:  # the caller went away mid-answer
            task = asyncio.get_running_loop().create_task(child.drain(req.id, time.monotonic() + limit_s))
            pool.draining.add(task)
            task.add_done_callback(pool.draining.discard)
        elif locked:
            child.lock.release()


def create_app(settings: Settings | None = None) -> FastAPI:
    hide_process()  # the model processes (confined, `training.parent`) cannot read this process's storage secret
    settings = settings or Settings()
    pool = Pool(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.close()

    app = FastAPI(title="prefq serve", lifespan=lifespan, description="Generation with tenants' fine-tuned models.")
    app.state.pool = pool

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        token = settings.serve_token
        if token is not None and not hmac.compare_digest(authorization or "", f"Bearer {token.get_secret_value()}"):
            raise ServeError(401, "unauthorized", "this service wants `Authorization: Bearer <PREFQ_SERVE_TOKEN>`")

    @app.exception_handler(ServeError)
    async def _error(request, exc: ServeError):
        return JSONResponse(exc.line, status_code=exc.line["error"]["status"])

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness, how many models are loaded, and whether this process imported torch (it must not). It answers
        without the token (a probe has none), so it names no model, tenant or job."""
        return {"status": "ok", "torch_imported": "torch" in sys.modules, "models_loaded": len(pool.children)}

    @app.post("/generate", dependencies=[Depends(authorized)])
    async def generate(req: GenerateRequest) -> StreamingResponse:
        """JSON lines: `{"id", "delta"}`..., then `{"id", "done": true, ...}`; or one `{"error": ...}`."""
        return StreamingResponse(_lines(pool, req), media_type="application/x-ndjson")

    return app
