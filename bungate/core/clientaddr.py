"""
The address of the real client behind the gateway's own reverse proxies.

The TCP peer of a connection is the only address the gateway knows for certain. A
forwarding header (``X-Forwarded-For`` or RFC 7239 ``Forwarded``) is believed only as far
as it was written by proxies the operator trusts:

- when the peer is not a trusted proxy, the peer is the client, whatever the headers say:
  a client can never choose its own address;
- when it is, the header's hops are read from the right (the hop nearest to the gateway
  first); trusted hops are skipped and the first untrusted one is the client;
- when every hop is trusted, the left-most one is the client;
- a hop that cannot be read (not an address, an obfuscated or ``unknown`` identifier, a
  hop without ``for=``, broken syntax) stops the walk: the last good address seen, the
  nearer hop, is returned, never the unreadable text.

``Forwarded`` values are accepted quoted or not (``for=192.0.2.1``,
``for="[2001:db8::1]:4711"``); an IPv6 node must be in brackets, as RFC 7239 requires.

Ports: a port attached to a hop (``1.2.3.4:5678``, ``[2001:db8::1]:80``, or an RFC 7239
obfuscated port ``_p1``) is stripped and the address kept. A bare IPv6 address is always
read as an address with no port (``::1:80`` is the address ``::1:80``). Addresses with an
IPv6 zone (``fe80::1%eth0``) in a header are unreadable.

Returned addresses are normalized: IPv4 dotted quads, IPv6 in compressed lower-case form,
and IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) as their IPv4 form.

Pure logic: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import attrs

__all__ = ["TrustedProxies", "client_address"]

_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_PORT = re.compile(r"[0-9]{1,5}\Z")
_OBFUSCATED_PORT = re.compile(r"_[A-Za-z0-9._-]+\Z")
_OWS = " \t"


def _normalize(address: _Address) -> _Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_address(text: str) -> Optional[_Address]:
    """A bare IPv4 or IPv6 address (no port, no brackets, no zone), normalized, or None."""
    if not text or "%" in text:
        return None
    try:
        return _normalize(ipaddress.ip_address(text))
    except ValueError:
        return None


def _valid_port(text: str) -> bool:
    return _PORT.match(text) is not None and int(text) <= 65535


def _parse_hop(text: str) -> Optional[_Address]:
    """
    One ``X-Forwarded-For`` element: ``addr``, ``v4addr:port``, ``[v6addr]`` or
    ``[v6addr]:port``.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest.startswith(":") and _valid_port(rest[1:])):
            return None
        inner = _parse_address(text[1:end])
        # Brackets are for IPv6 only; "[1.2.3.4]" is not an address.
        if inner is None or ":" not in text[1:end]:
            return None
        return inner
    if text.count(":") == 1:
        host, port = text.split(":")
        if not _valid_port(port):
            return None
        parsed = _parse_address(host)
        return parsed if isinstance(parsed, ipaddress.IPv4Address) else None
    return _parse_address(text)


def _xff_hops(text: str) -> Iterator[Optional[_Address]]:
    """The elements of an ``X-Forwarded-For`` list, right-most first; empty ones skipped."""
    for element in reversed(text.split(",")):
        element = element.strip(_OWS)
        if element:
            yield _parse_hop(element)


def _split_outside_quotes(text: str, separator: str) -> Optional[List[str]]:
    """
    ``text`` split on ``separator`` where it stands outside a quoted-string; None when a
    quoted-string is not closed.
    """
    parts: List[str] = []
    start = 0
    quoted = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == separator:
            parts.append(text[start:index])
            start = index + 1
    if quoted:
        return None
    parts.append(text[start:])
    return parts


