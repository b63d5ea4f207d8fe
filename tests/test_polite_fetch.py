"""Polite fetching (issue 23, item 1) against real HTTP servers on 127.0.0.1, downloads on real threads.

robots.txt (once per host, RFC 9309 matching, huge and malformed files, 5xx), X-Robots-Tag opt-outs decided from the
headers before the body, Retry-After / 429 / 503 backoff bounded by max_retry_wait_s, per-host concurrency and rate,
and the User-Agent with its contact.
"""

from __future__ import annotations

import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from realdata import grace_hopper_path

from preprocessing.downloads import (OPT_OUT, RATE_LIMITED, ROBOTS, UNREACHABLE, Policy, Robots, download,
                                     opted_out)
from preprocessing.images import Reject
from local_http import LocalHTTPServer

JPEG = grace_hopper_path().read_bytes()


class Site:
    """A 127.0.0.1 server. `routes` maps a path to a function (handler) -> None that answers; every request is
    logged as (path, monotonic time, User-Agent); `in_flight`/`peak` count concurrent requests."""

    def __init__(self, delay: float = 0.0):
        site = self
        self.routes, self.log, self.delay = {}, [], delay
        self.lock, self.in_flight, self.peak = threading.Lock(), 0, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with site.lock:
                    site.log.append((self.path, time.monotonic(), self.headers.get("User-Agent")))
                    site.in_flight += 1
                    site.peak = max(site.peak, site.in_flight)
                try:  # counted while it waits (the request's time): not while the answer goes out, so a client
                    if site.delay and self.path != "/robots.txt":  # that already read it and sent the next one
                        time.sleep(site.delay)                     # is not counted twice
                finally:
                    with site.lock:
                        site.in_flight -= 1
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

        self.server = LocalHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # a client that stops reading (the point of some tests)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.log]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def body(data: bytes, status: int = 200, headers: dict | None = None):
    def answer(h):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return answer


def trickle(data: bytes, headers: dict):
    """Headers at once, then the body at 10 bytes/s: reading it would take minutes."""
    def answer(h):
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        try:
            for i in range(0, len(data), 10):
                h.wfile.write(data[i:i + 10])
                h.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass
    return answer


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def polite(**kw) -> Policy:
    return Policy(("127.0.0.1",), **kw)


def get(url: str, policy: Policy, retries: int = 0, timeout_s: float = 5.0) -> bytes:
    return download(url, timeout_s=timeout_s, retries=retries, max_bytes=10**7, policy=policy)


def reason(url: str, policy: Policy, **kw) -> str:
    with pytest.raises(Reject) as got:
        get(url, policy, **kw)
    return got.value.reason


# ----------------------------------------------------------------------------------------------------- robots.txt

ROBOTS_TXT = b"""# the product's own group wins over *
User-agent: *
Disallow: /

User-agent: other-bot
Disallow: /photos/

user-agent: DCGAN-Cluster
Disallow: /private/
Allow: /private/ok
Disallow: /*.png$
"""


def test_robots_txt_is_fetched_once_per_host_and_honoured(site):
    for p in ("/photos/a.jpg", "/private/x.jpg", "/private/ok.jpg", "/pic.png", "/pic.png?v=1"):
        site.routes[p] = body(JPEG)
    site.routes["/robots.txt"] = body(ROBOTS_TXT)
    policy = polite()
    with ThreadPoolExecutor(8) as pool:  # eight threads ask at once: one robots.txt request
        assert all(d == JPEG for d in pool.map(lambda _: get(site.url("/photos/a.jpg"), policy), range(8)))
    assert get(site.url("/private/ok.jpg"), policy) == JPEG  # longer Allow beats the shorter Disallow
    assert get(site.url("/pic.png?v=1"), policy) == JPEG  # '$' anchors: the query makes it no match
    assert reason(site.url("/private/x.jpg"), policy) == ROBOTS
    assert reason(site.url("/pic.png"), policy) == ROBOTS
    assert site.paths().count("/robots.txt") == 1
    assert "/private/x.jpg" not in site.paths() and "/pic.png" not in site.paths()  # refused before any request
    # robots_txt off: the same URL is fetched
    assert get(site.url("/private/x.jpg"), polite(robots=False)) == JPEG


