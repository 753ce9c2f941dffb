"""Storage in a local folder: the embedded default for one machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from storage.base import StorageError


class LocalStorage:
    def __init__(self, url: str):
        self.url = url
        self.root = Path(url.removeprefix("file://")).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} leaves the storage root")
        return path

    def _write(self, key: str, write) -> None:
        """Write through a temporary file and rename: a reader never sees half a file."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: Path, key: str) -> None:
        with open(local, "rb") as src:
            self._write(key, lambda out: shutil.copyfileobj(src, out, 1 << 20))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._write(key, lambda out: out.write(data))

    def get_file(self, key: str, local: Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no such key: {self.uri(key)}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, local)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"no such key: {self.uri(key)}")
        return path.read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".upload-"))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, prefix: str) -> int:
        keys = self.list(prefix) if prefix.endswith("/") else ([prefix] if self.exists(prefix) else [])
        for key in keys:
            self._path(key).unlink()
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        if not self.exists(key):
            raise StorageError(f"no such key: {self.uri(key)}")
        return self.uri(key)

    def uri(self, key: str) -> str:
        return f"file://{self.root / key}"
