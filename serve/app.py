"""`prefq serve`: the generation service behind the playground (`POST /v1/chat/completions`, `/v1/completions`).

Internal: the API resolves a tenant's model to its storage URI (and a LoRA adapter's to its base) and asks here;
with `PREFQ_SERVE_TOKEN` set, every request must carry it (`Authorization: Bearer <token>`). Torch-free like the
worker: each base model is served by a child process of its own (`serve.pool`), which answers the requests for it
and its adapters in batches (`PREFQ_SERVE_MAX_BATCH`). A request that runs past `PREFQ_SERVE_TIMEOUT_S` gets an
error and is stopped in the child; a child that has written nothing for that long is killed (the next request
starts a fresh one).

`POST /generate` answers 200 with JSON lines, the child's (see `training.generate`): deltas, then `done`; or one
`{"error": {"status", "code", "message", "param"}}` line, whatever went wrong (the API turns it into an HTTP error).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.pool import Base, Pool, ServeError
from settings import Settings
from training.parent import hide_process


class GenerateRequest(BaseModel):
    """One generation, for `training.generate`; the API has validated it against OpenAI's fields. With a `base_*`
    field, `model_uri` is a LoRA adapter of that base, answered by the base's process."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=100)
    model_uri: str = Field(max_length=4096, description="The model's (or the adapter's) folder's storage URI")
    base_uri: str | None = Field(None, max_length=4096, description="The adapter's base model: a folder's URI")
    base_hub: str | None = Field(None, max_length=300, description="The adapter's base model: a hub id")
    base_revision: str | None = Field(None, max_length=200)
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    logit_bias: dict[str, float] = Field(default_factory=dict)


ASKED = ("id", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logit_bias")


def _last(line: dict) -> bool:
    """Whether `line` ends a request's answer."""
    return bool(line.get("done") or "error" in line)


async def _lines(pool: Pool, req: GenerateRequest) -> AsyncIterator[bytes]:
    """The child's lines for `req`; a client that leaves, or a request past the time limit, is cancelled in the
    child (which goes on answering the others)."""
    limit_s = pool.settings.serve_timeout_s
    child, adapter_fd, finished = None, -1, False
    try:
        if req.max_tokens > pool.settings.serve_max_tokens:
            raise ServeError(
                400, "max_tokens_too_large", f"max_tokens is at most {pool.settings.serve_max_tokens}", "max_tokens"
            )
        adapter = None
        if req.base_uri or req.base_hub:
            base = Base(uri=req.base_uri, hub=req.base_hub if not req.base_uri else None, revision=req.base_revision)
            folder, adapter_fd = await pool.fetch(req.model_uri)
            adapter = {"name": req.model_uri, "folder": folder}
        else:
            base = Base(uri=req.model_uri)
        found = await pool.child(base)  # starts the model's process if need be (LOAD_TIMEOUT_S): not counted below
        queue = found.open(req.id)
        child, deadline = found, time.monotonic() + limit_s
        await child.ask({**req.model_dump(include=set(ASKED)), "adapter": adapter})
        while not finished:
            try:
                line = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if time.monotonic() - child.heard > limit_s:
                    child.kill("silent past the time limit")  # stuck, not busy: the next request starts it again
                raise ServeError(
                    504,
                    "timeout",
                    f"generation stopped at the time limit of {limit_s:g}s (PREFQ_SERVE_TIMEOUT_S); "
                    "ask for fewer max_tokens",
                ) from None
            lines = [line]
            while not queue.empty() and not _last(line):  # what came meanwhile: one chunk
                line = queue.get_nowait()
                lines.append(line)
            finished = _last(line)  # before the yield, where the caller may leave
            yield b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    except ServeError as exc:
        yield json.dumps(exc.line).encode() + b"\n"
    finally:
        if child is not None:
            child.close(req.id, cancel=not finished)
        if adapter_fd >= 0:
            os.close(adapter_fd)  # the adapter's cached folder may be evicted from now on


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