def test_robots_txt_huge_or_malformed_is_read_bounded_and_parsed_as_far_as_it_goes(site):
    """The first 500 KiB count (RFC 9309 2.5); rules past them, garbage lines and rules before any user-agent do
    not; a 40 MB robots.txt is not read whole."""
    head = b"\xff\xfe\x00garbage\nDisallow: /orphan\nUser-agent: *\nDisallow /no-colon\nDisallow: /early\n"
    huge = head + b"# " + b"x" * 600_000 + b"\nDisallow: /late\n" + b"#" * 40_000_000
    site.routes["/robots.txt"] = body(huge)
    for p in ("/early/1.jpg", "/late/1.jpg", "/orphan/1.jpg", "/no-colon/1.jpg"):
        site.routes[p] = body(JPEG)
    started = time.monotonic()
    assert reason(site.url("/early/1.jpg"), polite()) == ROBOTS
    assert time.monotonic() - started < 3  # 40 MB were not read
    for p in ("/late/1.jpg", "/orphan/1.jpg", "/no-colon/1.jpg"):
        assert get(site.url(p), polite()) == JPEG, p


@pytest.mark.parametrize("status, fetched", [(404, True), (403, True), (500, False), (502, False)])
def test_robots_txt_status(site, status, fetched):
    """RFC 9309 2.3.1: 4xx = no rules; 5xx = assume complete disallow (an `unreachable` reject, counted as bad);
    429 and 503 are backed off and asked again (next tests)."""
    site.routes["/robots.txt"] = body(b"oops", status)
    site.routes["/a.jpg"] = body(JPEG)
    if fetched:
        assert get(site.url("/a.jpg"), polite()) == JPEG
    else:
        with pytest.raises(Reject) as got:
            get(site.url("/a.jpg"), polite())
        assert got.value.reason == UNREACHABLE and "RFC 9309" in got.value.detail
        assert "/a.jpg" not in site.paths()


def test_robots_txt_429_backs_the_host_off_for_its_retry_after_then_is_read(site):
    answers = iter([body(b"slow down", 429, {"Retry-After": "1"}), body(b"User-agent: *\nDisallow: /private/\n")])
    site.routes["/robots.txt"] = lambda h: next(answers)(h)
    site.routes["/a.jpg"] = body(JPEG)
    site.routes["/private/x.jpg"] = body(JPEG)
    policy = polite()
    assert get(site.url("/a.jpg"), policy) == JPEG  # not `unreachable`: the host said when to come back
    assert reason(site.url("/private/x.jpg"), policy) == ROBOTS  # the rules read after the wait
    times = {p: [t for q, t, _ in site.log if q == p] for p in ("/robots.txt", "/a.jpg")}
    assert len(times["/robots.txt"]) == 2 and times["/robots.txt"][1] - times["/robots.txt"][0] >= 0.95
    assert times["/a.jpg"][0] > times["/robots.txt"][1] and "/private/x.jpg" not in site.paths()


def test_robots_txt_that_stays_503_rate_limits_its_urls_and_is_asked_again_after_the_backoff(site):
    """Three 503s (Retry-After 1): the URL is `rate_limited` (not `unreachable` for ROBOTS_RETRY_S); the next URL of
    the host waits out the backoff, reads the robots.txt that now answers, and is fetched."""
    answers = iter([body(b"", 503, {"Retry-After": "1"})] * 3 + [body(b"")])
    site.routes["/robots.txt"] = lambda h: next(answers)(h)
    site.routes["/a.jpg"] = body(JPEG)
    policy = polite()
    with pytest.raises(Reject) as got:
        get(site.url("/a.jpg"), policy)
    assert got.value.reason == RATE_LIMITED and "robots.txt" in got.value.detail
    assert site.paths() == ["/robots.txt"] * 3  # the URL itself was not asked for
    assert get(site.url("/a.jpg"), policy) == JPEG
    times = [t for p, t, _ in site.log if p == "/robots.txt"]
    assert len(times) == 4 and all(b - a >= 0.95 for a, b in zip(times, times[1:]))  # each Retry-After honoured


def test_robots_rules_directly():
    r = Robots("User-agent: *\nDisallow: /a\nAllow: /a/b\nDisallow: /a/b/c*d$\nDisallow: /%7Euser\n")
    assert not r.allows("/a/x") and r.allows("/a/b/x") and not r.allows("/a/b/c-and-d") and r.allows("/a/b/c-d-e")
    assert not r.allows("/~user/pic.jpg") and r.allows("/robots.txt") and r.allows("/")
    assert Robots("User-agent: x\nDisallow: /\n").allows("/anything")  # no group for us, no * group: allowed
    # a hostile pattern is matched in bounded time (no regex backtracking)
    evil = Robots("User-agent: *\nDisallow: /" + "*a" * 200 + "b\n")
    started = time.monotonic()
    assert evil.allows("/" + "a" * 2000)
    assert time.monotonic() - started < 2


