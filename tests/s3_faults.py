"""An HTTP proxy on 127.0.0.1 that puts a flaky network in front of the S3 server: on a seeded share of requests
it resets the connection, answers 500 InternalError or 503 SlowDown, or stalls past the client's read timeout (and,
in front of any HTTP server, gives canned answers to chosen requests).

Deterministic by seed and independent of timing: a request's fate depends only on (seed, method, path, query) and on
how many times that same request was seen before, so the same build faces the same faults whatever the concurrency.
A faulty request fails its first `attempts` tries and then goes through, so every client that retries gets there.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("reset", "500", "503", "stall")
_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>fault-proxy</RequestId></Error>')


class FaultProxy:
    """`with FaultProxy(upstream, seed=1, rate=0.1) as proxy:` then point AWS_ENDPOINT_URL at `proxy.url`."""

    def __init__(self, upstream: str, seed: int = 0, rate: float = 0.1, attempts: int = 1, stall_s: float = 3.0,
                 stubborn: dict[str, int] | None = None,
                 canned: dict[tuple[str, str], tuple[int, str, int]] | None = None, cut: dict[str, int] | None = None):
        """`stubborn`: PUTs whose path ends with a key fail with 503 that many times in a row (past a client's own
        retries), to show what the next layer up does about it. `cut`: GETs whose path ends with a key get their
        answer's headers and half its body, then a reset, that many times in a row (a connection lost mid-body).
        `canned`: {(method, path): (status, text, times)} answers that request (a path "*/logs": any path that ends so)
        with `status` and the plain `text` its first `times` tries (any HTTP server: e.g. the Ray Jobs API's "please try
        again later")."""
        self.canned, self.canned_sent = canned or {}, Counter()
        self.upstream = urlparse(upstream)
        self.seed, self.rate, self.attempts, self.stall_s = seed, rate, attempts, stall_s
        self.stubborn = stubborn or {}
        self.cut, self.cut_sent = cut or {}, Counter()
        self.seen: Counter = Counter()
        self.injected: Counter = Counter()
        self.requests = 0
        self.bytes_in = self.bytes_out = 0  # request and response bodies passed through
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fault_for(self, method: str, path: str) -> str | None:
        """The fault this attempt of this request meets, or None to pass it through."""
        with self._lock:
            self.requests += 1
            attempt = self.seen[(method, path)]
            self.seen[(method, path)] += 1
        for suffix, times in self.stubborn.items():
            if method == "PUT" and path.split("?")[0].endswith(suffix) and attempt < times:
                with self._lock:
                    self.injected["stubborn 503"] += 1
                return "503"
        digest = hashlib.sha256(f"{self.seed}|{method}|{path}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= self.rate or attempt >= self.attempts:
            return None
        fault = FAULTS[digest[8] % len(FAULTS)]
        with self._lock:
            self.injected[fault] += 1
        return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _error(self, status: int, code: str) -> None:
                body = _XML.format(code=code, message="injected by the test's fault proxy").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _canned(self) -> bool:
                key = (self.command, self.path)
                if key not in proxy.canned:  # ("GET", "*/logs"): any path that ends so
                    key = next((k for k in proxy.canned if k[0] == self.command and k[1].startswith("*")
                                and self.path.split("?")[0].endswith(k[1][1:])), key)
                status, text, times = proxy.canned.get(key, (0, "", 0))
                with proxy._lock:
                    if proxy.canned_sent[key] >= times:
                        return False
                    proxy.canned_sent[key] += 1
                    proxy.injected[f"canned {status}"] += 1
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def _cut(self) -> bool:
                """Whether this GET's body is cut off half-way (`cut`): the rest never comes, the connection resets."""
                suffix = next((k for k in proxy.cut if self.path.split("?")[0].endswith(k)), None)
                if self.command != "GET" or suffix is None:
                    return False
                with proxy._lock:
                    if proxy.cut_sent[suffix] >= proxy.cut[suffix]:
                        return False
                    proxy.cut_sent[suffix] += 1
                    proxy.injected["cut mid-body"] += 1
                return True

            def _any(self) -> None:
                body = self._body()
                if self._canned():
                    return
                fault = proxy.fault_for(self.command, self.path)
                if fault == "reset":
                    return self._reset()
                if fault == "500":
                    return self._error(500, "InternalError")
                if fault == "503":
                    return self._error(503, "SlowDown")
                if fault == "stall":
                    time.sleep(proxy.stall_s)  # past the client's read timeout: it gives up and retries
                    return self._reset()
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    headers["Content-Length"] = str(len(body))
                up.request(self.command, self.path, body=body or None, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                with proxy._lock:
                    proxy.bytes_in += len(body)
                    proxy.bytes_out += len(data)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                up.close()
                if self.command == "HEAD":
                    return
                if self._cut():
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def puts(self, suffix: str) -> int:
        """How many times a PUT whose path ends with `suffix` arrived (every attempt counts)."""
        return sum(n for (method, path), n in self.seen.items() if method == "PUT" and path.split("?")[0].endswith(suffix))

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.injected.items())) or "none"
        return f"{self.requests} requests, {sum(self.injected.values())} faults injected ({faults})"
