"""The tests' local HTTP server: a `ThreadingHTTPServer` with a listen backlog a build's burst of connections fits in.

socketserver's default backlog is 5: when a build's chunk tasks open their connections at once, the kernel drops a
SYN and the client retransmits it 1 s later, past a test's short timeouts (benchmarks/url_fetch.py had the same
fault and held its baseline back by up to 27%)."""

from __future__ import annotations

import http.server


class LocalHTTPServer(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
