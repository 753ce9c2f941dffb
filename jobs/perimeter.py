"""What a tenant's job may name, checked by the API before a job is queued and by the worker before it fetches.

References (`model`, `dataset`, `eval_dataset`) may only be:
- ids the tenant owns (`ds_...`; checked against the table by the caller);
- storage URIs under the storage root's tenant prefix (`<root>/tenants/<tenant>/...`), or under a shared prefix
  the operator lists (`PREFQ_SHARED_MODELS`, for models only);
- local folders under a root the operator lists (`PREFQ_MODEL_ROOTS`, for models only);
- for models: hub ids the operator allows (`PREFQ_ALLOWED_HUB_MODELS`), fine-tuned model names and job ids
  (`jobs.modelref`; their owner is checked against the table by the caller).
Anything else is refused with the field named, before anything is looked up: the answer never tells whether a
path exists outside what the tenant may read.

Callback URLs: http or https, no credentials, and a host none of whose addresses is a cloud metadata address
(always refused) or loopback, private, link-local, unique-local, multicast or reserved (refused unless the
operator allows private callbacks). The worker checks again right before each delivery (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from urllib.parse import urlsplit

from jobs import modelref

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")}


class Refused(ValueError):
    """A reference or URL the tenant may not use; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def tenant_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/"


def _under(uri: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") + "/"
    return uri.startswith(prefix)


def _normal_uri(uri: str, field: str) -> str:
    scheme, _, rest = uri.partition("://")
    parts = rest.split("/")
    if any(p in ("..", ".") for p in parts) or "\\" in rest or "\x00" in rest:
        raise Refused(field, "a storage URI may not contain '.' or '..' parts")
    return f"{scheme}://{rest}"


def confine(ref: str, field: str, tenant: str, storage_root: str, shared: list[str], roots: list[str],
            models: bool, hub: tuple[str, ...] | list[str] = ()) -> str:  # fmt: skip
    """The reference if `tenant` may read it; else `Refused`. Ids (`ds_...`, `job_...`) and fine-tuned model names
    pass: their owner is checked against the table by the caller. Models may be hub ids matching `hub`."""
    if re.fullmatch(r"(ds|job)_[A-Za-z0-9]+", ref):
        return ref
    if models and "://" not in ref and not ref.startswith("/"):
        try:
            parsed = modelref.parse(ref)
        except modelref.BadModelRef as exc:
            raise Refused(field, str(exc)) from None
        if parsed.kind == "hub" and not modelref.hub_allowed(parsed.value, hub):
            raise Refused(field, f"the hub model {parsed.value} is not one this server allows (PREFQ_ALLOWED_HUB_MODELS)")
        return ref
    if "://" in ref:
        uri = _normal_uri(ref, field)
        own = storage_root.rstrip("/") + "/" + tenant_prefix(tenant)
        if _under(uri, own) or (models and any(_under(uri, s) for s in shared)):
            return uri
        raise Refused(field, f"not a location this key may read: use ids, or storage URIs under {own}"
                             + (" or a shared model prefix" if models and shared else ""))
    if models and ref.startswith("/"):
        real = os.path.realpath(ref)
        if any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots)):
            return real
    raise Refused(field, "not a location this key may read: use ids, storage URIs under this tenant's prefix"
                         + (", or a folder under a model root the operator lists" if models else ""))


def check_callback_url(url: str, allow_private: bool, resolve=socket.getaddrinfo) -> str:
    """Refuse a callback URL that could reach inside the deployment (see the module docstring); returns an address
    it resolved to, all of them checked, for the caller to connect to (so that a second lookup cannot differ)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused("callback_url", "only http and https callbacks")
    if parts.username or parts.password or "@" in parts.netloc:
        raise Refused("callback_url", "credentials in the URL are not allowed; sign with PREFQ_CALLBACK_SECRET")
    host = parts.hostname
    if not host:
        raise Refused("callback_url", "no host")
    try:
        infos = resolve(host, parts.port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise Refused("callback_url", f"the host {host!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address in METADATA:
            raise Refused("callback_url", "cloud metadata addresses are never allowed")
        private = (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                   or address.is_reserved or address.is_unspecified)  # fmt: skip
        if private and not allow_private:
            raise Refused("callback_url", f"{host} resolves to {address}, an internal address; callbacks go to public "
                                          "hosts (PREFQ_CALLBACK_ALLOW_PRIVATE=true allows internal ones)")
    return infos[0][4][0]