# --------------------------------------------------------------------------------------------------- X-Robots-Tag


@pytest.mark.parametrize("tag, skipped", [
    ("noai", True), ("noimageai", True), ("noindex, nofollow", True), ("NoImageIndex", True),
    ("dcgan-cluster: noai", True), ("otherbot: noai", False), ("nofollow", False),
])
def test_x_robots_tag_opt_out_is_read_from_the_headers_before_the_body(site, tag, skipped):
    site.routes["/a.jpg"] = trickle(JPEG, {"X-Robots-Tag": tag})
    site.routes["/robots.txt"] = body(b"")
    started = time.monotonic()
    if skipped:
        with pytest.raises(Reject) as got:
            get(site.url("/a.jpg"), polite(), timeout_s=20)
        assert got.value.reason == OPT_OUT and tag in got.value.detail
        assert time.monotonic() - started < 2  # the 10 B/s body was never read
    else:
        assert reason(site.url("/a.jpg"), polite(), timeout_s=1.5) == "timeout"  # it did start reading


def test_x_robots_tag_opt_outs_are_configurable():
    assert opted_out(["noai"], ()) is None
    assert opted_out(["a, noindex"], ("noindex",)) == "a, noindex"
    assert opted_out(["noindex"], ("noai",)) is None


# ------------------------------------------------------------------------------------------ Retry-After and limits


def test_retry_after_is_waited_for_then_the_host_answers(site):
    answers = iter([body(b"slow down", 429, {"Retry-After": "1"}), body(JPEG)])
    site.routes["/a.jpg"] = lambda h: next(answers)(h)
    site.routes["/robots.txt"] = body(b"")
    assert get(site.url("/a.jpg"), polite(), retries=2) == JPEG
    times = [t for p, t, _ in site.log if p == "/a.jpg"]
    assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_a_long_retry_after_or_a_host_that_keeps_refusing_is_rate_limited(site):
    site.routes["/long.jpg"] = body(b"", 429, {"Retry-After": "3600"})
    site.routes["/busy.jpg"] = body(b"", 503)
    site.routes["/robots.txt"] = body(b"")
    started = time.monotonic()
    with pytest.raises(Reject) as got:
        get(site.url("/long.jpg"), polite(max_retry_wait_s=5), retries=3)
    assert got.value.reason == RATE_LIMITED and "Retry-After 3600 s > build.max_retry_wait_s 5" in got.value.detail
    assert time.monotonic() - started < 2  # refused at once, not after an hour
    # the host is backing off for an hour: its other URLs are refused without a request
    assert reason(site.url("/busy.jpg"), polite(max_retry_wait_s=5)) == RATE_LIMITED
    assert site.paths().count("/long.jpg") == 1 and "/busy.jpg" not in site.paths()


def test_503_without_retry_after_backs_off_exponentially_then_rejects():
    s = Site()
    try:
        s.routes["/busy.jpg"] = body(b"", 503)
        s.routes["/robots.txt"] = body(b"")
        started = time.monotonic()
        assert reason(s.url("/busy.jpg"), polite(), retries=2) == RATE_LIMITED
        assert 3 <= time.monotonic() - started < 8  # waited 1 + 2 s between the three attempts
        assert s.paths().count("/busy.jpg") == 3
    finally:
        s.close()


def test_per_host_concurrency_and_rate():
    slow, other = Site(delay=0.3), Site(delay=0.3)
    try:
        for s in (slow, other):
            s.routes["/robots.txt"] = body(b"")
            for i in range(8):
                s.routes[f"/{i}.jpg"] = body(JPEG)
        policy = polite(host_concurrency=2, host_rate=0)
        urls = [s.url(f"/{i}.jpg") for i in range(8) for s in (slow, other)]
        with ThreadPoolExecutor(16) as pool:
            assert all(d == JPEG for d in pool.map(lambda u: get(u, policy), urls))
        assert slow.peak == 2 and other.peak == 2  # 16 threads, two hosts: two at a time on each
        rated = Site()
        try:
            rated.routes["/robots.txt"] = body(b"")
            rated.routes["/r.jpg"] = body(JPEG)
            policy = polite(host_concurrency=8, host_rate=5)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: get(rated.url("/r.jpg"), policy), range(8)))
            times = sorted(t for p, t, _ in rated.log if p == "/r.jpg")
            assert times[-1] - times[0] >= 7 / 5 - 0.1  # 5 requests/s: 8 requests span >= 1.4 s
        finally:
            rated.close()
    finally:
        slow.close()
        other.close()


