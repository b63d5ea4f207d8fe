"""Downloading the http(s) URLs of a URL list under a network policy (layer: preprocessing).

A URL list may come from anybody (a shared Prefect deployment takes one from its user), so a download must not
become a way into the network the build runs in (SSRF: cloud metadata at 169.254.169.254, services on loopback or
the private network). The policy, checked on the first request and again on every redirect hop:
- only http:// and https:// (a redirect to ftp:// or file:// is refused);
- the host is resolved here and every address it resolves to is checked BEFORE connecting: private, loopback,
  link-local, multicast, reserved and unspecified addresses are refused, unless `allow` (the config's
  `build.allow_private_hosts`: host names or CIDR ranges, for an internal mirror or a local test server) admits the
  host name or the address; the connection then goes to the checked address, so a second lookup cannot swap it;
- at most `max_redirects` redirects;
- a total deadline per attempt, enforced while bytes trickle in (a watchdog closes the socket at the deadline), and a
  size cap.
Each refusal is a `Reject` with its reason, like every other input that cannot be used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urljoin, urlsplit

from preprocessing.images import Reject

# Reject reasons of fetching (stable strings: reject rows and manifest counts use them).
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
DOWNLOAD_TOO_LARGE = "download_too_large"
BAD_URL = "bad_url"
BLOCKED_ADDRESS = "blocked_address"  # the host resolves to a private/loopback/link-local/... address
TOO_MANY_REDIRECTS = "too_many_redirects"

HTTP_SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_MAX_REDIRECTS = 5
USER_AGENT = "dcgan-cluster/0.1 (dataset build)"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------------------------------------- the policy


def parse_allow(entries: Iterable[str]) -> tuple[frozenset[str], tuple[ipaddress._BaseNetwork, ...]]:
    """`allow_private_hosts` entries as (host names, networks); an entry that is an address or CIDR is a network."""
    names, nets = set(), []
    for entry in entries:
        e = str(entry).strip().lower().strip("[]")
        try:
            nets.append(ipaddress.ip_network(e, strict=False))
        except ValueError:
            names.add(e.rstrip("."))
    return frozenset(names), tuple(nets)


def blocked_kind(ip: Address) -> str | None:
    """Why an address is not one a URL list may reach ('loopback', 'private', ...), or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges and the like
        return "non-global"
    return None


@dataclass(frozen=True)
class Policy:
    """Where downloads may connect: public addresses, plus what `allow` names (host names or CIDR ranges)."""

    allow: tuple[str, ...] = ()
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    def addresses(self, host: str, port: int) -> list[Address]:
        """The addresses of `host` that may be connected to, resolved once; raises Reject (BLOCKED_ADDRESS) if any
        address it resolves to is refused, before anything is connected."""
        names, nets = parse_allow(self.allow)
        host = host.lower().rstrip(".")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise Reject(UNREACHABLE, f"cannot resolve {host}: {err.strerror}") from None
        found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if host in names:
            return found
        for ip in found:
            kind = blocked_kind(ip)
            if kind and not any(ip in net for net in nets if net.version == ip.version):
                shown = host if host == str(ip) else f"{host} ({ip})"
                raise Reject(BLOCKED_ADDRESS, f"{shown} is a {kind} address: not fetched (allow internal hosts "
                                              "with build.allow_private_hosts)")
        return found


# ------------------------------------------------------------------------------------------------ connections


class _Pinned:
    """http.client connections that connect to an address checked by the policy, not to a second lookup of the
    host name (which could answer differently); TLS still verifies the certificate against the host name."""

    @staticmethod
    def connection(scheme: str, host: str, port: int, ip: Address, timeout: float) -> http.client.HTTPConnection:
        base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection

        class Conn(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                self.sock = socket.create_connection((str(ip), port), self.timeout)
                if scheme == "https":
                    self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)

        return Conn(host, port, timeout=timeout)


class _Watchdog:
    """Shuts a connection's socket at the deadline, however slowly bytes arrive (a socket timeout alone restarts
    with every byte)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.fired = conn, False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class HTTPStatus(Exception):
    """An HTTP error status (whether it is worth a retry depends on the code)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"HTTP {code} {reason}")
        self.code = code


