"""Signed callbacks: POST the job as JSON, with an HMAC-SHA256 signature over timestamp and body.

Headers: `X-Prefq-Event` (`job.succeeded`, ...), `X-Prefq-Delivery` (the same id on every try of one
callback: a receiver drops the duplicates of a delivery it has seen), `X-Prefq-Timestamp` (Unix seconds)
and `X-Prefq-Signature: sha256=<hex>` where the hex digest is HMAC-SHA256(secret, f"{timestamp}.{body}").
A receiver recomputes it over the raw body, compares in constant time, and rejects old timestamps to stop
replays. Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit, urlunsplit

import httpx


class CallbackError(RuntimeError):
    """The receiver could not be reached or did not answer 2xx; worth retrying."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def _pinned(url: str, address: str) -> tuple[str, dict, dict]:
    """The URL with its host replaced by the vetted address, and the Host header and TLS name that keep it the same
    request: the connection goes where the check looked, whatever a second DNS lookup would say."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc}, {"sni_hostname": parts.hostname}


def post_signed(
    url: str, body: bytes, secret: str, event: str, delivery_id: str, timeout_s: float, address: str | None = None
) -> int:
    """POST the callback; with `address`, to that address (checked by `jobs.perimeter.check_callback_url`)."""
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Prefq-Event": event,
        "X-Prefq-Delivery": delivery_id,
        "X-Prefq-Timestamp": timestamp,
        "X-Prefq-Signature": sign(secret, timestamp, body),
    }
    extensions = {}
    if address is not None:
        url, host, extensions = _pinned(url, address)
        headers.update(host)
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        raise CallbackError(f"{url}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise CallbackError(f"{url} answered {response.status_code}")
    return response.status_code