def test_user_agent_names_the_project_and_the_contact(site):
    site.routes["/a.jpg"] = body(JPEG)
    get(site.url("/a.jpg"), polite(contact="mailto:data@example.org"))
    agents = {ua for _, _, ua in site.log}
    assert agents == {"dcgan-cluster/0.1 (DCGAN dataset build; +mailto:data@example.org)"}  # robots.txt too


def test_a_lying_content_length_or_a_silent_host_ends_by_the_deadline(site):
    """Content-Length larger than what comes (then silence): a timeout at the deadline, not a hang; smaller: the
    declared bytes only (the photo then fails to decode, a reject there). A host that accepts and never answers:
    its robots.txt times out, so all of its URLs are `unreachable` (RFC 9309), the later ones without waiting."""
    import socket

    def overclaim(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10 * len(JPEG)))
        h.end_headers()
        h.wfile.write(JPEG)
        h.wfile.flush()
        time.sleep(10)

    site.routes["/over.jpg"] = overclaim
    site.routes["/under.jpg"] = lambda h: (h.send_response(200), h.send_header("Content-Length", "100"),
                                           h.end_headers(), h.wfile.write(JPEG))
    site.routes["/robots.txt"] = body(b"")
    started = time.monotonic()
    assert reason(site.url("/over.jpg"), polite(), timeout_s=2) == "timeout"
    assert time.monotonic() - started < 3.5
    assert get(site.url("/under.jpg"), polite()) == JPEG[:100]

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never reads or answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(Reject) as got:
            get(f"{url}/a.jpg", polite(), timeout_s=1)
        assert got.value.reason == UNREACHABLE and "robots.txt" in got.value.detail
        assert 0.9 < time.monotonic() - started < 2.5
        started = time.monotonic()
        assert reason(f"{url}/b.jpg", polite(), timeout_s=1) == UNREACHABLE
        assert time.monotonic() - started < 0.2  # cached: the host is not asked again
    finally:
        silent.close()


