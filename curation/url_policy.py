"""The URL policy: which URLs curation may fetch, decided in one place for every hop.

Used by the text stage (before any download, ``text_filters.host_verdicts``) and by the fetch
gateway (``fetch.py``) for the first URL and every redirect, after DNS resolution; the gateway then
connects to exactly the addresses this module checked.

Host spellings are normalised the way the OS resolver reads them before any decision: Unicode
(full-width digits, ideographic dots, circled letters) through NFKC/IDNA as ``getaddrinfo`` would,
then numeric forms through ``inet_aton`` itself (``2130706433``, ``0x7f000001``, ``0177.0.0.1``,
``127.1``, ``0`` all name an IPv4 address), so no spelling reaches a refused address as a "name".
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from sigscale.curation.config import TextConfig

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[[str], List[IPAddress]]

SCHEMES = ("http", "https")
URL_INVALID = "url_invalid"  # not an http(s) URL with a well-formed host and port
URL_PRIVATE = "url_private"
URL_UNRESOLVABLE = "url_unresolvable"
# What a DNS name may consist of once IDNA-encoded (underscores occur in real CDN names).
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


@dataclass(frozen=True)
class UrlPolicy:
    """Which addresses may be contacted: public ones, plus ``allowed`` networks, minus ``refused`` ones."""

    allow_private: bool = False  # every address not refused may be contacted (tests, the loopback demo)
    allowed: Tuple[IPNetwork, ...] = ()  # exempt from the private-address refusal
    refused: Tuple[IPNetwork, ...] = ()  # refused even when public or allowed

    @classmethod
    def from_config(cls, cfg: TextConfig) -> "UrlPolicy":
        """The policy of a curation config's ``text`` section."""
        return cls.from_networks(cfg.allow_private_networks, cfg.allowed_networks, cfg.refused_networks)

    @classmethod
    def from_networks(cls, allow_private: bool, allowed: Sequence[str] = (),
                      refused: Sequence[str] = ()) -> "UrlPolicy":
        """Policy from CIDR strings (validated by the config loader)."""
        return cls(allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in allowed),
                   tuple(ipaddress.ip_network(n, strict=False) for n in refused))


class Target(NamedTuple):
    """An http(s) URL taken apart: scheme, normalised host, port."""

    scheme: str
    host: str
    port: int


def normalize_host(host: str) -> Optional[str]:
    """Canonical form of a URL host (IP addresses as ``ipaddress`` prints them); None when it is not a host."""
    host = host.strip().rstrip(".") if host else ""
    if not host:
        return None
    if ":" in host:  # only an IPv6 literal has colons inside the brackets urlsplit removed
        try:
            return str(ipaddress.IPv6Address(host.replace("%25", "%")))
        except ValueError:
            return None
    if not host.isascii():
        try:  # what getaddrinfo would look up: NFKC, then IDNA (which also splits at U+3002 and friends)
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    host = host.lower().rstrip(".")
    if not _NAME.fullmatch(host):
        return None
    try:
        return str(ipaddress.IPv4Address(socket.inet_aton(host)))
    except OSError:
        return host


def split_url(url: object) -> Optional[Target]:
    """The http(s) target of ``url``, or None when it is not a URL the policy lets us fetch."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError:  # a malformed port or bracket
        return None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not host:
        return None
    host = normalize_host(host)
    if host is None:
        return None
    return Target(scheme, host, port or (443 if scheme == "https" else 80))


def ip_literal(host: str) -> Optional[IPAddress]:
    """The address a normalised host names literally, or None for a DNS name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d and 2002:AABB:CCDD:: (6to4) reach an IPv4 host; judge that host.
        return ip.ipv4_mapped or ip.sixtofour or ip
    return ip


def address_verdict(ip: IPAddress, policy: UrlPolicy) -> Optional[str]:
    """``url_private`` when the policy forbids contacting ``ip``, else None."""
    ip = _embedded_ipv4(ip)
    if any(ip.version == n.version and ip in n for n in policy.refused):
        return URL_PRIVATE
    if policy.allow_private or any(ip.version == n.version and ip in n for n in policy.allowed):
        return None
    # is_global also excludes shared address space (100.64.0.0/10: carrier-grade NAT, cluster fabrics).
    public = ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                                   or ip.is_multicast or ip.is_unspecified)
    return None if public else URL_PRIVATE


def resolve(host: str) -> List[IPAddress]:
    """Every address the OS resolver gives for ``host`` (empty when it gives none)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def host_verdict(host: str, policy: UrlPolicy,
                 resolver: Optional[Resolver] = resolve) -> Tuple[Optional[str], List[IPAddress]]:
    """(drop reason or None, the addresses checked) for a normalised host.

    A literal address is judged as it is. A name is resolved with ``resolver`` and refused if any
    of its addresses is; ``resolver=None`` lets names pass unresolved (no addresses returned),
    which only the text stage may do: whoever connects must connect to the checked addresses.
    """
    literal = ip_literal(host)
    if literal is not None:
        return address_verdict(literal, policy), [literal]
    if resolver is None:
        return None, []
    addresses = resolver(host)
    if not addresses:
        return URL_UNRESOLVABLE, []
    for ip in addresses:
        if address_verdict(ip, policy):
            return URL_PRIVATE, addresses
    return None, addresses
