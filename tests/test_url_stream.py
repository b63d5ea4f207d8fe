"""A URL list is streamed (issue 23, item 6; .csv/.tsv/.parquet: issue 23 follow-up): the driver plans chunks by byte
range (Parquet: by row) without holding the URLs, and each task reads its own range; the same inputs come out as from
the whole-file listing."""

from __future__ import annotations

import tracemalloc

import pytest

from preprocessing.build import plan
from preprocessing.config import BuildConfig
from preprocessing.errors import InputError
from preprocessing.sources import list_items, plan_url_list, url_chunk_items
from local_http import LocalHTTPServer


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


def write_table_list(path, n: int, dup_every: int = 7, row_group: int = 10_000) -> None:
    """The URLs of write_list as a CSV (a header with a `url` column among others, a blank cell, a quoted field
    running over two lines), a headerless one-column TSV, or a Parquet file (a null)."""
    urls = []
    for i in range(n):
        j = i // 2 if i % dup_every == 0 and i else i
        urls.append(f"https://host{j % 50}.example.org/photos/{j:08d}.jpg")
        if i % 1000 == 3:
            urls += ["not a url", "file:///etc/passwd"]
    suffix = str(path).rsplit(".", 1)[1]
    if suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": range(len(urls) + 1), "url": urls + [None]}), path, row_group_size=row_group)
    elif suffix == "tsv":
        with open(path, "w") as f:
            f.writelines(f"{u}\n" for u in urls)
    else:
        with open(path, "w") as f:
            f.write("\ufeffname,URL,size\n")
            f.writelines(f"n{i},{u},{i}\n" for i, u in enumerate(urls))
            f.write('"a name\nover two lines",https://other.example.org/x.jpg,1\nblank,,2\n')


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_streamed_tables_give_the_inputs_of_the_whole_file_listing(tmp_path, suffix):
    listing = tmp_path / f"urls.{suffix}"
    write_table_list(listing, 5000, row_group=700)
    chunks, n, _ = plan_url_list(str(listing), 256)
    items = [it for c in chunks for it in url_chunk_items(c)]
    whole = list_items(str(listing))
    assert n == len(items) == len(whole) > 4500
    assert sorted(tuple(i) for i in items) == sorted((it.key, it.source, *(it.reject or ())) for it in whole)
    assert len({i[0] for i in items}) == len(items)  # a repeated URL is an input once
    assert all(c["count"] <= 256 for c in chunks) and len({c["offset"] for c in chunks}) == len(chunks)
    planned = plan(BuildConfig(kind="faces", input=str(listing), shard_rows=256)).chunks  # what a build plans
    assert [c["offset"] for c in planned] == [c["offset"] for c in chunks]
    # a chunk is read from where it starts: alone, it gives its own URLs
    assert url_chunk_items(chunks[5]) == [i for c in chunks[5:6] for i in url_chunk_items(c)]
    assert [i[0] for i in url_chunk_items(chunks[0])][:2] == ["https://host0.example.org/photos/00000000.jpg",
                                                               "https://host1.example.org/photos/00000001.jpg"]


def test_a_table_without_a_url_column_is_one_error(tmp_path):
    listing = tmp_path / "u.csv"
    listing.write_text("name,link\na,b\n")
    with pytest.raises(InputError, match="u.csv: no 'url' column in the header"):
        plan_url_list(str(listing), 10)


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
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_planning_a_100k_row_table_keeps_driver_memory_flat(tmp_path, suffix):
    """As for text: a 100k-row CSV or Parquet list is planned in a few MB of Python memory, ~30 bytes a row more than
    25k rows, far below loading it whole (what it did before). Parquet's own buffers (a row group's url column, 10k
    rows here) are pyarrow's, not traced."""
    small, big = tmp_path / f"25k.{suffix}", tmp_path / f"100k.{suffix}"
    write_table_list(small, 25_000)
    write_table_list(big, 100_000)
    peak_small = _peak(lambda: plan_url_list(str(small), 2048))
    peak_big = _peak(lambda: plan_url_list(str(big), 2048))
    peak_loaded = _peak(lambda: list_items(str(big)))
    print(f"{suffix} plan peak: 25k rows {peak_small / 1e6:.2f} MB, 100k rows {peak_big / 1e6:.2f} MB; "
          f"loading 100k rows {peak_loaded / 1e6:.2f} MB")
    assert peak_big < 5e6 and peak_big < peak_loaded / 4
    assert peak_big - peak_small < 75_000 * 45  # measured 33-35 bytes a row (the text list's 30, and its repeats)


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

    server = LocalHTTPServer(("127.0.0.1", 0), H)
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
