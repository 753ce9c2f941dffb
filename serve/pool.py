"""`prefq serve`'s model processes: one `python -P -m training generate MODEL` child per base model
(`training.generate`), started on the first request for it with a training run's sanitized environment, and kept
while it is among the `PREFQ_SERVE_MAX_MODELS` models used last.

A child answers many requests at once (it batches them): each request has a queue of its own here, fed by the one
task that reads the child's lines (`Child.route`). A LoRA adapter is answered by its base model's child, which loads
the adapter beside the others (`PREFQ_SERVE_ADAPTER_MB`), so twenty adapters of one base hold one copy of it. Model
and adapter folders come from storage into the host's model cache (`storage.cache`), shared with this host's jobs;
a folder is held in the cache while a child or a request uses it.
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
from dataclasses import dataclass

from settings import Settings
from storage import StorageError, get_dir, open_storage, open_uri
from storage.cache import ModelCache
from training.parent import confine_child, run_env

log = logging.getLogger("prefq.serve")
LOAD_TIMEOUT_S = 900.0  # fetching is not counted: loading a big model onto a GPU takes minutes, not hours
LINE_LIMIT = 1 << 24  # bytes of one line from a child
TENANTS = "tenants/"  # `jobs.perimeter.tenant_prefix`'s parent


class ServeError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.line = {"error": {"status": status, "code": code, "message": message, "param": param}}


@dataclass(frozen=True)
class Base:
    """What a child loads: a model folder in storage (`uri`) or a hub id (`hub`, `revision`)."""

    uri: str | None = None
    hub: str | None = None
    revision: str | None = None

    @property
    def key(self) -> str:
        return self.uri or f"hub:{self.hub}@{self.revision or ''}"


class Child:
    """One base model's `python -m training generate` process and the requests it is answering."""

    def __init__(self, settings: Settings, key: str, fd: int, proc: asyncio.subprocess.Process):
        self.settings, self.key, self.fd, self.proc = settings, key, fd, proc
        self.killed = False
        self.pending: dict[str, asyncio.Queue] = {}
        self.heard = time.monotonic()  # when the child last wrote a line
        self.router: asyncio.Task | None = None

    @classmethod
    async def start(cls, settings: Settings, base: Base, model: str, fd: int) -> Child:
        env = run_env(dict(os.environ), settings.gpu_ids, len(settings.gpu_ids))
        args = [model] + (["--revision", base.revision] if base.revision else [])
        args += ["--batch", str(settings.serve_max_batch), "--adapter-mb", str(settings.serve_adapter_mb)]
        args += ["--engine", settings.serve_engine]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "training",
            "generate",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=settings.work_dir,
            start_new_session=True,
            preexec_fn=confine_child,
            limit=LINE_LIMIT,
        )
        child = cls(settings, base.key, fd, proc)
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
        log.info("Serving %s (pid %s, %s)", base.key, proc.pid, first.get("device"))
        child.router = asyncio.get_running_loop().create_task(child.route())
        return child

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.killed

    def kill(self, why: str) -> None:
        if self.alive:
            log.warning("Model %s: its process %s is killed (%s)", self.key, self.proc.pid, why)
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.fd >= 0:
            os.close(self.fd)  # the cached folder may be evicted from now on
            self.fd = -1

    async def read(self, deadline: float) -> dict:
        """The child's next line (before `route` takes over); a `ServeError` when it is late or has exited."""
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ServeError(504, "timeout", "the model's process did not answer in time") from None
        if not raw:
            code = await self.proc.wait()
            raise ServeError(500, "generation_failed", f"the model's process exited (code {code}); see the serve log")
        return json.loads(raw)

    async def route(self) -> None:
        """Every line of the child to the queue of the request it answers, until the child exits; then each waiting
        request gets an error line."""
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            self.heard = time.monotonic()
            try:
                line = json.loads(raw)
            except ValueError:
                log.warning("Model %s: a line that is not JSON: %r", self.key, raw[:200])
                continue
            queue = self.pending.get(line.get("id"))
            if queue is not None:
                queue.put_nowait(line)
        code = await self.proc.wait()
        gone = ServeError(500, "generation_failed", f"the model's process exited (code {code}); see the serve log")
        for queue in self.pending.values():
            queue.put_nowait(gone.line)

    def open(self, rid: str) -> asyncio.Queue:
        """A queue for the lines of request `rid`; a 503 when the model holds `serve_max_waiting` requests."""
        if len(self.pending) >= self.settings.serve_max_waiting:
            raise ServeError(
                503,
                "serve_busy",
                f"the model holds {len(self.pending)} requests (PREFQ_SERVE_MAX_WAITING); retry shortly",
            )
        if rid in self.pending:
            raise ServeError(409, "duplicate_id", f"a request {rid!r} is being answered", "id")
        self.pending[rid] = queue = asyncio.Queue()
        return queue

    def close(self, rid: str, cancel: bool) -> None:
        """Forget request `rid`; with `cancel`, the child stops generating it at its next token."""
        self.pending.pop(rid, None)
        if cancel and self.alive:
            try:
                self.write({"cancel": rid})
            except ServeError:
                pass  # the child is gone: nothing of the request is left to stop

    def write(self, line: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(line).encode() + b"\n")
        except (OSError, RuntimeError):
            raise ServeError(500, "generation_failed", "the model's process is gone; see the serve log") from None

    async def ask(self, req: dict) -> None:
        self.write(req)
        try:
            await self.proc.stdin.drain()
        except OSError:
            raise ServeError(500, "generation_failed", "the model's process is gone; see the serve log") from None


