"""The CLI's config file: the API it talks to and the key it sends, for when PREFQ_API_URL and PREFQ_API_KEY are
not set. `prefq dev` and `prefq demo` write it (mode 0600) with the admin key they create on first start.
Where: `$XDG_CONFIG_HOME/prefq/config.json`, else `~/.config/prefq/config.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "prefq" / "config.json"


def read() -> dict:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(api_url: str, api_key: str) -> Path:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"api_url": api_url, "api_key": api_key}, out)
    os.replace(tmp, target)
    return target
