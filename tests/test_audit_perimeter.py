"""Callback URLs are accepted only when every address they resolve to is global, IPv6 forms that carry an IPv4
address (mapped, 6to4, Teredo, NAT64) judged by that address too; cloud metadata is refused even where the
operator allows internal callbacks (issue 21, item 6). Real lookups of literal addresses: no resolver is faked."""

import ipaddress

import pytest

from jobs.perimeter import Refused, check_callback_url

TEREDO_SERVER = "4136:e378"  # 65.54.227.120


def teredo(client: str) -> str:
    """The Teredo address of an IPv4 client: 2001:0:<server>:<flags>:<port>:<client, bits inverted>."""
    inverted = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return f"2001:0:{TEREDO_SERVER}:8000:63bf:{inverted >> 16:x}:{inverted & 0xFFFF:x}"


INTERNAL = [  # not global, refused unless the operator allows internal callbacks
    "100.64.0.1",
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "192.0.2.1",
    "198.18.0.1",
    "0.0.0.0",
    "240.0.0.1",
    "255.255.255.255",
    "224.0.0.1",
    "::1",
    "fd12::1",
    "fe80::1",
    "::ffff:100.64.0.1",
    "2002:7f00:1::",
    "2002:a00:1::",
    "2002:6440:1::",  # 6to4 of 127.0.0.1, 10.0.0.1, 100.64.0.1
    teredo("127.0.0.1"),
    teredo("8.8.8.8"),  # Teredo (2001::/32) is not global itself
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "64:ff9b::6440:1",  # NAT64 of 127.0.0.1, 10.0.0.1, 100.64.0.1
    "64:ff9b:1::808:808",  # the local-use NAT64 prefix (RFC 8215) is not global, whatever it carries
]
METADATA = [  # refused always
    "169.254.169.254",
    "100.100.100.200",
    "169.254.170.2",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "2002:a9fe:a9fe::",
    teredo("169.254.169.254"),
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1:a9fe:a9:fe00::",  # local-use NAT64 with a /48 prefix: the IPv4 sits around the "u" octet
    "64:ff9b:1::a9fe:a9fe",  # ... and with a /96 prefix
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


def url(address: str) -> str:
    return f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"


@pytest.mark.parametrize("address", INTERNAL + METADATA)
def test_callbacks_to_addresses_that_are_not_global_are_refused(address):
    with pytest.raises(Refused) as refused:
        check_callback_url(url(address), allow_private=False)
    assert refused.value.field == "callback_url"


@pytest.mark.parametrize("address", METADATA)
def test_cloud_metadata_is_refused_in_every_form_even_where_internal_callbacks_are_allowed(address):
    with pytest.raises(Refused, match="cloud metadata"):
        check_callback_url(url(address), allow_private=True)


@pytest.mark.parametrize("address", INTERNAL)
def test_the_operator_may_allow_internal_callbacks(address):
    assert ipaddress.ip_address(check_callback_url(url(address), allow_private=True)) == ipaddress.ip_address(address)


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_are_accepted_and_returned_for_the_delivery_to_connect_to(address):
    assert ipaddress.ip_address(check_callback_url(url(address), allow_private=False)) == ipaddress.ip_address(address)


def test_a_name_is_refused_if_any_of_its_addresses_is_internal():
    with pytest.raises(Refused, match="localhost resolves to"):
        check_callback_url("http://localhost:8080/hook", allow_private=False)
