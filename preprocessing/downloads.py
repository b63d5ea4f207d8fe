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
Politeness, on by default (a 3M-URL build must not behave like a careless crawler):
- an honest User-Agent naming the project, with the operator's contact when `build.contact` gives one;
- robots.txt fetched once per host (per worker process), cached, honoured per RFC 9309 (longest match, `*` and `$`,
  the first 500 KiB read, a 4xx means no rules, a 5xx or an unreachable host means nothing may be fetched, asked
  again after ROBOTS_RETRY_S; a 429 or 503 on robots.txt backs the host off and is asked again, as for any URL);
- `X-Robots-Tag` opt-outs (noai, noimageai, noindex, noimageindex by default) read from the headers before the body;
- per-host concurrency and request rate, and `Retry-After` / 429 / 503 backoff, waiting at most `max_retry_wait_s`
  (a longer wait is a `rate_limited` reject, never a hang): over the whole build when `Policy.gates` names its
  `host_gate` actors (a build's URL list does), else per process.
Each refusal is a `Reject` with its reason, like every other input that cannot be used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Iterable, Iterator
from urllib.parse import unquote, urljoin, urlsplit

from preprocessing.images import Reject

# Reject reasons of fetching (stable strings: reject rows and manifest counts use them).
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
DOWNLOAD_TOO_LARGE = "download_too_large"
BAD_URL = "bad_url"
BLOCKED_ADDRESS = "blocked_address"  # the host resolves to a private/loopback/link-local/... address
TOO_MANY_REDIRECTS = "too_many_redirects"
ROBOTS = "robots"  # the host's robots.txt disallows the path for this crawler
OPT_OUT = "opt_out"  # the response's X-Robots-Tag carries an opt-out directive (noai, noimageai, ...)
RATE_LIMITED = "rate_limited"  # the host kept answering 429/503, or asked for a wait longer than max_retry_wait_s

HTTP_SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_MAX_REDIRECTS = 5
PRODUCT = "dcgan-cluster"  # the product token robots.txt groups and X-Robots-Tag prefixes are matched against
USER_AGENT = f"{PRODUCT}/0.1 (DCGAN dataset build)"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parsers must read at least 500 KiB; the rest may be ignored
MAX_HOSTS = 4096  # per-host state kept per process (least recently used dropped)
ROBOTS_RETRY_S = 300.0  # an unreadable robots.txt (complete disallow meanwhile) is asked for again after this
ROBOTS_RETRIES = 2  # a robots.txt answered 429/503 is asked again after the backoff this many times
LEASE_MARGIN_S = 30.0  # a build-wide slot lapses this long after its request's deadline (a holder that died)
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
    contact: str = ""  # a URL or e-mail address for the User-Agent
    robots: bool = True  # honour robots.txt
    opt_out: tuple[str, ...] = OPT_OUT_DIRECTIVES  # X-Robots-Tag directives that skip a response ( () = none)
    host_concurrency: int = 4  # requests in flight per host
    host_rate: float = 10.0  # requests started per second per host; 0 = no limit
    max_retry_wait_s: float = 30.0  # longest Retry-After / backoff waited for
    gates: tuple[str, ...] = ()  # a build's `host_gate` actors: the limits hold over all its tasks (else per process)

    @property
    def user_agent(self) -> str:
        return USER_AGENT[:-1] + f"; +{self.contact})" if self.contact else USER_AGENT

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


# ------------------------------------------------------------------------------------------------- robots.txt


def _glob(pattern: str, path: str) -> bool:
    """Whether `pattern` ('*' = any run of characters) matches the whole of `path`; O(len x len), no regex, so a
    hostile robots.txt cannot make matching blow up."""
    p = i = 0
    star, mark = -1, 0
    while i < len(path):
        if p < len(pattern) and pattern[p] != "*" and pattern[p] == path[i]:
            p, i = p + 1, i + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, i, p + 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            i = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _rule_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("$"):
        pattern = pattern[:-1]
        return _glob(pattern, path) if "*" in pattern else path == pattern
    return _glob(pattern + "*", path) if "*" in pattern else path.startswith(pattern)


class Robots:
    """The rules of one robots.txt for one product token (RFC 9309): the groups naming the token, else the `*`
    groups; the longest matching pattern decides, `allow` on a tie; no matching rule allows."""

    def __init__(self, text: str, product: str = PRODUCT, note: str = ""):
        self.note = note  # why there are no rules / why everything is disallowed (shown in rejects)
        groups: list[tuple[list[str], list[tuple[str, bool]]]] = []
        agents: list[str] = []
        rules: list[tuple[str, bool]] = []
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            key, sep, value = line.partition(":")
            if not sep:
                continue  # not a record: ignored (RFC 9309 2.2: parsers must accept malformed lines)
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if rules:  # a user-agent line after rules starts a new group
                    groups.append((agents, rules))
                    agents, rules = [], []
                agents.append(value.lower())
            elif key in ("allow", "disallow") and agents:
                if value:  # an empty pattern matches nothing
                    rules.append((unquote(value), key == "allow"))
        if agents:
            groups.append((agents, rules))
        product = product.lower()
        mine = [r for a, rs in groups if product in a for r in rs]
        any_ = any(product in a for a, _ in groups)
        chosen = mine if any_ else [r for a, rs in groups if "*" in a for r in rs]
        # longest pattern first, allow before disallow on a tie: the first match decides
        self.rules = sorted(chosen, key=lambda r: (-len(r[0]), not r[1]))

    unreachable = False  # no robots.txt could be read: RFC 9309 says assume complete disallow
    reason, retry_s = UNREACHABLE, ROBOTS_RETRY_S  # when unreachable: its URLs' reject reason, and when to ask again

    @classmethod
    def everything(cls, allowed: bool, note: str, reason: str = UNREACHABLE, retry_s: float = ROBOTS_RETRY_S
                   ) -> "Robots":
        """No rules (allowed) or complete disallow, which is a `reason` reject and asked again after `retry_s`."""
        r = cls("", note=note)
        r.rules, r.unreachable = ([], False) if allowed else ([("", False)], True)
        if not allowed:
            r.reason, r.retry_s = reason, retry_s
        return r

    def allows(self, path: str) -> bool:
        if path == "/robots.txt":
            return True
        path = unquote(path or "/")
        for pattern, allow in self.rules:
            if _rule_matches(pattern, path):
                return allow
        return True


# ---------------------------------------------------------------------------------------------- per-host state


class _Host:
    """One origin's robots rules, request gate, rate slots and backoff, shared by a process's download threads."""

    def __init__(self, concurrency: int, origin: str):
        self.origin = origin  # scheme://host:port, the key a build's gates know it by
        self.gate = threading.BoundedSemaphore(max(1, concurrency))
        self.lock = threading.Lock()
        self.robots_lock = threading.Lock()
        self.robots: Robots | None = None
        self.robots_at = 0.0  # when it was fetched
        self.next_at = 0.0  # earliest start of the next request (rate limit)
        self.backoff_until = 0.0  # Retry-After / 429 / 503


_HOSTS: "OrderedDict[tuple, _Host]" = OrderedDict()
_HOSTS_LOCK = threading.Lock()


def _host(policy: Policy, scheme: str, host: str, port: int) -> _Host:
    key = (policy, scheme, host.lower().rstrip("."), port)
    with _HOSTS_LOCK:
        state = _HOSTS.get(key)
        if state is None:
            state = _HOSTS[key] = _Host(policy.host_concurrency, f"{scheme}://{key[2]}:{port}")
            if len(_HOSTS) > MAX_HOSTS:
                _HOSTS.popitem(last=False)
        else:
            _HOSTS.move_to_end(key)
        return state


def _wait_backoff(host: _Host, policy: Policy, where: str) -> None:
    """Sleep until the host's backoff ends; a wait longer than `max_retry_wait_s` is a RATE_LIMITED reject."""
    wait = host.backoff_until - time.monotonic()
    if wait > policy.max_retry_wait_s:
        raise Reject(RATE_LIMITED, f"{where} asked to wait {wait:.0f} s > build.max_retry_wait_s "
                                   f"{policy.max_retry_wait_s:g} s")
    if wait > 0:
        time.sleep(wait)


@contextmanager
def _slot(host: _Host, policy: Policy, patience: float, where: str, hold_s: float) -> Iterator[float]:
    """Hold one of the host's request slots, started no sooner than its rate and backoff allow; yields the seconds
    waited, which are not the request's: its deadline moves by them (a queue behind a slow host is not a timeout).
    Bounded: holders release within their own deadline, backoff within max_retry_wait_s; past `patience` it is a
    RATE_LIMITED reject. With `policy.gates` the slot, the rate and the backoff are the whole build's (`hold_s`: how
    long the request may hold it)."""
    began = time.monotonic()
    if policy.gates:
        with _build_slot(host, policy, patience, where, hold_s):
            yield time.monotonic() - began
        return
    if not host.gate.acquire(timeout=patience):
        raise Reject(RATE_LIMITED, f"no request slot for {where} within {patience:.0f} s "
                                   f"(build.host_concurrency {policy.host_concurrency})")
    try:
        _wait_backoff(host, policy, where)
        with host.lock:
            now = time.monotonic()
            start = max(now, host.next_at)
            host.next_at = start + (1.0 / policy.host_rate if policy.host_rate > 0 else 0.0)
        if start > now:
            time.sleep(start - now)
        yield time.monotonic() - began
    finally:
        host.gate.release()


@contextmanager
def _build_slot(host: _Host, policy: Policy, patience: float, where: str, hold_s: float) -> Iterator[None]:
    """`_slot` over the whole build: the host's gate (`host_gate`) leases the slot and gives the start (after the
    host's backoff, spaced by its rate); the lease lapses `hold_s` + LEASE_MARGIN_S after that start."""
    from preprocessing import host_gate

    lease, wait, backoff_left = host_gate.acquire(policy.gates, host.origin, patience, hold_s + LEASE_MARGIN_S)
    start = time.monotonic() + wait  # the gate's answer counts from when it was given (a little later here)
    if lease is None:
        raise Reject(RATE_LIMITED, f"no request slot for {where} within {patience:.0f} s "
                                   f"(build.host_concurrency {policy.host_concurrency}, over the whole build)")
    try:
        with host.lock:  # the build's backoff of the host, waited for (or refused) as a backoff seen here
            host.backoff_until = max(host.backoff_until, time.monotonic() + backoff_left)
        _wait_backoff(host, policy, where)
        if start > time.monotonic():
            time.sleep(start - time.monotonic())
        yield
    finally:
        host_gate.release(policy.gates, host.origin, lease)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def opted_out(values: list[str], directives: Iterable[str], product: str = PRODUCT) -> str | None:
    """The X-Robots-Tag value that opts out: one of `directives`, for every crawler or prefixed with `product:`
    ("otherbot: noai" is another crawler's business)."""
    wanted = {d.lower() for d in directives}
    for value in values:
        agent, sep, rest = value.partition(":")
        if sep and agent.strip().lower() != product.lower():
            continue
        if wanted & {d.strip().lower() for d in (rest if sep else value).split(",")}:
            return value
    return None


def _robots(host: _Host, policy: Policy, scheme: str, netloc: str, timeout_s: float) -> Robots:
    """The host's robots.txt, fetched once (threads of this process wait for the first fetch)."""
    with host.robots_lock:
        stale = host.robots is not None and host.robots.unreachable and \
            time.monotonic() - host.robots_at >= host.robots.retry_s
        if host.robots is None or stale:
            host.robots = _fetch_robots(f"{scheme}://{netloc}/robots.txt", policy, timeout_s)
            host.robots_at = time.monotonic()
        return host.robots


def _fetch_robots(url: str, policy: Policy, timeout_s: float) -> Robots:
    """RFC 9309 2.3.1: 2xx = its rules; 4xx or too many redirects = no rules; 5xx, 429 or no answer = nothing may be
    fetched (a crawler must assume complete disallow). A 429 or 503 backs the host off as for any URL (Retry-After,
    else 1, 2 s) and is asked again, ROBOTS_RETRIES times; still refused, its URLs are `rate_limited` and the next
    one asks again once the backoff allows (not after ROBOTS_RETRY_S)."""
    try:
        body = download(url, timeout_s, ROBOTS_RETRIES, ROBOTS_MAX_BYTES, policy, robots_fetch=True)
    except HTTPStatus as err:
        if 400 <= err.code < 500 and err.code != 429:
            return Robots.everything(True, f"robots.txt HTTP {err.code}")
        return Robots.everything(False, f"{url}: HTTP {err.code}")
    except Reject as r:
        if r.reason == TOO_MANY_REDIRECTS:
            return Robots.everything(True, "robots.txt redirects too often")
        if r.reason == RATE_LIMITED:
            return Robots.everything(False, f"{url}: {r.detail}", RATE_LIMITED, retry_s=0.0)
        return Robots.everything(False, f"{url}: {r.reason} ({r.detail})")
    except (TimeoutError, socket.timeout):
        return Robots.everything(False, f"{url}: no answer within {timeout_s:g} s")
    except (ConnectionError, OSError) as err:
        return Robots.everything(False, f"{url}: {type(err).__name__}: {err}"[:200])
    if len(body) >= ROBOTS_MAX_BYTES:  # read up to the cap: the last line may be cut, so it is dropped
        body = body[: body.rfind(b"\n") + 1]
    return Robots(body.decode("utf-8", "replace"), note=f"{url}")


def _check_robots(policy: Policy, scheme: str, parts, host: _Host, path: str, timeout_s: float) -> None:
    if not policy.robots or path == "/robots.txt":
        return
    rules = _robots(host, policy, scheme, parts.netloc, timeout_s)
    if not rules.allows(path):
        if rules.unreachable:
            raise Reject(rules.reason, f"robots.txt not readable, so nothing is fetched (RFC 9309): {rules.note}"[:300])
        raise Reject(ROBOTS, f"{parts.netloc}/robots.txt disallows {path[:150]} for {PRODUCT}")


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
    """An HTTP error status (whether it is worth a retry depends on the code); for 429/503 the host that answered
    and the wait its Retry-After asks for (None without one)."""

    def __init__(self, code: int, reason: str, host: "_Host | None" = None, retry_after: float | None = None):
        super().__init__(f"HTTP {code} {reason}")
        self.code, self.host, self.retry_after = code, host, retry_after


def _one_request(url: str, policy: Policy, deadline: float, max_bytes: int, timeout_s: float,
                 robots_fetch: bool = False) -> bytes | str:
    """GET one URL (no redirects followed): its body, or the Location of a redirect; raises Reject.

    `robots_fetch`: the host's robots.txt itself: no robots or opt-out check, and a body longer than `max_bytes` is
    cut there instead of refused."""
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
    host = _host(policy, scheme, parts.hostname, port)
    if not robots_fetch:
        _check_robots(policy, scheme, parts, host, path, timeout_s)
    last: Exception | None = None
    with _slot(host, policy, 4 * timeout_s + policy.max_retry_wait_s, parts.netloc, timeout_s) as waited:
        deadline += waited
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
                    conn.request("GET", path, headers={"User-Agent": policy.user_agent,
                                                       "Accept-Encoding": "identity"})
                    resp = conn.getresponse()
                    if resp.status in REDIRECTS:
                        location = resp.getheader("Location")
                        if not location:
                            raise Reject(HTTP_ERROR, f"HTTP {resp.status} without a Location")
                        return urljoin(url, location.strip())
                    if resp.status >= 400:
                        wait = _retry_after(resp.getheader("Retry-After")) if resp.status in (429, 503) else None
                        raise HTTPStatus(resp.status, resp.reason, host, wait)
                    if policy.opt_out and not robots_fetch:  # from the headers: the body is never read
                        tag = opted_out(resp.msg.get_all("X-Robots-Tag") or [], policy.opt_out)
                        if tag:
                            raise Reject(OPT_OUT, f"X-Robots-Tag: {tag}"[:200])
                    length = resp.getheader("Content-Length")
                    if length and length.isdigit() and int(length) > max_bytes and not robots_fetch:
                        raise Reject(DOWNLOAD_TOO_LARGE, f"Content-Length {int(length):,} > {max_bytes:,} bytes")
                    buf = bytearray()
                    while True:
                        block = resp.read1(1 << 16)  # returns what has arrived: the deadline is checked every read
                        if not block:
                            break
                        buf += block
                        if len(buf) > max_bytes:
                            if robots_fetch:
                                return bytes(buf[:max_bytes])
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


def _get(url: str, policy: Policy, timeout_s: float, max_bytes: int, robots_fetch: bool = False) -> bytes:
    """One attempt: the URL and its redirects, all within `timeout_s` in total (a robots.txt on the way has its own
    `timeout_s`). A host backing off (Retry-After) is waited for first, outside the attempt's time."""
    parts = urlsplit(url)
    try:
        scheme = parts.scheme.lower()
        if scheme in HTTP_SCHEMES and parts.hostname:
            _wait_backoff(_host(policy, scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)),
                          policy, parts.netloc)
    except ValueError:  # a bad port: _one_request rejects it
        pass
    deadline = time.monotonic() + timeout_s
    for _ in range(policy.max_redirects + 1):
        got = _one_request(url, policy, deadline, max_bytes, timeout_s, robots_fetch)
        if isinstance(got, bytes):
            return got
        target = urlsplit(got)
        if target.scheme.lower() not in HTTP_SCHEMES:
            raise Reject(BAD_URL, f"redirect to {got[:200]} refused: only http(s):// is fetched")
        url = got
    raise Reject(TOO_MANY_REDIRECTS, f"more than {policy.max_redirects} redirects")


