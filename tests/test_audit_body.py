"""What a request's body may cost a real `prefq api` process (`api.limits.Gate`): nothing at all without a valid
key, the route's limit with one (`PREFQ_MAX_JSON_BYTES` for JSON, `PREFQ_MAX_UPLOAD_BYTES` for uploads).

Bodies are streamed from generators over a raw socket, read from while they are sent, so that neither side need
hold them and an early answer is seen as it comes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from api.app import create_app
from api.limits import needs_key
from jobs.db import upgrade
from settings import Settings
from tests.services import die_with_parent, free_port, make_key, stop, wait_for_port
from tests.test_api import GOOD

MIB = 1 << 20


@pytest.fixture(scope="module")
def api(tmp_path_factory, broker_url):
    """A `prefq api` process on SQLite; yields (port, pid, an admin key)."""
    data = tmp_path_factory.mktemp("body")
    url = Settings(data_dir=data).database_url
    upgrade(url)
    port = free_port()
    env = dict(
        os.environ,
        PREFQ_DATA_DIR=str(data),
        PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/5",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefq")), "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    wait_for_port(port, 60)
    yield port, proc.pid, make_key(url, "default", admin=True)
    stop([proc])


def rss(pid: int) -> int:
    """Resident bytes of the process and its children (the server may be either)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


class Peak(threading.Thread):
    """The largest `rss(pid)` seen while it runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, rss(pid), threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))


def post(port: int, path: str, chunks, headers: dict, length: int | None = None) -> tuple[int, float, dict]:
    """POST the body that `chunks` yields (chunked, or with `length` declared), reading the answer while it is
    sent; returns (status, seconds to the answer, JSON answer). The sending stops when the server closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Type": "application/json", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}{framing}\r\n\r\n".encode())

    def pump():
        try:
            for chunk in chunks:
                sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if length is None:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed the connection: what it should do

    sender = threading.Thread(target=pump, daemon=True)
    start = time.monotonic()
    sender.start()
    sock.settimeout(120)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    took = time.monotonic() - start
    with contextlib.suppress(OSError):  # the server may have closed it already
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    sender.join(30)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), took, json.loads(body or b"{}")


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def megabytes(total: int):
    """`total` MiB of the inside of a JSON string, one MiB at a time (a valid JSON body start to end with `framed`)."""
    chunk = b"x" * MIB
    for _ in range(total):
        yield chunk


def framed(total: int):
    yield b'{"model": "'
    yield from megabytes(total)
    yield b'", "dataset": "ds_x", "method": "dpo"}'


@pytest.mark.parametrize("path", ["/jobs", "/v1/chat/completions"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_unauthenticated_body_is_refused_before_it_is_read(api, path, declared):
    port, pid, _ = api
    post(port, path, iter([b"{}"]), {}, 2)  # the 401 path's code is loaded before the baseline
    size = 200 * MIB + len(b'{"model": "", "dataset": "ds_x", "method": "dpo"}')
    peak = Peak(pid)
    before = peak.peak
    peak.start()
    status, took, answer = post(
        port, path, framed(200), {"Authorization": "Bearer not-a-key"}, size if declared else None
    )
    time.sleep(0.5)  # anything still read after the answer would show now
    peak.done.set()
    peak.join()
    grew = (peak.peak - before) / MIB
    print(
        f"{path} ({'declared' if declared else 'chunked'}): {status} after {took:.2f} s; RSS "
        f"{before / MIB:.0f} -> peak {peak.peak / MIB:.0f} MiB (+{grew:.1f})"
    )
    assert status == 401, answer
    assert took < 3, f"the 401 took {took:.1f} s: the body was read first"
    assert grew < 20, f"the API process grew by {grew:.0f} MiB on an anonymous body"


def test_a_json_body_over_its_limit_is_a_413_naming_the_setting(api):
    port, _, key = api
    auth = {"Authorization": f"Bearer {key}"}
    size = 2 * MIB + len(b'{"model": "", "dataset": "ds_x", "method": "dpo"}')
    for length in (size, None):
        status, _, answer = post(port, "/jobs", framed(2), auth, length)
        assert status == 413, answer
        assert answer["error"]["code"] == "body_too_large" and "PREFQ_MAX_JSON_BYTES" in answer["error"]["message"]
    status, _, answer = post(port, "/v1/chat/completions", framed(2), auth, size)
    assert status == 413 and "PREFQ_MAX_JSON_BYTES" in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error", "OpenAI's shape under /v1"
    # an upload keeps its own limit: 2 MiB of rows is a dataset
    rows = GOOD * (2 * MIB // len(GOOD) + 1)
    r = httpx.post(f"http://127.0.0.1:{port}/datasets", files={"file": ("big.jsonl", rows)}, headers=auth, timeout=60)
    assert r.status_code == 201, r.text


def test_the_gate_asks_for_a_key_exactly_where_the_routes_do(settings):
    """`needs_key` against the OpenAPI document: an operation declares the bearer scheme iff it takes a key (the
    dashboard, outside the document, has its session)."""
    doc = create_app(settings).openapi()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert needs_key(path) == bool(op.get("security")), f"{method.upper()} {path}"
