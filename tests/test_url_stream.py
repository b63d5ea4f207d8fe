"""A text URL list is streamed (issue 23, item 6): the driver plans chunks by byte range without holding the lines,
and each task reads its own range; the same inputs come out as from the whole-file listing."""

from __future__ import annotations

import tracemalloc

import pytest

from preprocessing.build import plan
from preprocessing.config import BuildConfig
from preprocessing.errors import InputError
from preprocessing.sources import list_items, plan_url_list, url_chunk_items


def write_list(path, n: int, dup_every: int = 7) -> None:
    """n URL lines over 50 hosts, every dup_every-th line repeating an earlier URL, with comments, blank lines and
    lines that are not URLs."""
    with open(path, "w") as f:
        f.write("\ufeff# a URL list\n")
        for i in range(n):
            j = i // 2 if i % dup_every == 0 and i else i
            f.write(f"https://host{j % 50}.example.org/photos/{j:08d}.jpg\n")
            if i % 1000 == 3:
                f.write("\n   # a comment\nnot a url\nfile:///etc/passwd\n")


def test_streamed_plan_gives_the_inputs_of_the_whole_file_listing(tmp_path):
    listing = tmp_path / "urls.txt"
    write_list(listing, 5000)
    chunks, n, _ = plan_url_list(str(listing), 256)
    items = [it for c in chunks for it in url_chunk_items(c)]
    whole = list_items(str(listing))
    assert n == len(items) == len(whole)
    assert sorted(tuple(i) for i in items) == sorted((it.key, it.source, *(it.reject or ())) for it in whole)
    assert len({i[0] for i in items}) == len(items)  # a repeated URL is an input once
    assert sum(len(c.get("skip", [])) for c in chunks) > 300 and all(c["count"] <= 256 for c in chunks)
    assert plan_url_list(str(listing), 256, limit=300)[1] <= 300


def test_a_list_changed_under_the_build_is_one_error(tmp_path):
    listing = tmp_path / "urls.txt"
    write_list(listing, 100)
    chunks, _, _ = plan_url_list(str(listing), 10)
    listing.write_text(listing.read_text().replace("host3.", "host9."))
    with pytest.raises(InputError, match="changed while it was being built"):
        for c in chunks:
            url_chunk_items(c)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_planning_a_100k_line_list_keeps_driver_memory_flat(tmp_path):
    """Planning 100k lines peaks at a few MB (a 256 KiB read block and its lines, 8 bytes a line for repeated-URL
    detection, one spec per chunk): about as much as 25k lines' plan, and far below loading the list (what a .csv
    still does)."""
    small, big = tmp_path / "25k.txt", tmp_path / "100k.txt"
    write_list(small, 25_000)
    write_list(big, 100_000)
    cfg = BuildConfig(kind="faces", input=str(big), shard_rows=2048)
    peak_small = _peak(lambda: plan(cfg.model_copy(update={"input": str(small)})))
    peak_big = _peak(lambda: plan(cfg))
    peak_loaded = _peak(lambda: list_items(str(big)))
    print(f"plan peak: 25k lines {peak_small / 1e6:.2f} MB, 100k lines {peak_big / 1e6:.2f} MB; "
          f"loading 100k lines {peak_loaded / 1e6:.2f} MB")
    assert peak_big < 5e6  # 100k lines of ~45 bytes are 4.5 MB of text, ~21 MB loaded as Python objects
    assert peak_big < peak_loaded / 4
    assert peak_big - peak_small < 75_000 * 35  # growth: ~30 bytes a line (hashes, their sort, the repeats: 7% here)


@pytest.mark.slow
def test_a_100k_line_url_list_builds_with_the_driver_holding_no_lines(tmp_path, ray_cluster):
    """End to end on a 127.0.0.1 server: 100k URLs, all but 20 disallowed by robots.txt (fast rejects, no fetch);
    the driver's Python memory during the whole build (tracemalloc) stays at planning's few MB."""
    import http.server
    import threading

    from realdata import grace_hopper_path

    from preprocessing.build import build_dataset

    photo = grace_hopper_path().read_bytes()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            data = b"User-agent: *\nDisallow: /private/\n" if self.path == "/robots.txt" else photo
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = tmp_path / "urls.txt"
    with open(listing, "w") as f:
        for i in range(100_000):
            f.write(f"{base}/photo/{i}.jpg\n" if i % 5000 == 0 else f"{base}/private/{i:06d}.jpg\n")
    small = tmp_path / "small.txt"
    small.write_text("".join(f"{base}/photo/{i}.jpg\n" for i in range(20)))
    cfg = BuildConfig(kind="faces", input=str(listing), resolution=32, shard_rows=10_000,
                      allow_private_hosts=["127.0.0.1"], host_rate=0)
    peaks = {}
    try:
        for name, uri in (("warm-up", small), ("20 lines", small), ("100k lines", listing)):
            tracemalloc.start()  # the warm-up pays the imports and Ray Data's first-use allocations
            manifest = build_dataset(cfg.model_copy(update={"input": str(uri), "overwrite": True}),
                                     str(tmp_path / name.replace(" ", "")), progress=False)
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        tracemalloc.stop()
        server.shutdown()
        server.server_close()
    print("driver Python peak per build: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in peaks.items()))
    assert manifest["counts"]["inputs"] == 100_000 and manifest["counts"]["rows"] == 20
    assert manifest["rejects"]["by_reason"] == {"robots": 99_980}
    assert peaks["100k lines"] - peaks["20 lines"] < 5e6  # the list: 4.5 MB of text, 21 MB as Python objects