def download(url: str, timeout_s: float, retries: int, max_bytes: int, policy: Policy = Policy(),
             robots_fetch: bool = False) -> bytes:
    """GET a URL whole under `policy`; raises Reject. `timeout_s` bounds each attempt in total (redirects and a
    trickling body included); transient failures (timeouts, resets, 408/425/5xx) are retried with backoff; a 429 or
    503 backs the whole host off for its Retry-After (or 1, 2, 4 ... s), at most `policy.max_retry_wait_s`.
    `robots_fetch`: the host's robots.txt: only 429/503 are retried; any other failure is raised as it is (its
    status decides the rules)."""
    last: Reject | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
        try:
            return _get(url, policy, timeout_s, max_bytes, robots_fetch)
        except HTTPStatus as err:
            if robots_fetch and err.code not in (429, 503):
                raise
            last = Reject(HTTP_ERROR, str(err))
            if err.code in (429, 503) and err.host is not None:
                wait = err.retry_after if err.retry_after is not None else min(2.0 ** attempt, 60.0)
                with err.host.lock:
                    err.host.backoff_until = max(err.host.backoff_until, time.monotonic() + wait)
                if policy.gates:  # every task of the build backs off, not only this process
                    from preprocessing import host_gate

                    host_gate.backoff(policy.gates, err.host.origin, wait)
                said = f"Retry-After {wait:.0f} s" if err.retry_after is not None else "no Retry-After"
                if wait > policy.max_retry_wait_s:
                    raise Reject(RATE_LIMITED, f"{err}, {said} > build.max_retry_wait_s "
                                               f"{policy.max_retry_wait_s:g} s") from None
                last = Reject(RATE_LIMITED, f"{err} ({said}) on each of {attempt + 1} attempts")
            elif err.code not in (408, 425) and err.code < 500:
                raise last from None  # the server answered: retrying will not change a 404
        except (TimeoutError, socket.timeout):
            if robots_fetch:
                raise
            last = Reject(TIMEOUT, f"no complete response within {timeout_s:g} s "
                                   f"({attempt + 1} attempt{'s' if attempt else ''})")
        except (ConnectionError, OSError) as err:  # resets, refused connections
            if robots_fetch:
                raise
            last = Reject(UNREACHABLE, f"{type(err).__name__}: {err}"[:200])
    assert last is not None
    raise last
