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

Callback URLs: http or https, no credentials, and a host every address of which is global unicast (`ipaddress`'s
`is_global`; refused otherwise unless the operator allows private callbacks) and none a cloud metadata address
(always refused). An IPv6 address that carries an IPv4 one (IPv4-mapped or -compatible, SIIT, 6to4, Teredo,
NAT64) is judged by that IPv4 address too, since it reaches it. The worker checks again right before each delivery
(DNS rebinding).
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
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix: the IPv4 address is the last 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, for local use: any RFC 6052 prefix length
EMBEDDED = (ipaddress.ip_network("::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))  # IPv4-compatible, SIIT
# Not global whatever Python says (the IANA registry marks them not globally reachable; Python before 3.12.4 calls
# them global): 6to4 relays and local NAT64 reach IPv4 hosts, and IPv4-compatible and SIIT forms are not routed.
NOT_GLOBAL = (ipaddress.ip_network("2002::/16"), NAT64_LOCAL, *EMBEDDED)


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


def confine(
    ref: str,
    field: str,
    tenant: str,
    storage_root: str,
    shared: list[str],
    roots: list[str],
    models: bool,
    hub: tuple[str, ...] | list[str] = (),
) -> str:
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
            raise Refused(
                field, f"the hub model {parsed.value} is not one this server allows (PREFQ_ALLOWED_HUB_MODELS)"
            )
        return ref
    if "://" in ref:
        uri = _normal_uri(ref, field)
        own = storage_root.rstrip("/") + "/" + tenant_prefix(tenant)
        if _under(uri, own) or (models and any(_under(uri, s) for s in shared)):
            return uri
        raise Refused(
            field,
            f"not a location this key may read: use ids, or storage URIs under {own}"
            + (" or a shared model prefix" if models and shared else ""),
        )
    if models and ref.startswith("/"):
        real = os.path.realpath(ref)
        if any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots)):
            return real
    raise Refused(
        field,
        "not a location this key may read: use ids, storage URIs under this tenant's prefix"
        + (", or a folder under one of this server's model roots (PREFQ_MODEL_ROOTS)" if models else ""),
    )


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
        judged = [address, *_carried(address)]
        if any(a in METADATA for a in judged):
            raise Refused("callback_url", "cloud metadata addresses are never allowed")
        if not allow_private and not all(map(_global, judged)):
            raise Refused(
                "callback_url",
                f"{host} resolves to {address}, not a global address; callbacks go "
                "to public hosts (PREFQ_CALLBACK_ALLOW_PRIVATE=true allows internal ones)",
            )
    return infos[0][4][0]


def _global(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally reachable unicast (Python calls multicast global: no TCP connection goes there)."""
    return address.is_global and not address.is_multicast and not any(address in n for n in NOT_GLOBAL)


def _carried(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, that a packet to it may reach (a relay or translator on the way).
    For the local NAT64 prefix, whose length the network chooses, every place RFC 6052 allows."""
    if address.version == 4:
        return []
    value = int(address)
    carried = [a for a in (address.ipv4_mapped, address.sixtofour, *(address.teredo or ())) if a is not None]
    if address in NAT64 or any(address in n for n in EMBEDDED):
        carried.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address in NAT64_LOCAL:
        carried += [_rfc6052(value, prefix) for prefix in (48, 56, 64, 96)]
    return carried


def _rfc6052(value: int, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address in the 32 bits after a `prefix`-bit NAT64 prefix, bits 64-71 (the "u" octet) skipped."""
    bits = (value >> 64 << 56) | (value & ((1 << 56) - 1))  # 120 bits: the address without its u octet
    start = prefix if prefix <= 64 else prefix - 8
    return ipaddress.IPv4Address(bits >> (120 - 32 - start) & 0xFFFFFFFF)
