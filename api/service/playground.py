"""The playground: generations by a tenant's models, through `prefq serve` (`PREFQ_SERVE_URL`).

The model name is resolved to its folder's storage URI (a LoRA adapter's with its base) here (`api.service.served`); the serve answers JSON lines
(deltas, then `done`, or one `error`). `start` opens the exchange and gives its first line; the OpenAI face streams
or collects the rest, and the dashboard's chat box asks for one `reply`. The HTTP client is the process's own
(`Services.http`, opened and closed by the app's lifespan).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from starlette.concurrency import run_in_threadpool

from api.deps import Services
from api.service.errors import Unavailable, Upstream
from api.service.served import resolve_served_model

FETCH_AND_LOAD_S = 1800.0  # beyond the generation's time limit, what the serve may take to fetch and load a model


@dataclass
class Generation:
    id: str  # chatcmpl-... or cmpl-...
    first: dict  # the serve's first line
    lines: AsyncIterator[dict]  # the rest
    close: Callable[[], Awaitable[None]]  # ends the exchange (the serve stops generating for a client that left)


def upstream(error: dict) -> Upstream:
    """The serve's `error` line."""
    return Upstream(
        error.get("status", 502), error.get("code") or "serve_error", error.get("message", ""), error.get("param")
    )


def broke_off(why: str = "") -> Upstream:
    return Upstream(502, "serve_error", "the generation service's answer broke off" + (f": {why}" if why else ""))


async def start(svc: Services, tenant: str, model: str, kind: str, request: dict) -> Generation:
    """Resolve `model` for `tenant` and ask the serve for a generation of `request` (`messages` or `prompt`,
    `max_tokens`, `stop`, `temperature`, `top_p`, `seed`, `logit_bias`); `kind` is `chat` or `text`."""
    served = await run_in_threadpool(resolve_served_model, svc.store, svc.storage, tenant, model)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    s = svc.settings
    headers = {"Authorization": f"Bearer {s.serve_token.get_secret_value()}"} if s.serve_token else {}
    timeout = httpx.Timeout(30.0, read=s.serve_timeout_s + FETCH_AND_LOAD_S)
    try:
        response = await svc.http.send(
            svc.http.build_request(
                "POST",
                f"{s.serve_url.rstrip('/')}/generate",
                json={"id": rid, **served, **request},
                headers=headers,
                timeout=timeout,
            ),
            stream=True,
        )
    except httpx.TransportError as exc:
        raise Unavailable(
            "serve_unavailable",
            f"the generation service (prefq serve) is not reachable: {type(exc).__name__}; retry later",
        ) from None
    try:
        if response.status_code == 401:
            raise Unavailable("serve_unavailable", "the generation service refused this API's PREFQ_SERVE_TOKEN")
        if response.status_code != 200:
            raise Upstream(502, "serve_error", f"the generation service answered HTTP {response.status_code}")
        lines = (json.loads(line) async for line in response.aiter_lines() if line)
        first = await anext(lines, None)
        if first is None:
            raise Upstream(502, "serve_error", "the generation service answered nothing")
        if "error" in first:
            raise upstream(first["error"])
    except (Unavailable, Upstream, httpx.HTTPError, ValueError) as exc:
        await response.aclose()
        if isinstance(exc, Unavailable | Upstream):
            raise
        raise broke_off(type(exc).__name__) from None
    return Generation(rid, first, lines, response.aclose)


async def collect(gen: Generation) -> tuple[str, dict]:
    """The whole text and the serve's `done` line (`finish_reason`, `prompt_tokens`, `completion_tokens`)."""
    parts, line = [], gen.first
    try:
        while line is not None and not line.get("done"):
            if "error" in line:
                raise upstream(line["error"])
            parts.append(line.get("delta", ""))
            line = await anext(gen.lines, None)
    except (httpx.HTTPError, ValueError):
        line = None
    finally:
        await gen.close()
    if line is None:
        raise broke_off()
    return "".join(parts), line


async def reply(svc: Services, tenant: str, model: str, text: str, max_tokens: int) -> tuple[str, dict]:
    """One greedy reply of `model` to a user message: (text, the `done` line)."""
    gen = await start(
        svc,
        tenant,
        model,
        "chat",
        {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "stop": [],
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": None,
            "logit_bias": {},
        },
    )
    return await collect(gen)
