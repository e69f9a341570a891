"""Where image downloads may connect: the resolved IP address is checked, and it is the one connected to.

A host name on the allow-list can still resolve to an internal address (a cloud metadata service at
169.254.169.254 or fd00:ec2::254, a database on 10.0.0.5, the backend's own Redis on 127.0.0.1), and a name whose
DNS answer changes between the check and the connection (DNS rebinding) would slip past a check
made before `requests` resolves it again. So the check runs inside urllib3's connection set-up,
on the addresses the socket is then opened to; TLS still verifies the certificate against the host
name. Label Studio's own host (LABEL_STUDIO_URL) is trusted whatever it resolves to, since users run
it on the same machine or network.

How long a download may take in all is bounded here too (`CutOff`): read timeouts bound each wait only,
and a server that sends a byte every half second never trips them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from backend.errors import BlockedAddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# Cloud metadata services (instance credentials, user data) and the host agents beside them. The IPv4 ones in
# 169.254.0.0/16 are link-local too; the others look private or even public, so `ALLOW_PRIVATE_IMAGE_HOSTS`, which a
# team on a private network needs, would otherwise let a task's URL reach them.
CLOUD_METADATA: dict[str, tuple[Address, ...]] = {
    "AWS, GCP, Azure, Oracle, DigitalOcean, Hetzner, OpenStack instance metadata": (
        ipaddress.ip_address("169.254.169.254"),
    ),
    "AWS instance metadata over IPv6 (Nitro)": (ipaddress.ip_address("fd00:ec2::254"),),
    "AWS ECS task metadata and credentials": (ipaddress.ip_address("169.254.170.2"),),
    "AWS EKS Pod Identity agent": (ipaddress.ip_address("169.254.170.23"), ipaddress.ip_address("fd00:ec2::23")),
    "GCP metadata server for IPv6-only VMs": (ipaddress.ip_address("fd20:ce::254"),),
    "Azure host agent (WireServer), a public address": (ipaddress.ip_address("168.63.129.16"),),
    "Alibaba Cloud instance metadata": (ipaddress.ip_address("100.100.100.200"),),
    "Oracle Cloud legacy instance metadata": (ipaddress.ip_address("192.0.0.192"),),
    "Tencent Cloud instance metadata": (ipaddress.ip_address("169.254.0.23"),),
    "OpenStack metadata over IPv6": (ipaddress.ip_address("fe80::a9fe:a9fe"),),
}
_METADATA_ADDRESSES = frozenset(address for addresses in CLOUD_METADATA.values() for address in addresses)
# NAT64's well-known prefix (RFC 6052): on an IPv6-only network with DNS64, 64:ff9b::a9fe:a9fe is 169.254.169.254.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: Address) -> Address:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64), else the address itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _category(address: Address) -> str | None:
    """Why an address is not a public one, or None if it is."""
    address = _embedded_ipv4(address)
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:  # RFC 1918, unique-local IPv6, carrier-grade NAT, documentation ranges
        return "private"
    return None


# With ALLOW_PRIVATE_IMAGE_HOSTS these may be reached; cloud metadata, link-local, multicast, unspecified and
# reserved addresses never are, except through LABEL_STUDIO_URL.
PRIVATE_CATEGORIES = frozenset({"loopback", "private"})


@dataclass(frozen=True)
class AddressPolicy:
    trusted: frozenset[tuple[str, int]]  # (host, port) that may resolve to anything: Label Studio
    allow_private: bool = False

    def refusal(self, address: Address) -> str | None:
        category = _category(address)
        if category is None or (self.allow_private and category in PRIVATE_CATEGORIES):
            return None
        return category

    def addresses(self, host: str, port: int) -> list[tuple]:
        """getaddrinfo() answers for host:port that may be connected to; BlockedAddress if none."""
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if (host.lower(), port) in self.trusted:
            return answers
        allowed, refused, reasons = [], [], set()
        for answer in answers:
            host_text = str(answer[4][0])  # str for every IPv4 and IPv6 answer, the only families a host name gets
            address = ipaddress.ip_address(host_text.split("%", 1)[0])  # drop an IPv6 zone
            reason = self.refusal(address)
            if reason:
                refused.append(f"{address} ({reason})")
                reasons.add(reason)
            else:
                allowed.append(answer)
        if not allowed:
            hint = ""
            if not self.allow_private and any(reason in PRIVATE_CATEGORIES for reason in reasons):
                hint = " (set ALLOW_PRIVATE_IMAGE_HOSTS=true to allow private and loopback addresses)"
            raise BlockedAddress(
                f"image host {host!r} resolves to {', '.join(refused)}, which image downloads may not reach{hint}"
            )
        return allowed


class CutOff:
    """A time limit on all that one download does in this thread (connecting, waiting for the headers, reading
    the body, following redirects): when it runs out, the sockets the download uses are shut down, which ends
    whatever read is blocked in them, and `expired` is set, so the caller can tell a cut from a server's close."""

    def __init__(self, seconds: float) -> None:
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._mutex = threading.Lock()
        self._over = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._token: Token[CutOff | None] | None = None

    def __enter__(self) -> CutOff:
        self._token = _active_cut_off.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._mutex:  # a cut running now finishes first; none comes after (the sockets may go back to a pool)
            self._over = True
            self._sockets.clear()
        if self._token is not None:  # set by __enter__
            _active_cut_off.reset(self._token)

    def watch(self, sock: socket.socket) -> None:
        with self._mutex:
            if not self._over:
                self._sockets.append(sock)
                if self.expired.is_set():
                    _shut(sock)

    def _cut(self) -> None:
        with self._mutex:
            if self._over:
                return
            self.expired.set()
            for sock in self._sockets:
                _shut(sock)


_active_cut_off: ContextVar[CutOff | None] = ContextVar("download_cut_off", default=None)


def _shut(sock: socket.socket) -> None:
    # A socket already closed, or handed over to TLS (which detaches the plain one), has nothing left to cut.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(sock: socket.socket | None) -> None:
    cut_off = _active_cut_off.get()
    if cut_off is not None and sock is not None:
        cut_off.watch(sock)


# Seen by the type checker as what it is mixed into (`GuardedAdapter`), so that its use of urllib3's attributes is
# checked; at run time it is a plain mixin, which `type()` puts before urllib3's HTTP(S)Connection.
if TYPE_CHECKING:
    _Connection = HTTPConnection
else:
    _Connection = object


class _PinnedConnection(_Connection):
    """Mixed into urllib3's connections: resolve, check, and connect to the checked address only; and let the
    download's `CutOff` reach every socket it uses."""

    policy: AddressPolicy

    def request(self, *args, **kwargs) -> None:
        _watched(self.sock)  # a pooled connection, or a TLS one (connected before the request, over a new socket)
        super().request(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        try:
            answers = self.policy.addresses(self._dns_host, self.port)
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        last_error: OSError | None = None
        for family, kind, protocol, _, address in answers:
            sock = socket.socket(family, kind, protocol)
            _watched(sock)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(address)
                return sock
            except TimeoutError as error:
                sock.close()
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from error
            except OSError as error:
                sock.close()
                last_error = error
        raise NewConnectionError(self, f"Failed to establish a new connection: {last_error}")


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections obey `policy`; mount it for http:// and https://."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        attributes = {"policy": self.policy}
        http = type("GuardedHTTPConnection", (_PinnedConnection, HTTPConnection), attributes)
        https = type("GuardedHTTPSConnection", (_PinnedConnection, HTTPSConnection), attributes)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }
