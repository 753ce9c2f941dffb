"""API keys: `pq_<id>_<secret>`. The id is public and indexes the row, so that a lookup never scans; only the
SHA-256 of the whole key is stored, and it is compared in constant time. A key belongs to a tenant; an admin
key sees every tenant. Revoked keys stay, for the record."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from jobs.db import session
from jobs.models import ApiKey, now

KEY_PATTERN = re.compile(r"pq_([0-9a-f]{12})_([0-9A-Za-z_-]{32,128})")


def generate() -> tuple[str, str]:
    """A fresh key and its id."""
    key_id = secrets.token_hex(6)
    return f"pq_{key_id}_{secrets.token_urlsafe(32)}", key_id


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, tenant: str, admin: bool = False, label: str = "", key: str | None = None) -> tuple[ApiKey, str]:
        """A new key (or `key`, when the operator provides one); returns the row and the key, shown once."""
        if key is None:
            key, key_id = generate()
        else:
            match = KEY_PATTERN.fullmatch(key)
            if not match:
                raise ValueError("a key looks like pq_<12 hex>_<32+ characters>; make one with `prefq keys generate`")
            key_id = match.group(1)
        row = ApiKey(id=key_id, tenant=tenant, admin=admin, label=label, sha256=digest(key))
        with session(self.engine) as s:
            s.add(row)
            s.commit()
        return row, key

    def ensure(self, key: str, tenant: str, admin: bool, label: str) -> ApiKey:
        """The key's row, created if it is not there yet (the operator's bootstrap key, `PREFQ_ADMIN_KEY`)."""
        match = KEY_PATTERN.fullmatch(key)
        if match and (row := self.get(match.group(1))) is not None:
            return row
        return self.create(tenant, admin, label, key)[0]

    def get(self, key_id: str) -> ApiKey | None:
        with session(self.engine) as s:
            return s.get(ApiKey, key_id)

    def authenticate(self, key: str) -> ApiKey | None:
        """The live key row that `key` is, or None."""
        match = KEY_PATTERN.fullmatch(key)
        if not match:
            return None
        row = self.get(match.group(1))
        if row is None or row.revoked_at is not None:
            return None
        return row if hmac.compare_digest(row.sha256, digest(key)) else None

    def touch(self, key_id: str) -> None:
        with session(self.engine) as s:
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now()))
            s.commit()

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(col(ApiKey.created_at))
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        with session(self.engine) as s:
            return list(s.exec(query))

    def revoke(self, key_id: str) -> ApiKey | None:
        with session(self.engine) as s:
            s.execute(
                update(ApiKey).where(ApiKey.id == key_id, col(ApiKey.revoked_at).is_(None)).values(revoked_at=now())
            )
            s.commit()
            return s.get(ApiKey, key_id)
