"""/v1/chat/completions and /v1/completions: the playground, a tenant's fine-tuned models answering in OpenAI's shape.

The API validates the request, resolves `model` to the model folder's storage URI (`api.openai.served`), and
forwards it to `prefq serve` (`PREFQ_SERVE_URL`, with `PREFQ_SERVE_TOKEN`), which runs the model in a process of
its own and answers JSON lines (`worker.serve`). Those become a `chat.completion` / `text_completion`, or with
`stream: true` Server-Sent Events (`data: {chunk}` ... `data: [DONE]`). An error before the first token is an HTTP
error in OpenAI's shape; one after it (the time limit) is a last `data: {"error": ...}` event, which the SDK raises.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Caller
from api.deps import Services, services
from api.errors import APIError, openai_body, openai_responses
from api.openai.served import resolve_served_model

router = APIRouter(prefix="/v1", tags=["openai"])
FETCH_AND_LOAD_S = 1800.0  # beyond the generation's time limit, what the serve may take to fetch and load a model


def _encodable(text: str) -> str:
    if "\x00" in text:
        raise ValueError("NUL characters are not allowed")
    text.encode()  # a lone surrogate cannot reach a tokenizer: UnicodeEncodeError is a ValueError
    return text


Prompt = Annotated[str, AfterValidator(_encodable)]


def _stops(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > 4 or any(len(s) > 200 for s in stops):
        raise ValueError("at most 4 strings of at most 200 characters")
    return [_encodable(s) for s in stops]


TokenBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Prompt | list[TextPart] = Field(description="Text, or a list of text parts (no images, audio or files)")
    name: str | None = Field(None, max_length=64)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Prompt = Field(min_length=1, max_length=2048, description="A fine-tuned model, a checkpoint, or a job id")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most: up to PREFQ_SERVE_MAX_TOKENS")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="One choice per request")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, AfterValidator(_stops)] = Field(None, description="Up to 4 strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logit_bias: TokenBias | None = Field(None, max_length=1024, description="{token id: -100 to 100}")
    user: str | None = Field(None, max_length=256)


class ChatCompletionCreate(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens")


class CompletionCreate(Sampling):
    prompt: Prompt | list[Prompt] = Field(description="A text, or a list of one text")


def _max_tokens(svc: Services, value: int | None, param: str, default: int) -> int:
    cap = svc.settings.serve_max_tokens
    if value is not None and value > cap:
        raise APIError(422, "invalid_request", f"{param}: at most {cap} on this server (PREFQ_SERVE_MAX_TOKENS), got "
                       f"{value}", field=param)  # fmt: skip
    return min(value or default, cap)


def _error(error: dict) -> APIError:
    return APIError(error.get("status", 502), error.get("code") or "serve_error", error.get("message", ""),
                    field=error.get("param"))  # fmt: skip


async def _forward(svc: Services, body: dict) -> tuple[dict, AsyncIterator[dict], callable]:
    """The serve's first line, the rest, and what closes the exchange; an `APIError` when it answers an error."""
    s = svc.settings
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=s.serve_timeout_s + FETCH_AND_LOAD_S))
    headers = {"Authorization": f"Bearer {s.serve_token.get_secret_value()}"} if s.serve_token else {}
    try:
        response = await client.send(client.build_request("POST", f"{s.serve_url.rstrip('/')}/generate", json=body,
                                                          headers=headers), stream=True)  # fmt: skip
    except httpx.TransportError as exc:
        await client.aclose()
        raise APIError(503, "serve_unavailable", f"the generation service (prefq serve) is not reachable: "
                       f"{type(exc).__name__}; retry later") from None  # fmt: skip

    async def close() -> None:
        await response.aclose()
        await client.aclose()

    try:
        if response.status_code == 401:
            raise APIError(503, "serve_unavailable", "the generation service refused this API's PREFQ_SERVE_TOKEN")
        if response.status_code != 200:
            raise APIError(502, "serve_error", f"the generation service answered HTTP {response.status_code}")
        lines = (json.loads(line) async for line in response.aiter_lines() if line)
        first = await anext(lines, None)
        if first is None:
            raise APIError(502, "serve_error", "the generation service answered nothing")
        if "error" in first:
            raise _error(first["error"])
    except (APIError, httpx.HTTPError, ValueError) as exc:
        await close()
        if isinstance(exc, APIError):
            raise
        raise APIError(502, "serve_error", f"the generation service's answer broke off: {type(exc).__name__}") from None
    return first, lines, close


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _events(first: dict, lines: AsyncIterator[dict], close, chunk, usage_chunk: bool) -> AsyncIterator[bytes]:
    """The serve's lines as SSE: `chunk(delta, finish_reason)` makes each one."""
    try:
        line = first
        while line is not None:
            if "error" in line:
                e = line["error"]
                yield _sse(openai_body(e.get("status", 502), e.get("code"), e.get("message", ""), e.get("param"))[1])
                return
            if "delta" in line:
                yield _sse(chunk(line["delta"], None))
            elif line.get("done"):
                yield _sse(chunk(None, line["finish_reason"]))
                if usage_chunk:
                    yield _sse({**chunk(None, None), "choices": [], "usage": _usage(line)})
                yield _sse("[DONE]")
                return
            line = await anext(lines, None)
        yield _sse(openai_body(502, "serve_error", "the generation service's answer broke off", None)[1])
    except (httpx.HTTPError, ValueError):
        yield _sse(openai_body(502, "serve_error", "the generation service's answer broke off", None)[1])
    finally:
        await close()


