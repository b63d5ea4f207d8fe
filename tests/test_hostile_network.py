"""Hostile URL lists (issue 21, items 2 and 4): the network policy of downloads.

Traffic goes to loopback only. The refusal of link-local, private and metadata addresses is tested on the address
check itself (literal addresses, and a name resolved to them, with a socket guard proving nothing was connected);
end to end, 127.0.0.1 HTTP servers redirect into 127.0.0.1 (refused unless allowed), to ftp:// (refused), round in
circles (the redirect cap), and trickle a body at 1 byte/s (stopped at the deadline).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest
from realdata import grace_hopper_path

from preprocessing.config import BuildConfig
from preprocessing.downloads import BAD_URL, BLOCKED_ADDRESS, TIMEOUT, TOO_MANY_REDIRECTS, Policy, download
from preprocessing.images import Reject
from local_http import LocalHTTPServer

JPEG = grace_hopper_path().read_bytes()


@pytest.fixture
def no_connect(monkeypatch):
    """Fails the test if anything opens a TCP connection: a refusal must come before connecting."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"connected to {args[0]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("url, kind", [
    ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),  # cloud metadata
    ("http://[::1]/x.jpg", "loopback"),
    ("http://127.0.0.1/x.jpg", "loopback"),
    ("http://127.5.6.7:8080/x.jpg", "loopback"),
    ("http://10.1.2.3/x.jpg", "private"),
    ("http://192.168.0.10/x.jpg", "private"),
    ("http://172.16.0.1/x.jpg", "private"),
    ("http://[fe80::1]/x.jpg", "link-local"),
    ("http://[::ffff:127.0.0.1]/x.jpg", "loopback"),  # an IPv4 loopback address in IPv6 clothing
    ("http://224.0.0.1/x.jpg", "multicast"),
    ("http://0.0.0.0/x.jpg", "unspecified"),
    ("http://240.0.0.1/x.jpg", "reserved"),
    ("http://localhost/x.jpg", "loopback"),  # a name, resolved to loopback before anything connects
    ("http://LOCALHOST./x.jpg", "loopback"),
])
def test_private_addresses_are_refused_before_connecting(url, kind, no_connect):
    with pytest.raises(Reject) as got:
        download(url, timeout_s=2, retries=2, max_bytes=1000)
    assert got.value.reason == BLOCKED_ADDRESS and f"a {kind} address" in got.value.detail
    assert "allow_private_hosts" in got.value.detail
    assert not no_connect


@pytest.mark.parametrize("allow, url", [
    (["10.0.0.0/8"], "http://10.1.2.3/x.jpg"),
    (["169.254.169.254"], "http://169.254.169.254/x"),
    (["::1"], "http://[::1]/x.jpg"),
    (["localhost"], "http://localhost/x.jpg"),
])
def test_allow_private_hosts_admits_what_it_names(allow, url, no_connect):
    """An allowed host gets as far as connecting (the guard stops it there); nothing else is admitted with it."""
    with pytest.raises(AssertionError, match="connected to"):
        download(url, timeout_s=2, retries=0, max_bytes=1000, policy=Policy(tuple(allow)))
    with pytest.raises(Reject) as got:
        download("http://192.168.1.1/x.jpg", timeout_s=2, retries=0, max_bytes=1000, policy=Policy(tuple(allow)))
    assert got.value.reason == BLOCKED_ADDRESS


def test_allow_private_hosts_is_validated():
    assert BuildConfig(allow_private_hosts=["mirror.internal", "10.0.0.0/8", "::1"]).allow_private_hosts
    with pytest.raises(ValueError, match="neither a host name"):
        BuildConfig(allow_private_hosts=["http://mirror/"])


# ------------------------------------------------------------------------------------------------ end to end


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict = {}
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/robots.txt":  # robots.txt requests are test_polite_fetch's to count (404 here: no rules)
            _Handler.seen.append(self.path)
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
        elif route[0] == "redirect":
            self.send_response(302)
            self.send_header("Location", route[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route[0] == "trickle":  # headers at once, then the body at 1 byte/s
            self.send_response(200)
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            try:
                for i in range(len(JPEG)):
                    self.wfile.write(JPEG[i:i + 1])
                    self.wfile.flush()
                    time.sleep(1.0)
            except OSError:
                pass
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(route[1])))
            self.end_headers()
            self.wfile.write(route[1])


