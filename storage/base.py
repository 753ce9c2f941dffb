"""The storage interface, the folder helpers built on it, and the choice of backend by URL.

Keys are `/`-separated paths relative to the storage root (`datasets/ds_1.jsonl`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class StorageError(RuntimeError):
    """A storage operation failed (missing key, bad credentials, unreachable endpoint)."""


class Storage(Protocol):
    url: str  # the root, as given to open_storage

    def put_file(self, local: Path, key: str) -> None: ...

    def get_file(self, key: str, local: Path) -> None: ...

    def put_bytes(self, data: bytes, key: str) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (recursively), sorted."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, prefix: str) -> int:
        """Delete a key, or every key under a prefix ending in `/`; returns how many."""
        ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL that downloads `key` without credentials until it expires (`file://` for a local folder)."""
        ...

    def uri(self, key: str) -> str:
        """The full URL of a key (`s3://bucket/prefix/key`, `file:///root/key`)."""
        ...


def put_dir(
    storage: Storage,
    local_dir: Path,
    prefix: str,
    last: str | None = None,
    put: Callable[[Path, str], None] | None = None,
) -> list[str]:
    """Upload a folder under `prefix/`; the file named `last` (a manifest) goes after all others. `put(path, key)`
    replaces `storage.put_file` (the worker's checks the lease before every file)."""
    put = put or storage.put_file
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    keys = []
    for path in files:
        key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
        put(path, key)
        keys.append(key)
    return keys


def contained(root: Path, relative: str) -> Path:
    """`root / relative`, refused when `relative` (an object key's tail, a file name from a server) would leave
    `root`: absolute names, `..` parts, empty or NUL-bearing names."""
    parts = relative.replace("\\", "/").split("/")
    if not relative or "\x00" in relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing the path {relative!r}: it would leave {root}")
    target = (Path(root) / Path(*parts)).resolve()
    base = Path(root).resolve()
    if base != target and base not in target.parents:
        raise StorageError(f"refusing the path {relative!r}: it would leave {root}")
    return target


def get_dir(storage: Storage, prefix: str, local_dir: Path) -> list[str]:
    """Download every key under `prefix/` into `local_dir`, keeping the relative paths; a key that would land
    outside `local_dir` is refused before anything is written."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = storage.list(prefix)
    if not keys:
        raise StorageError(f"nothing stored under {storage.uri(prefix)}")
    targets = [contained(Path(local_dir), key[len(prefix) :]) for key in keys]
    for key, target in zip(keys, targets, strict=True):
        storage.get_file(key, target)
    return keys


def open_uri(uri: str, **options) -> tuple[Storage, str]:
    """A storage rooted at the URI's bucket (or `/`), and the URI's key in it."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return open_storage(f"s3://{bucket}", **options), key
    if uri.startswith("file://"):
        return open_storage("file:///"), uri.removeprefix("file://").lstrip("/")
    raise StorageError(f"Unknown storage URL: {uri!r}; use file:///path or s3://bucket/key")


def open_storage(
    url: str,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> Storage:
    """The backend for a URL: `file:///path` or `s3://bucket[/prefix]`."""
    if url.startswith("file://"):
        from storage.local import LocalStorage

        return LocalStorage(url)
    elif url.startswith("s3://"):
        from storage.s3 import S3Storage

        return S3Storage(
            url,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
    raise StorageError(f"Unknown storage URL: {url!r}; use file:///path or s3://bucket/prefix")
