"""`prefq serve`'s model processes: one `python -P -m training generate FOLDER` child per model (`training.generate`),
started on the first request for it with a training run's sanitized environment, and kept while it is among the
`PREFQ_SERVE_MAX_MODELS` models used last. Model folders come from storage into the host's model cache
(`storage.cache`), shared with this host's jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from settings import Settings
from storage import StorageError, get_dir, open_storage, open_uri
from storage.cache import ModelCache
from training.launch import run_env
from training.parent import confine_child

log = logging.getLogger("prefq.serve")
LOAD_TIMEOUT_S = 900.0  # fetching is not counted: loading a big model onto a GPU takes minutes, not hours
LINE_LIMIT = 1 << 24  # bytes of one line from a child
TENANTS = "tenants/"  # `jobs.perimeter.tenant_prefix`'s parent


class ServeError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.line = {"error": {"status": status, "code": code, "message": message, "param": param}}


class Child:
    """One model's `python -m training generate` process; `lock` is held for the request it is answering."""

    def __init__(self, uri: str, fd: int, proc: asyncio.subprocess.Process):
        self.uri, self.fd, self.proc, self.lock = uri, fd, proc, asyncio.Lock()
        self.killed = False

    @classmethod
    async def start(cls, settings: Settings, uri: str, folder: str, fd: int) -> Child:
        env = run_env(dict(os.environ), settings.gpu_ids, len(settings.gpu_ids))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "training",
            "generate",
            folder,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=settings.work_dir,
            start_new_session=True,
            preexec_fn=confine_child,
            limit=LINE_LIMIT,
        )
        child = cls(uri, fd, proc)
        try:
            first = await child.read(time.monotonic() + LOAD_TIMEOUT_S)
        except ServeError as exc:
            child.kill(exc.line["error"]["message"])
            raise
        if not first.get("ready"):
            child.kill("it did not load the model")
            raise (
                ServeError(**first["error"])
                if "error" in first
                else ServeError(500, "model_unavailable", f"the model's process answered {first!r}")
            )
        log.info("Serving %s (pid %s, %s)", uri, proc.pid, first.get("device"))
        return child

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.killed

    def kill(self, why: str) -> None:
        if self.alive:
            log.warning("Model %s: its process %s is killed (%s)", self.uri, self.proc.pid, why)
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.fd >= 0:
            os.close(self.fd)  # the cached folder may be evicted from now on
            self.fd = -1

    async def read(self, deadline: float) -> dict:
        """The child's next line; a `ServeError` when it is late (the caller kills it) or has exited."""
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ServeError(504, "timeout", "generation ran past the time limit") from None
        if not raw:
            code = await self.proc.wait()
            raise ServeError(500, "generation_failed", f"the model's process exited (code {code}); see the serve log")
        return json.loads(raw)

    async def answer(self, req: dict, deadline: float) -> AsyncIterator[dict]:
        """The lines of one request's answer, the last one `done` or `error`."""
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            await self.proc.stdin.drain()
        except OSError:
            raise ServeError(500, "generation_failed", "the model's process is gone; see the serve log") from None
        while True:
            line = await self.read(deadline)
            if line.get("id") != req["id"]:
                continue  # the end of an earlier, abandoned answer
            yield line
            if line.get("done") or "error" in line:
                return

    async def drain(self, rid: str, deadline: float) -> None:
        """Read an abandoned answer to its end, so that the next request starts on a free child; then unlock."""
        try:
            while True:
                line = await self.read(deadline)
                if line.get("id") == rid and (line.get("done") or "error" in line):
                    return
        except ServeError as exc:
            self.kill(f"an abandoned answer: {exc.line['error']['message']}")
        finally:
            self.lock.release()


class Pool:
    """The children, least recently used first; at most `serve_max_models` of them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: OrderedDict[str, Child] = OrderedDict()
        self.loading: dict[str, asyncio.Lock] = {}
        self.draining: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to tasks
        self.cache = ModelCache(settings.work_dir / "models", int(settings.model_cache_gb * 1e9))
        # every tenant's models live under `<storage root>/tenants/` (`jobs.layout`): nothing else is served
        self.root = open_storage(settings.storage_url, **settings.storage_options()).uri(TENANTS)

    def _fetch(self, uri: str):
        def fetch(local) -> None:
            storage, key = open_uri(uri, **self.settings.storage_options())
            get_dir(storage, key, local)

        return self.cache.open(uri, fetch)

    def _make_room(self) -> None:
        for uri, child in list(self.children.items()):
            if len(self.children) < self.settings.serve_max_models:
                return
            if not child.lock.locked():
                child.kill("the least recently used model makes room")
                del self.children[uri]
        if len(self.children) >= self.settings.serve_max_models:
            raise ServeError(
                503,
                "serve_busy",
                f"all {len(self.children)} served models are answering requests "
                "(PREFQ_SERVE_MAX_MODELS); retry shortly",
            )

    async def child(self, uri: str) -> Child:
        if not uri.startswith(self.root) or ".." in uri.split("/"):
            raise ServeError(403, "reference_not_allowed", "model: not a tenant's model in this server's storage")
        async with self.loading.setdefault(uri, asyncio.Lock()):
            child = self.children.get(uri)
            if child is not None and child.alive:
                self.children.move_to_end(uri)
                return child
            if child is not None:
                child.kill("gone")
                del self.children[uri]
            self._make_room()
            try:
                folder, fd = await asyncio.to_thread(self._fetch, uri)
            except (StorageError, OSError) as exc:
                raise ServeError(503, "model_unavailable", f"the model's files cannot be fetched: {exc}") from None
            try:
                child = await Child.start(self.settings, uri, str(folder), fd)
            except BaseException:
                os.close(fd)
                raise
            self.children[uri] = child
            return child

    def close(self) -> None:
        for child in self.children.values():
            child.kill("the service stops")
        self.children.clear()