async def _collect(first: dict, lines: AsyncIterator[dict], close) -> tuple[str, dict]:
    """The whole text and the `done` line."""
    parts, line = [], first
    try:
        while line is not None and not line.get("done"):
            if "error" in line:
                raise _error(line["error"])
            parts.append(line.get("delta", ""))
            line = await anext(lines, None)
    except (httpx.HTTPError, ValueError):
        line = None
    finally:
        await close()
    if line is None:
        raise APIError(502, "serve_error", "the generation service's answer broke off")
    return "".join(parts), line


async def _generate(svc: Services, tenant: str, req: Sampling, kind: str, inputs: dict, max_tokens: int):
    uri = await run_in_threadpool(resolve_served_model, svc.store, svc.storage, tenant, req.model)
    rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
    body = {"id": rid, "model_uri": uri, **inputs, "max_tokens": max_tokens, "stop": req.stop or [],
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "logit_bias": req.logit_bias or {}}  # fmt: skip
    first, lines, close = await _forward(svc, body)
    head = {"id": rid, "created": created, "model": req.model, "system_fingerprint": None}

    def choice(text: str | None, finish: str | None) -> dict:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None) -> dict:
            return {**head, "object": obj, "choices": [choice(text, finish)], **({"usage": None} if usage else {})}

        async def events() -> AsyncIterator[bytes]:
            if kind == "chat":  # the first chunk names the role
                opening = chunk("", None)
                opening["choices"][0]["delta"]["role"] = "assistant"
                yield _sse(opening)
            async for event in _events(first, lines, close, chunk, usage):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
    text, done = await _collect(first, lines, close)
    if kind == "chat":
        answer = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": done["finish_reason"]}  # fmt: skip
        return {**head, "object": "chat.completion", "choices": [answer], "usage": _usage(done)}
    answer = {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}
    return {**head, "object": "text_completion", "choices": [answer], "usage": _usage(done)}


RESPONSES = {**openai_responses(401, 404, 502, 503, 504),
             200: {"content": {"application/json": {}, "text/event-stream": {}},
                   "description": "The completion; with `stream: true`, Server-Sent Events of chunks, then [DONE]"}}  # fmt: skip


@router.post("/chat/completions", responses=RESPONSES, response_model=None)
async def create_chat_completion(req: ChatCompletionCreate, who: Caller, svc: Services = Depends(services)):
    """A reply of a tenant's fine-tuned model to a conversation (the tokenizer's chat template renders it)."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(svc, req.max_completion_tokens or req.max_tokens, param, svc.settings.serve_max_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role,  # OpenAI's new name; templates know system
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in req.messages]  # fmt: skip
    return await _generate(svc, who.tenant, req, "chat", {"messages": messages}, max_tokens)


@router.post("/completions", responses=RESPONSES, response_model=None)
async def create_completion(req: CompletionCreate, who: Caller, svc: Services = Depends(services)):
    """A continuation of a text by a tenant's fine-tuned model (no chat template)."""
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise APIError(422, "invalid_request", "prompt: one text per request", field="prompt")
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    max_tokens = _max_tokens(svc, req.max_tokens, "max_tokens", 16)  # OpenAI's default for completions
    return await _generate(svc, who.tenant, req, "text", {"prompt": prompt}, max_tokens)