def two_workers_ready(timeout_s: float = 120.0) -> None:
    """Start two Ray worker processes, each with what a build task imports, and hold both until each has seen the
    other, so that the next two tasks find two idle, warm workers: a worker's start-up and a cold worker's imports
    (seconds on a loaded 2-core CI box; once the second chunk began 4 s after the first, when the first had finished
    its 16 fetches) are not part of what a test measures."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    class Meeting:
        def __init__(self):
            self.arrived = 0

        def arrive(self) -> None:
            self.arrived += 1

        def count(self) -> int:
            return self.arrived

    @ray.remote(num_cpus=0)
    def meet(meeting, deadline: float) -> int:
        import cv2  # noqa: F401 - what a build task's first input would import
        import preprocessing.build  # noqa: F401
        import preprocessing.downloads  # noqa: F401
        import preprocessing.host_gate  # noqa: F401
        import preprocessing.lsun  # noqa: F401
        import preprocessing.sources  # noqa: F401

        ray.get(meeting.arrive.remote())
        while ray.get(meeting.count.remote()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        return os.getpid()

    meeting = Meeting.remote()
    try:
        pids = ray.get([meet.remote(meeting, time.time() + timeout_s) for _ in range(2)], timeout=timeout_s + 30)
    finally:
        ray.kill(meeting)
    assert len(set(pids)) == 2, pids


@pytest.mark.slow  # ~29 s of paced fetches (three runs of 32 URLs, 2 at a time at 0.5 s each): `make test` runs it
def test_per_host_limits_hold_over_the_whole_build_not_per_task(tmp_path, ray_cluster, caplog):
    """Two build tasks (two Ray worker processes) fetch from one host at once: the build's gates keep the host at
    `host_concurrency` in flight and `host_rate` starts a second over both (per task it would be 2x each). The two
    chunk tasks are started as the build starts them, but with no CPU asked, so they run at once whatever else holds
    the test Ray's CPUs; a whole `build_dataset` checks that a URL-list build starts its gates."""
    import logging

    import ray

    from preprocessing import build as builds
    from preprocessing import host_gate
    from preprocessing.config import BuildConfig

    site = Site(delay=0.5)
    try:
        site.routes["/robots.txt"] = body(b"")
        urls = [site.url(f"/{i}.jpg") for i in range(32)]
        for i in range(32):
            site.routes[f"/{i}.jpg"] = body(JPEG)
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(u + "\n" for u in urls))

        def config(**limits) -> BuildConfig:
            # 4 downloads a task, not 16: with all 16 of a chunk's requests queued at once, the gate (first come,
            # first served) could serve one task's whole chunk before the other's first request, and then the two tasks
            # never overlapped (~1 run in 8); with 4, each request's thread queues its next behind the other task's
            return BuildConfig(kind="center-crop", input=str(listing), resolution=32, shard_rows=16,
                               allow_private_hosts=["127.0.0.1"], download_concurrency=4, **limits)

        two_workers_ready()  # a Ray worker that starts later than the other's 16 fetches would not overlap them

        def two_tasks(name: str, **limits) -> dict[str, float]:
            del site.log[:]
            site.peak = 0
            cfg, out = config(**limits), str(tmp_path / name)
            chunks = builds.plan(cfg).chunks
            gates = host_gate.start(cfg.host_concurrency, cfg.host_rate)
            try:
                task = ray.remote(num_cpus=0)(builds.run_chunk)
                results = ray.get([task.remote(c, cfg, out, out, gates) for c in chunks])
            finally:
                host_gate.stop(gates)
            assert len(chunks) == 2 and sum(r["rows"] for r in results) == 32
            return {p: t for p, t, _ in site.log if p != "/robots.txt"}

        started = two_tasks("concurrency", host_concurrency=2, host_rate=0)
        assert site.peak == 2  # 2 tasks x 4 threads, 2 at a time over both; per task it would reach 4
        first, second = ([started[f"/{i}.jpg"] for i in chunk] for chunk in (range(16), range(16, 32)))
        assert min(second) < max(first) and min(first) < max(second)  # the two tasks did fetch at the same time

        times = sorted(two_tasks("rate", host_concurrency=8, host_rate=8).values())
        assert len(times) == 32 and times[-1] - times[0] >= 0.85 * 31 / 8  # 8/s over both tasks (per task ~1.9 s)
        busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
        assert busiest <= 8 + 2, busiest  # per task: ~16 starts in a second

        site.peak = 0
        with caplog.at_level(logging.INFO, logger="preprocessing.build"):
            manifest = builds.build_dataset(config(host_concurrency=2, host_rate=0), str(tmp_path / "build"),
                                            progress=False)
        assert manifest["counts"]["rows"] == 32 and site.peak <= 2
        assert "at most 2 in flight on one host" in caplog.text  # the build ran its downloads through its gates
    finally:
        site.close()


def test_a_build_gate_leases_slots_spaces_starts_and_shares_a_backoff(ray_cluster):
    from preprocessing import host_gate

    gates = host_gate.start(2, 4.0, gates=2)
    try:
        host = "http://127.0.0.1:80"
        asked = time.monotonic()
        (first, wait1, _), (second, wait2, _) = (host_gate.acquire(gates, host, 1.0, 30.0) for _ in range(2))
        took = time.monotonic() - asked
        assert first and second and wait1 == 0.0 and 0.25 - took - 0.01 <= wait2 <= 0.25  # 4/s: 1/4 s apart
        assert host_gate.acquire(gates, host, 0.2, 30.0) == (None, 0.0, 0.0)  # both slots held: none within 0.2 s
        told = time.monotonic()
        host_gate.backoff(gates, host, 3.0)  # one task saw a 429 with Retry-After: 3
        host_gate.release(gates, host, first)
        lease, wait, backoff_left = host_gate.acquire(gates, host, 5.0, 30.0)  # another task now waits for it
        assert lease and 3.0 - (time.monotonic() - told) - 0.01 <= backoff_left <= 3.0 and wait >= backoff_left
        assert host_gate.acquire(gates, "http://other:80", 0.1, 30.0)[1] == 0.0  # other hosts are not held up

        # a holder that died: its lease lapses after hold_s and the host is free again
        other = "http://lapsing:80"
        assert host_gate.acquire(gates, other, 1.0, 0.5)[0] and host_gate.acquire(gates, other, 1.0, 0.5)[0]
        assert host_gate.acquire(gates, other, 3.0, 30.0)[0]  # within ~1.5 s, not never
    finally:
        seen = host_gate.stop(gates)
    assert seen["requests"] == 7 and seen["peak_in_flight"] == 2 and seen["busy"] == 1 and seen["lapsed"] >= 1
