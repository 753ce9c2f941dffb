"""Which API the CLI talks to, with which key: `--api-url`, else PREFQ_API_URL, else the config file's; the key
from PREFQ_API_KEY, else the config file. `prefq dev` and `prefq demo` write the file (mode 0600) with the admin
key they create on first start. Where: `$XDG_CONFIG_HOME/prefq/config.json`, else `~/.config/prefq/config.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cli.client import Client, ClientError
from cli.console import fail
from settings import Settings

state: dict = {}  # the global options of this invocation (`--api-url`)


def client() -> Client:
    """The API client of this invocation."""
    settings, saved = Settings(), read()
    url = state.get("api_url") or (settings.api_url if "api_url" in settings.model_fields_set else None)
    key = settings.api_key.get_secret_value() if settings.api_key else saved.get("api_key")
    return Client(url or saved.get("api_url") or settings.api_url, key)


def call(method: str, path: str, **kwargs) -> dict:
    """One request of this invocation's client; an error the API answers ends the command, saying why."""
    try:
        return client().request(method, path, **kwargs)
    except ClientError as exc:
        fail(str(exc))


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