@pytest.fixture
def site():
    """A 127.0.0.1 server; `routes` maps paths to ("redirect", location) / ("body", bytes) / ("trickle",)."""
    server = LocalHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    _Handler.seen = []
    _Handler.routes = {
        "/photo.jpg": ("body", JPEG),
        "/start": ("redirect", f"http://127.0.0.1:{port}/hop"),
        "/hop": ("redirect", "/photo.jpg"),
        "/to-ftp": ("redirect", f"ftp://127.0.0.1:{port}/photo.jpg"),
        "/loop": ("redirect", "/loop"),
        "/trickle.jpg": ("trickle",),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port, _Handler.seen
    server.shutdown()
    server.server_close()


def test_a_redirect_chain_into_127_0_0_1_is_refused_unless_allowed(site):
    port, seen = site
    start = f"http://localhost:{port}/start"
    # Allowing the name `localhost` admits the first hop only: the redirect to 127.0.0.1 is checked again and refused
    with pytest.raises(Reject) as got:
        download(start, timeout_s=5, retries=0, max_bytes=10**7, policy=Policy(("localhost",)))
    assert got.value.reason == BLOCKED_ADDRESS and "127.0.0.1 is a loopback address" in got.value.detail
    assert seen == ["/start"]  # the refused hop was never requested
    # Not allowed at all: refused before the first request
    with pytest.raises(Reject) as got:
        download(start, timeout_s=5, retries=0, max_bytes=10**7)
    assert got.value.reason == BLOCKED_ADDRESS and seen == ["/start"]
    # An internal mirror allowed by its range: the whole chain is followed
    assert download(start, timeout_s=5, retries=0, max_bytes=10**7, policy=Policy(("127.0.0.0/8", "::1"))) == JPEG
    assert seen[1:] == ["/start", "/hop", "/photo.jpg"]


def test_a_redirect_to_ftp_and_a_redirect_loop_are_refused(site):
    port, seen = site
    allow = Policy(("127.0.0.1",), max_redirects=3)
    with pytest.raises(Reject) as got:
        download(f"http://127.0.0.1:{port}/to-ftp", timeout_s=5, retries=2, max_bytes=10**7, policy=allow)
    assert got.value.reason == BAD_URL and "redirect to ftp://" in got.value.detail
    with pytest.raises(Reject) as got:
        download(f"http://127.0.0.1:{port}/loop", timeout_s=5, retries=0, max_bytes=10**7, policy=allow)
    assert got.value.reason == TOO_MANY_REDIRECTS and "more than 3 redirects" in got.value.detail
    assert seen.count("/to-ftp") == 1 and seen.count("/loop") == 4  # a refusal is final, not retried


def test_a_trickling_body_is_stopped_at_the_deadline(site):
    """1 byte/s: the old download read 64 KiB blocks and checked the clock between them (121 s for a 3 s limit)."""
    port, _ = site
    started = time.monotonic()
    with pytest.raises(Reject) as got:
        download(f"http://127.0.0.1:{port}/trickle.jpg", timeout_s=2, retries=0, max_bytes=10**7,
                 policy=Policy(("127.0.0.1",)))
    took = time.monotonic() - started
    assert got.value.reason == TIMEOUT and got.value.detail == "no complete response within 2 s (1 attempt)"
    assert 1.9 < took < 3.5, took


@pytest.mark.slow
def test_a_url_list_build_rejects_private_addresses_with_their_reason(site, tmp_path, ray_cluster):
    """End to end: a URL list aimed at cloud metadata, loopback and a redirect into 127.0.0.1 becomes reject rows
    naming the refused address; the one host the build allows (`localhost`, the test's own server) gives its row."""
    from test_build import all_rejects

    from preprocessing.build import build_dataset
    from preprocessing.shards import ShardDataset

    port, seen = site
    urls = [f"http://localhost:{port}/photo.jpg", f"http://localhost:{port}/start",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/", f"http://[::1]:{port}/photo.jpg",
            f"http://127.0.0.1:{port}/photo.jpg"]
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    cfg = BuildConfig(kind="faces", input=str(listing), resolution=32, download_timeout_s=5, download_retries=0,
                      allow_private_hosts=["localhost"])
    out = str(tmp_path / "ds")
    manifest = build_dataset(cfg, out, progress=False)
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in all_rejects(out, manifest)}
    assert ShardDataset(out).keys() == [f"http://localhost:{port}/photo.jpg#0"]
    assert {k: why for k, (why, _) in rejects.items()} == {u: BLOCKED_ADDRESS for u in urls[1:]}
    assert "169.254.169.254 is a link-local address" in rejects[urls[2]][1]
    assert sorted(seen) == ["/photo.jpg", "/start"]  # nothing refused was ever requested
