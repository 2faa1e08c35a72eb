"""Bounded, public-address-only HTTP(S) fetching of image URLs.

``fetch_url`` is what :func:`legrad.io.images.load_image` uses for ``http(s)://`` sources. Every request:

* resolves the host itself and connects to the checked IP address (so a second DNS answer cannot
  swap in another address after the check), refusing loopback, private, link-local, multicast,
  reserved and unspecified addresses unless ``allow_private=True``;
* follows at most ``max_redirects`` redirects, each one checked like the first URL;
* has one total deadline for everything (DNS, connect, TLS, headers, body, redirects), enforced by a
  watchdog that closes the socket, so a server dripping one byte at a time cannot hold it longer;
* reads at most ``max_bytes`` of body.

Proxy settings (``http_proxy`` ...) are not used: the address check needs a direct connection.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from .errors import ImageLoadError, ImageTooLargeError

__all__ = ["URL_DEADLINE_S", "MAX_URL_BYTES", "MAX_REDIRECTS", "URLRefusedError", "is_url", "is_public_address",
           "fetch_url"]

#: Total time allowed for one URL load, redirects included (seconds).
URL_DEADLINE_S = 20.0
#: Largest body accepted from a URL (bytes).
MAX_URL_BYTES = 32 * 1024 * 1024
#: Redirects followed before giving up.
MAX_REDIRECTS = 5

_URL_RE = re.compile(r"^https?://", flags=re.IGNORECASE)
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class URLRefusedError(ImageLoadError):
    """A URL was refused by policy (scheme, non-public address, too many redirects) before any data was read."""


def is_url(source: str) -> bool:
    """Whether ``source`` is an ``http(s)://`` URL (any case) rather than a file path.

    The one test every front end uses to tell URLs from paths.
    """
    return isinstance(source, str) and _URL_RE.match(source) is not None


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an IP address is a globally routable unicast address (safe to fetch for a visitor).

    Loopback, private (RFC 1918, ULA ``fc00::/7``), link-local, multicast, reserved, unspecified,
    carrier-grade NAT and documentation ranges are not public. IPv4-mapped (``::ffff:a.b.c.d``),
    6to4 and NAT64-style embeddings are judged by the IPv4 address they carry.

    Args:
        address: an IPv4/IPv6 address (string or ``ipaddress`` object; a ``%zone`` suffix is ignored).

    Returns:
        True only for public unicast addresses; False also for strings that are not addresses.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if ip.teredo is not None:
            return False
    bad = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
           or ip.is_unspecified or getattr(ip, "is_site_local", False))
    return ip.is_global and not bad


class _Watchdog:
    """Closes the current socket when the total deadline passes, whatever call is blocked on it."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self.fired:
            raise TimeoutError
        return left

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired and sock is not None:
                _close(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _close(self._sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _resolve(host: str, port: int, dog: _Watchdog) -> list[str]:
    """Addresses of ``host``; getaddrinfo cannot be interrupted, so it runs in a thread we stop waiting for."""
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            out["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(dog.remaining())
    if t.is_alive():
        raise TimeoutError
    if "error" in out:
        raise ImageLoadError(f"could not resolve host {host!r}")
    addrs = []
    for _family, _type, _proto, _canon, sockaddr in out["infos"]:  # type: ignore[union-attr]
        if sockaddr[0] not in addrs:
            addrs.append(sockaddr[0])
    return addrs


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to a pre-checked IP address (the Host header still names the host)."""

    def __init__(self, host: str, port: int, ip: str, dog: _Watchdog, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=dog.remaining())
        self._ip, self._dog, self._tls = ip, dog, tls
        self.pinned_sock: socket.socket | None = None  # http.client drops .sock early on HTTP/1.0 replies

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), timeout=self._dog.remaining())
        self._dog.watch(sock)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            self._dog.watch(sock)
        self.sock = self.pinned_sock = sock


def fetch_url(
    url: str,
    *,
    max_bytes: int = MAX_URL_BYTES,
    deadline_s: float = URL_DEADLINE_S,
    allow_private: bool = False,
    max_redirects: int = MAX_REDIRECTS,
    address_ok: Callable[[str], bool] | None = None,
) -> bytes:
    """Downloads the body of an ``http(s)`` URL within a total deadline and a byte cap.

    Args:
        url: an ``http://`` or ``https://`` URL.
        max_bytes: largest accepted body.
        deadline_s: total seconds for the whole fetch, redirects included.
        allow_private: also connect to loopback/private/link-local/... addresses (trusted callers only).
        max_redirects: redirects followed at most.
        address_ok: replaces :func:`is_public_address` as the address check (for tests).

    Returns:
        The response body.

    Raises:
        URLRefusedError: unsupported scheme, a non-public address, or too many redirects.
        ImageTooLargeError: the body is larger than ``max_bytes``.
        ImageLoadError: DNS, connection, TLS or HTTP failure, or the deadline passed.
    """
    check = address_ok or is_public_address
    dog = _Watchdog(time.monotonic() + float(deadline_s))
    try:
        for _hop in range(max_redirects + 1):
            status, location, body = _one_request(url, dog, check, allow_private, max_bytes)
            if status in _REDIRECTS:
                if not location:
                    raise ImageLoadError(f"HTTP {status} redirect without a Location header")
                url = urllib.parse.urljoin(url, location)
                continue
            if status != 200:
                raise ImageLoadError(f"the server answered HTTP {status}")
            return body
        raise URLRefusedError(f"more than {max_redirects} redirects")
    except TimeoutError:
        raise ImageLoadError(f"timed out (the whole download must finish within {deadline_s:g} s)") from None
    except (ImageLoadError, ImageTooLargeError):
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if dog.fired:
            raise ImageLoadError(
                f"timed out (the whole download must finish within {deadline_s:g} s)") from None
        raise ImageLoadError(f"the download failed ({type(exc).__name__})") from exc
    finally:
        dog.cancel()


def _one_request(url: str, dog: _Watchdog, check: Callable[[str], bool], allow_private: bool,
                 max_bytes: int) -> tuple[int, str | None, bytes]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLRefusedError(f"only http(s) URLs can be fetched, not {scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise URLRefusedError("the URL has no host")
    port = parts.port or (443 if scheme == "https" else 80)
    addrs = _resolve(host, port, dog)
    usable = addrs if allow_private else [a for a in addrs if check(a)]
    if not usable:
        raise URLRefusedError(
            f"refused to connect to {host!r}: it is not a public internet address (loopback, private, "
            "link-local, multicast and reserved addresses are never fetched)"
        )
    tls = ssl.create_default_context() if scheme == "https" else None
    conn = _PinnedConnection(host, port, usable[0], dog, tls)
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", path, headers={"User-Agent": "legrad", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS or resp.status != 200:
            return resp.status, resp.getheader("Location"), b""
        length = resp.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > max_bytes:
            raise ImageTooLargeError(f"the image is larger than {max_bytes / 2**20:g} MiB")
        chunks, total = [], 0
        while True:
            conn.pinned_sock.settimeout(dog.remaining())
            chunk = resp.read1(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageTooLargeError(f"the image is larger than {max_bytes / 2**20:g} MiB")
            chunks.append(chunk)
        if dog.fired:
            raise TimeoutError
        return 200, None, b"".join(chunks)
    finally:
        conn.close()
