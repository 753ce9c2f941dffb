"""The judges of model graders (`score_model`, `label_model`): which a tenant may name, and asking one.

A grader's `model` is, first, one of the operator's judge models (`PREFQ_JUDGE_MODELS`), answered by the
OpenAI-compatible endpoint the operator configures (`PREFQ_JUDGE_URL`, its key `PREFQ_JUDGE_API_KEY`); else a model
of the tenant's that `prefq serve` answers (`jobs.served`: a fine-tuned model, a checkpoint, a registered model).
Another tenant's model, or any URL, names nothing. The API resolves judges for `/graders/run` and when a GRPO job is
queued; the worker resolves them again for the job's run and answers the run's questions itself (`worker.judges`),
so that neither the endpoints' credentials nor the serve's token reach a training process.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field

import httpx

from jobs import served


class NoJudge(LookupError):
    """`model` names no judge this tenant may use; the message says why, `param` where (`resolve_all`)."""

    param = "grader.model"


@dataclass(frozen=True)
class Endpoint:
    """Where one judge model is asked: the operator's endpoint (`model` as it is named there), or the serve with the
    model's fields (`jobs.served.resolve_served_model`)."""

    model: str
    url: str  # the operator's base URL, or the serve's
    secret: str | None = field(default=None, repr=False)  # the operator's API key, or the serve's token
    served: dict[str, str] | None = None  # the serve request's model fields; None: the operator's endpoint


@dataclass(frozen=True)
class Config:
    """What the operator configured (from `Settings`)."""

    serve_url: str
    serve_token: str | None = field(default=None, repr=False)
    judge_url: str | None = None
    judge_api_key: str | None = field(default=None, repr=False)
    judge_models: tuple[str, ...] = ()
    timeout_s: float = 120.0
    retries: int = 3
    requests_per_s: float = 0.0

    @classmethod
    def of(cls, settings) -> Config:
        def secret(value) -> str | None:
            return value.get_secret_value() if value is not None else None

        return cls(
            settings.serve_url,
            secret(settings.serve_token),
            settings.judge_url,
            secret(settings.judge_api_key),
            tuple(settings.judge_models),
            settings.judge_timeout_s,
            settings.judge_retries,
            settings.judge_requests_per_s,
        )


def models_of(grader: dict, root: str = "grader") -> list[tuple[str, str]]:
    """(param, model) of each model grader in a grader's JSON (a `multi` grader's too, its graders given by name or
    as a list); params start at `root`."""
    if grader.get("type") == "multi":
        graders = grader.get("graders")
        if isinstance(graders, dict) and "type" in graders:  # one grader, as the SDK's type allows
            graders = {graders.get("name") if isinstance(graders.get("name"), str) else "grader": graders}
        named = (
            graders.items() if isinstance(graders, dict) else enumerate(graders if isinstance(graders, list) else [])
        )
        return [
            (f"{root}.graders.{name}.model", g["model"])
            for name, g in named
            if isinstance(g, dict) and isinstance(g.get("model"), str)
        ]
    return [(f"{root}.model", grader["model"])] if isinstance(grader.get("model"), str) else []


def resolve(config: Config, store, storage, tenant: str, model: str, folders: served.Folders) -> Endpoint:
    """The judge `model` names for `tenant`, or `NoJudge`. Blocking (database, storage)."""
    if model in config.judge_models:
        if not config.judge_url:
            raise NoJudge(
                f"{model!r} is an operator's judge model, but no judge endpoint is configured (PREFQ_JUDGE_URL)"
            )
        return Endpoint(model, config.judge_url, config.judge_api_key)
    try:
        fields = served.resolve_served_model(store, storage, tenant, model, folders)
    except served.NotServed as exc:
        others = (
            f" or one of the operator's judge models ({', '.join(config.judge_models)})" if config.judge_models else ""
        )
        raise NoJudge(f"no judge model {model!r}: {exc}{others}") from None
    return Endpoint(model, config.serve_url, config.serve_token, fields)


def resolve_all(
    config: Config, store, storage, tenant: str, found_graders: dict[str, dict], folders: served.Folders
) -> dict[str, Endpoint]:
    """The judge of each model grader in `found_graders` (JSON by field: `grader`, `sample_grader`), by model; a
    `NoJudge` whose `param` names the first that names none."""
    found = {}
    for root, grader in found_graders.items():
        for param, model in models_of(grader, root):
            try:
                found[model] = resolve(config, store, storage, tenant, model, folders)
            except NoJudge as exc:
                exc.param = param
                raise
    return found


MAX_TOKENS = 64  # a judge's reply when the grader's sampling_params set none: a score or a label
RETRY_BASE_S = 0.5  # the first wait before asking a failed judge again; doubled each time, at most RETRY_MAX_S
RETRY_MAX_S = 8.0


class Unavailable(RuntimeError):
    """The judge did not answer (no connection, a timeout, 429 or 5xx): worth asking again."""


class RateLimit:
    """At most `per_s` questions a second to each endpoint (by URL), for every thread of this process: each question
    takes the next free slot and waits for it. `clock` and `sleep` are the time's, replaceable in a test."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self.clock, self.sleep = clock, sleep
        self.next_free: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, key: str, per_s: float) -> float:
        """Wait for `key`'s next slot; returns the seconds waited."""
        if per_s <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            slot = max(now, self.next_free.get(key, now))
            self.next_free[key] = slot + 1.0 / per_s
        if slot > now:
            self.sleep(slot - now)
        return slot - now


LIMIT = RateLimit()


def ask(
    http: httpx.Client,
    endpoint: Endpoint,
    messages: list[dict],
    params: dict,
    timeout_s: float,
    retries: int = 0,
    requests_per_s: float = 0.0,
    sleep=time.sleep,
    budget_s: float | None = None,
) -> str:
    """The judge's reply, within the rate limit, asked again up to `retries` times (waiting 0.5 s, 1 s, 2 s, ...)
    while it is unavailable, and not past `budget_s` seconds in all (whoever asked stops waiting then); raises on
    anything but a reply (the grader scores 0, an evaluation fails, and says why)."""
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    for attempt in range(retries + 1):
        LIMIT.wait(endpoint.url, requests_per_s)
        left = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
        try:
            if left <= 0:
                raise Unavailable("no time left to ask")
            return _ask_once(http, endpoint, messages, params, left)
        except (Unavailable, httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            pause = min(RETRY_MAX_S, RETRY_BASE_S * 2**attempt)
            if attempt == retries or (deadline is not None and time.monotonic() + pause >= deadline):
                tries = f" (asked {attempt + 1} times)" if attempt else ""
                raise RuntimeError(f"{exc or type(exc).__name__}{tries}") from None
            sleep(pause)
    raise AssertionError("unreachable")


RETRIED = (429, 500, 502, 503, 504)  # a judge busy or away for now; anything else is its answer


def _status(response: httpx.Response, what: str) -> None:
    if response.status_code in RETRIED:
        raise Unavailable(f"{what} answered HTTP {response.status_code}")
    if response.status_code != 200:
        raise RuntimeError(f"{what} answered HTTP {response.status_code}: {response.text[:300]}")


def _ask_once(http: httpx.Client, endpoint: Endpoint, messages: list[dict], params: dict, timeout_s: float) -> str:
    max_tokens = int(params.get("max_completions_tokens") or params.get("max_tokens") or MAX_TOKENS)
    sampling = {
        "max_tokens": max_tokens,
        "temperature": float(params.get("temperature") or 0.0),
        "top_p": float(params.get("top_p") or 1.0),
        "seed": params.get("seed"),
    }
    headers = {"Authorization": f"Bearer {endpoint.secret}"} if endpoint.secret else {}
    if endpoint.served is None:
        response = http.post(
            endpoint.url.rstrip("/") + "/chat/completions",
            json={"model": endpoint.model, "messages": messages, **sampling},
            headers=headers,
            timeout=timeout_s,
        )
        _status(response, "the judge endpoint")
        return response.json()["choices"][0]["message"]["content"] or ""
    request = {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        **endpoint.served,
        "messages": messages,
        "stop": [],
        "logit_bias": {},
        **sampling,
    }
    parts = []
    with http.stream(
        "POST", endpoint.url.rstrip("/") + "/generate", json=request, headers=headers, timeout=timeout_s
    ) as response:
        if response.status_code != 200:
            response.read()
            _status(response, "the generation service")
        for line in response.iter_lines():
            if not line:
                continue
            answer = json.loads(line)
            if "error" in answer:
                error = answer["error"]
                raise RuntimeError(f"{error.get('code')}: {error.get('message')}")
            if answer.get("done"):
                return "".join(parts)
            parts.append(answer.get("delta", ""))
    raise RuntimeError("the generation service's answer broke off")