class Pool:
    """The children, least recently used first; at most `serve_max_models` of them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: OrderedDict[str, Child] = OrderedDict()
        self.loading: dict[str, asyncio.Lock] = {}
        self.cache = ModelCache(settings.work_dir / "models", int(settings.model_cache_gb * 1e9))
        # every tenant's models live under `<storage root>/tenants/` (`jobs.layout`): nothing else is served
        self.root = open_storage(settings.storage_url, **settings.storage_options()).uri(TENANTS)

    def check(self, uri: str) -> None:
        if not uri.startswith(self.root) or ".." in uri.split("/"):
            raise ServeError(403, "reference_not_allowed", "model: not a tenant's model in this server's storage")

    async def fetch(self, uri: str) -> tuple[str, int]:
        """A folder of storage in the model cache, and the descriptor that holds it there (close it when done)."""
        self.check(uri)

        def fetch(local) -> None:
            storage, key = open_uri(uri, **self.settings.storage_options())
            get_dir(storage, key, local)

        try:
            folder, fd = await asyncio.to_thread(self.cache.open, uri, fetch)
        except (StorageError, OSError) as exc:
            raise ServeError(503, "model_unavailable", f"the model's files cannot be fetched: {exc}") from None
        return str(folder), fd

    def _make_room(self) -> None:
        for key, child in list(self.children.items()):
            if len(self.children) < self.settings.serve_max_models:
                return
            if not child.pending:
                child.kill("the least recently used model makes room")
                del self.children[key]
        if len(self.children) >= self.settings.serve_max_models:
            raise ServeError(
                503,
                "serve_busy",
                f"all {len(self.children)} served models are answering requests "
                "(PREFQ_SERVE_MAX_MODELS); retry shortly",
            )

    async def child(self, base: Base) -> Child:
        if base.uri is not None:
            self.check(base.uri)
        async with self.loading.setdefault(base.key, asyncio.Lock()):
            child = self.children.get(base.key)
            if child is not None and child.alive:
                self.children.move_to_end(base.key)
                return child
            if child is not None:
                child.kill("gone")
                del self.children[base.key]
            self._make_room()
            folder, fd = await self.fetch(base.uri) if base.uri is not None else (base.hub, -1)
            try:
                child = await Child.start(self.settings, base, folder, fd)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            self.children[base.key] = child
            return child

    def close(self) -> None:
        for child in self.children.values():
            child.kill("the service stops")
        self.children.clear()