def _unquote(value: str) -> Optional[str]:
    if not value.startswith('"'):
        return value
    if len(value) < 2 or not value.endswith('"'):
        return None
    out: List[str] = []
    escaped = False
    for char in value[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


def _parse_forwarded_node(node: str) -> Optional[_Address]:
    """An RFC 7239 ``node``: ``v4addr``, ``"[v6addr]"``, either with ``:port`` or ``:_obf``."""
    if node.startswith("["):
        end = node.find("]")
        if end < 0:
            return None
        host, rest = node[1:end], node[end + 1 :]
        if ":" not in host:
            return None
    elif ":" in node:
        host, _, port = node.partition(":")
        rest = ":" + port
    else:
        host, rest = node, ""
    if rest:
        port = rest[1:]
        if not rest.startswith(":") or not (
            _valid_port(port) or _OBFUSCATED_PORT.match(port) is not None
        ):
            return None
    # A bare IPv6 address never gets here whole: RFC 7239 section 6 wants it bracketed,
    # and unbracketed its first colon reads as a port separator, which then fails.
    return _parse_address(host)


def _parse_forwarded_element(element: str) -> Optional[_Address]:
    pairs = _split_outside_quotes(element, ";")
    if pairs is None:
        return None
    node: Optional[str] = None
    for pair in pairs:
        pair = pair.strip(_OWS)
        if not pair:
            continue
        name, equals, value = pair.partition("=")
        if not equals:
            return None
        if name.strip(_OWS).lower() != "for":
            continue
        if node is not None:
            return None  # two for= in one element: ambiguous
        unquoted = _unquote(value.strip(_OWS))
        if unquoted is None:
            return None
        node = unquoted
    if node is None:
        return None  # a hop that does not say whom it forwarded for
    return _parse_forwarded_node(node)


def _forwarded_hops(text: str) -> Iterator[Optional[_Address]]:
    """The ``for=`` addresses of a ``Forwarded`` header, right-most first."""
    elements = _split_outside_quotes(text, ",")
    if elements is None:
        # An unclosed quote: nothing can be told apart, so the nearest hop is unreadable.
        yield None
        return
    for element in reversed(elements):
        if element.strip(_OWS):
            yield _parse_forwarded_element(element)


def _network(entry: str) -> Union[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    text = entry.strip()
    if not text or "%" in text:
        raise ValueError(f"not an IP address or network: {entry!r}")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ValueError(f"not an IP address or network: {entry!r} ({error})") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@attrs.frozen
class TrustedProxies:
    """
    The networks whose hosts are trusted to write forwarding headers.

    :ivar v4: the IPv4 networks.
    :ivar v6: the IPv6 networks.
    """

    v4: Tuple[ipaddress.IPv4Network, ...] = ()
    v6: Tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[str]) -> TrustedProxies:
        """
        Read a list of addresses and networks in CIDR form, IPv4 or IPv6.

        A network must have no host bits set (``10.0.0.0/8``, not ``10.0.0.1/8``): such
        an entry is more likely a typo that would trust far more hosts than meant. An
        IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) is taken as its IPv4 form.

        :param entries: e.g. ``["10.0.0.0/8", "192.0.2.7", "2001:db8::/64"]``.
        :returns: the trusted set (empty when ``entries`` is: nobody is trusted).
        :raises ValueError: when an entry is not an address or network; the message names
            the entry.
        """
        if isinstance(entries, (str, bytes)):
            raise ValueError(f"expected a list of addresses, not the string {entries!r}")
        v4: List[ipaddress.IPv4Network] = []
        v6: List[ipaddress.IPv6Network] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"not an IP address or network: {entry!r}")
            network = _network(entry)
            if isinstance(network, ipaddress.IPv4Network):
                v4.append(network)
            else:
                v6.append(network)
        return cls(v4=tuple(v4), v6=tuple(v6))

    def contains(self, address: str) -> bool:
        """
        Whether ``address`` is a trusted proxy.

        :param address: a bare IPv4 or IPv6 address; an IPv4-mapped IPv6 address counts as
            its IPv4 form.
        :returns: true when it lies in one of the networks; false for anything that is not
            an address.
        """
        parsed = _parse_address(address.strip())
        return parsed is not None and self._contains(parsed)

    def _contains(self, address: _Address) -> bool:
        if isinstance(address, ipaddress.IPv4Address):
            return any(address in network for network in self.v4)
        return any(address in network for network in self.v6)


def client_address(
    peer: str,
    headers: Sequence[bytes],
    trusted: TrustedProxies,
    *,
    header: str = "x-forwarded-for",
) -> str:
    """
    The address of the client a request came from.

    :param peer: the TCP peer's address (``IAddress.host``).
    :param headers: every value of the forwarding header, one per header line, in the
        order they were received; they are read as one comma-separated list.
    :param trusted: the proxies allowed to speak for their clients.
    :param header: ``"forwarded"`` to read RFC 7239 ``Forwarded`` syntax (``for=``
        parameters); any other name is read as an ``X-Forwarded-For`` style list.
    :returns: the normalized address of the client; ``peer`` itself (normalized when it
        is an address, unchanged when it is not, e.g. a UNIX socket) when it is not
        trusted or the header has no readable hop.
    """
    current = _parse_address(peer.strip())
    if current is None:
        return peer
    if not headers or not trusted._contains(current):
        return str(current)
    text = ",".join(value.decode("latin-1") for value in headers)
    hops = _forwarded_hops(text) if header.lower() == "forwarded" else _xff_hops(text)
    for hop in hops:
        if hop is None:
            break
        current = hop
        if not trusted._contains(hop):
            break
    return str(current)