def _one_request(url: str, policy: Policy, deadline: float, max_bytes: int) -> bytes | str:
    """GET one URL (no redirects followed): its body, or the Location of a redirect; raises Reject."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in HTTP_SCHEMES or not parts.hostname:
        raise Reject(BAD_URL, f"{url[:200]}: only http(s):// URLs with a host are fetched")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise Reject(BAD_URL, f"{url[:200]}: bad port") from None
    ips = policy.addresses(parts.hostname, port)  # refused here: nothing has been connected
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last: Exception | None = None
    for ip in ips:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn = _Pinned.connection(scheme, parts.hostname, port, ip, timeout=left)
        with _Watchdog(conn, left) as dog:
            try:
                try:
                    conn.connect()
                except OSError as err:  # try the host's next address
                    last = err
                    continue
                conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
                resp = conn.getresponse()
                if resp.status in REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise Reject(HTTP_ERROR, f"HTTP {resp.status} without a Location")
                    return urljoin(url, location.strip())
                if resp.status >= 400:
                    raise HTTPStatus(resp.status, resp.reason)
                length = resp.getheader("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise Reject(DOWNLOAD_TOO_LARGE, f"Content-Length {int(length):,} > {max_bytes:,} bytes")
                buf = bytearray()
                while True:
                    block = resp.read1(1 << 16)  # returns what has arrived: the deadline is checked every read
                    if not block:
                        break
                    buf += block
                    if len(buf) > max_bytes:
                        raise Reject(DOWNLOAD_TOO_LARGE, f"more than {max_bytes:,} bytes")
                    if time.monotonic() > deadline:
                        raise TimeoutError
                if dog.fired or time.monotonic() > deadline:
                    raise TimeoutError
                return bytes(buf)
            except (OSError, http.client.HTTPException) as err:
                if dog.fired or time.monotonic() > deadline or isinstance(err, (TimeoutError, socket.timeout)):
                    raise TimeoutError from None
                if isinstance(err, http.client.HTTPException):
                    raise ConnectionError(f"{type(err).__name__}: {err}") from None
                raise
            finally:
                conn.close()
    raise last if last else ConnectionError(f"no address of {parts.hostname} answered")


def _get(url: str, policy: Policy, timeout_s: float, max_bytes: int) -> bytes:
    """One attempt: the URL and its redirects, all within `timeout_s` in total."""
    deadline = time.monotonic() + timeout_s
    for _ in range(policy.max_redirects + 1):
        got = _one_request(url, policy, deadline, max_bytes)
        if isinstance(got, bytes):
            return got
        target = urlsplit(got)
        if target.scheme.lower() not in HTTP_SCHEMES:
            raise Reject(BAD_URL, f"redirect to {got[:200]} refused: only http(s):// is fetched")
        url = got
    raise Reject(TOO_MANY_REDIRECTS, f"more than {policy.max_redirects} redirects")


def download(url: str, timeout_s: float, retries: int, max_bytes: int, policy: Policy = Policy()) -> bytes:
    """GET a URL whole under `policy`; raises Reject. `timeout_s` bounds each attempt in total (redirects and a
    trickling body included); transient failures (timeouts, resets, 408/425/429/5xx) are retried with backoff."""
    last: Reject | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
        try:
            return _get(url, policy, timeout_s, max_bytes)
        except HTTPStatus as err:
            last = Reject(HTTP_ERROR, str(err))
            if err.code not in (408, 425, 429) and err.code < 500:
                raise last from None  # the server answered: retrying will not change a 404
        except (TimeoutError, socket.timeout):
            last = Reject(TIMEOUT, f"no complete response within {timeout_s:g} s "
                                   f"({attempt + 1} attempt{'s' if attempt else ''})")
        except (ConnectionError, OSError) as err:  # resets, refused connections
            last = Reject(UNREACHABLE, f"{type(err).__name__}: {err}"[:200])
    assert last is not None
    raise last
