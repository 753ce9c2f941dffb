"""`prefq keys ...`: API keys, on the database directly (PREFQ_DATABASE_URL): how an operator makes the first
key. The admin HTTP routes (`/keys`) do the same remotely."""

from __future__ import annotations

import re
import time

import typer

from cli.console import JSON_OPTION, console, errors, fail, print_json, print_table
from jobs.perimeter import TENANT_PATTERN
from settings import Settings

keys_app = typer.Typer(help="API keys (on the database directly).", no_args_is_help=True)


def _store():
    from jobs.db import make_engine
    from jobs.keys import KeyStore

    return KeyStore(make_engine(Settings().database_url))


@keys_app.command("create")
def create(
    tenant: str = typer.Option(..., help="The tenant whose data the key reads and writes"),
    admin: bool = typer.Option(False, "--admin", help="Sees and manages every tenant"),
    label: str = typer.Option("", help="What the key is for"),
) -> None:
    """Make a key and print it, once: only its hash is kept."""
    if not re.fullmatch(TENANT_PATTERN, tenant):
        errors.print(
            f"[red]error:[/red] --tenant: {tenant!r} is not a tenant name (lowercase letters, digits, - and _)"
        )
        raise typer.Exit(2)
    row, key = _store().create(tenant, admin, label)
    console.print(f"key {row.id} for tenant {row.tenant}{' (admin)' if row.admin else ''}:")
    print(key)


@keys_app.command("generate")
def generate() -> None:
    """Print a fresh key without storing it (for PREFQ_ADMIN_KEY in a Secret: the API stores its hash at start)."""
    from jobs.keys import generate as fresh

    print(fresh()[0])


@keys_app.command("list")
def list_keys(tenant: str = typer.Option(None), as_json: bool = JSON_OPTION) -> None:
    """Every key: id, tenant, admin, label, created, last used, revoked (never the key). --json: an array of
    objects with these fields (times in seconds since the epoch), as `GET /keys` answers."""
    found = _store().list(tenant)
    if as_json:
        print_json([{"id": k.id, "object": "api_key", **k.model_dump(exclude={"id", "sha256"})} for k in found])
        return

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    print_table(
        ("id", "tenant", "admin", "label", "created", "last used", "revoked"),
        [
            (
                k.id,
                k.tenant,
                "yes" if k.admin else "",
                k.label,
                when(k.created_at),
                when(k.last_used_at),
                when(k.revoked_at),
            )
            for k in found
        ],
    )


@keys_app.command("revoke")
def revoke(key_id: str) -> None:
    """Revoke a key by its id: it gets 401 from then on."""
    row = _store().revoke(key_id)
    if row is None:
        fail(f"no key {key_id}")
    console.print(f"key {row.id} of tenant {row.tenant} revoked")
