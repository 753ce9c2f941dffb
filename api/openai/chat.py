"""/v1/chat/completions and /v1/completions: the playground, a tenant's fine-tuned models answering in OpenAI's shape.

The API validates the request and the playground service (`api.service.playground`) resolves `model` and forwards
it to `prefq serve` (`PREFQ_SERVE_URL`, with `PREFQ_SERVE_TOKEN`), which runs the model in a process of its own and
answers JSON lines (`serve`). Those become a `chat.completion` / `text_completion`, or with
`stream: true` Server-Sent Events (`data: {chunk}` ... `data: [DONE]`). An error before the first token is an HTTP
error in OpenAI's shape; one after it (the time limit) is a last `data: {"error": ...}` event, which the SDK raises.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Depends
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.auth import Caller
from api.deps import Services, services
from api.errors import APIError, openai_body, openai_responses
from api.openai import types
from api.schemas import Text
from api.service import playground
from api.text import checked

router = APIRouter(prefix="/v1", tags=["openai"])


def _stops(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > 4 or any(len(s) > 200 for s in stops):
        raise ValueError("at most 4 strings of at most 200 characters")
    return [checked(s) for s in stops]


TokenBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="Text, or a list of text parts (no images, audio or files)")
    name: str | None = Field(None, max_length=64)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Text = Field(min_length=1, max_length=2048, description="A fine-tuned model, a checkpoint, or a job id")
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
    prompt: Text | list[Text] = Field(description="A text, or a list of one text")


def _max_tokens(svc: Services, value: int | None, param: str, default: int) -> int:
    cap = svc.settings.serve_max_tokens
    if value is not None and value > cap:
        raise APIError(
            422,
            "invalid_request",
            f"{param}: at most {cap} on this server (PREFQ_SERVE_MAX_TOKENS), got {value}",
            field=param,
        )
    return min(value or default, cap)


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(data: dict | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


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


async def _generate(svc: Services, tenant: str, req: Sampling, kind: str, inputs: dict, max_tokens: int):
    created = int(time.time())
    gen = await playground.start(
        svc,
        tenant,
        req.model,
        kind,
        {
            **inputs,
            "max_tokens": max_tokens,
            "stop": req.stop or [],
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "seed": req.seed,
            "logit_bias": req.logit_bias or {},
        },
    )
    head = {"id": gen.id, "created": created, "model": req.model, "system_fingerprint": None}

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
            async for event in _events(gen.first, gen.lines, gen.close, chunk, usage):
                yield event

        return EventSourceResponse(events(), headers={"Cache-Control": "no-store"})
    text, done = await playground.collect(gen)
    if kind == "chat":
        answer = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": done["finish_reason"],
        }
        return {**head, "object": "chat.completion", "choices": [answer], "usage": _usage(done)}
    answer = {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}
    return {**head, "object": "text_completion", "choices": [answer], "usage": _usage(done)}


def _responses(model: type) -> dict:
    return {
        **openai_responses(401, 404, 502, 503, 504),
        200: {
            "model": model,
            "content": {"text/event-stream": {}},
            "description": "The completion; with `stream: true`, Server-Sent Events of chunks, then [DONE]",
        },
    }


@router.post("/chat/completions", responses=_responses(types.ChatCompletion), response_model=None)
async def create_chat_completion(req: ChatCompletionCreate, who: Caller, svc: Services = Depends(services)):
    """A reply of a tenant's fine-tuned model to a conversation (the tokenizer's chat template renders it)."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(svc, req.max_completion_tokens or req.max_tokens, param, svc.settings.serve_max_tokens)
    messages = [
        {
            "role": "system" if m.role == "developer" else m.role,  # OpenAI's new name; templates know system
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        }
        for m in req.messages
    ]
    return await _generate(svc, who.tenant, req, "chat", {"messages": messages}, max_tokens)


@router.post("/completions", responses=_responses(types.Completion), response_model=None)
async def create_completion(req: CompletionCreate, who: Caller, svc: Services = Depends(services)):
    """A continuation of a text by a tenant's fine-tuned model (no chat template)."""
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise APIError(422, "invalid_request", "prompt: one text per request", field="prompt")
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    max_tokens = _max_tokens(svc, req.max_tokens, "max_tokens", 16)  # OpenAI's default for completions
    return await _generate(svc, who.tenant, req, "text", {"prompt": prompt}, max_tokens)
