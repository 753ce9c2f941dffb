"""A small HTTP client of the API, for the CLI.

Every create (a job, a dataset, a model version) carries an `Idempotency-Key`, fresh for each create, and is sent
again with the same key when the connection fails before an answer came: the API may have committed the first
one, and the key makes it return that object instead of making a second.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from storage.base import StorageError, contained

CREATE_ATTEMPTS = 4


class ClientError(RuntimeError):
    """The API answered with an error, or could not be reached."""


class Unreachable(ClientError):
    """No answer came: the API could not be reached, or the connection broke."""


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, expected: tuple[int, ...] = (), **kwargs) -> dict:
        """The JSON answer; a `ClientError` for an error status, unless it is one of `expected`."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"cannot reach the API at {self.base_url} ({exc}); start it with `prefq dev` or "
                "`prefq api`, or set --api-url / PREFQ_API_URL"
            ) from None
        if response.is_error and response.status_code not in expected:
            try:
                err = response.json()["error"]
                message = f"{err['code']}: {err['message']}"
                for detail in err.get("details") or []:
                    message += "\n  " + ", ".join(f"{k} {v}" for k, v in detail.items())
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:500]}"
            raise ClientError(message)
        return response.json() if response.content else {}

    def create(self, path: str, idempotency_key: str | None = None, body: Callable[[], dict] = dict) -> dict:
        """POST a new object with an `Idempotency-Key` (a fresh uuid unless given), re-sent with the same key
        while no answer comes. `body()` gives the request's keyword arguments, anew for each attempt (a file
        upload rereads its file)."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}

        @retry(
            retry=retry_if_exception_type(Unreachable),
            stop=stop_after_attempt(CREATE_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.5, max=5),
            reraise=True,
        )
        def send() -> dict:
            return self.request("POST", path, headers=headers, **body())

        return send()

    def upload_dataset(self, path: Path, method: str | None) -> dict:
        data = {"method": method} if method else {}
        with open(path, "rb") as fh:

            def body() -> dict:
                fh.seek(0)
                return {"files": {"file": (path.name, fh, "application/jsonl")}, "data": data}

            return self.create("/datasets", body=body)

    def submit(self, job: dict, idempotency_key: str | None = None) -> dict:
        return self.create("/jobs", idempotency_key, lambda: {"json": job})

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}")

    def jobs(self, status: str | None = None, created_after: float | None = None) -> Iterator[dict]:
        """Every job matching, across pages."""
        params = {"limit": 100, "status": status, "created_after": created_after}
        while True:
            page = self.request("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})
            yield from page["data"]
            if not page["has_more"]:
                return
            params["after"] = page["next_cursor"]

    def events(self, job_id: str, after: int = 0) -> dict:
        return self.request("GET", f"/jobs/{job_id}/events", params={"after": after})

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[dict]:
        """Server-Sent Events until the job has finished."""
        headers = {"Accept": "text/event-stream"}
        with self.http.stream(
            "GET", f"/jobs/{job_id}/events", params={"after": after}, headers=headers, timeout=None
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])

    def download(self, files: list[dict], out_dir: Path) -> None:
        try:  # every name is checked before anything is written
            targets = [contained(out_dir, f["name"]) for f in files]
        except StorageError as exc:
            raise ClientError(f"the API listed a file outside the download folder: {exc}") from None
        for f, target in zip(files, targets, strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            if f["url"].startswith("file://"):
                shutil.copyfile(f["url"].removeprefix("file://"), target)
                continue
            with httpx.stream("GET", f["url"], timeout=None) as response:
                response.raise_for_status()
                with open(target, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
