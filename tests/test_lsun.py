"""LSUN-layout LMDBs built here from real photos (JPEG and WebP values, corrupt entries), through the build's Ray tasks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessing import dataset_layout, lsun, shards
from preprocessing.build import BuildError, build_dataset, plan
from preprocessing.config import BuildConfig
from preprocessing.sources import Item, chunk_items
from conftest import free_port
from fresh_process import run_fresh
from realdata import encode, lsun_like_photos

BAD = {b"0" * 40: (b"", "empty"), b"1" * 40: (b"<html>not found</html>", "not_image"),
       b"2" * 40: (None, "truncated"), b"3" * 40: (b"\xff\xd8\xff\xe0garbage", "truncated")}


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory):
    """Every photo as JPEG (quality 75, like LSUN) and as WebP, keyed by the sha1 of the bytes, plus bad entries."""
    path = tmp_path_factory.mktemp("lsun") / "bedroom_val_lmdb"
    entries, good = {}, {}
    for name, rgb in lsun_like_photos().items():
        for ext in (".jpg", ".webp"):
            data = encode(rgb, ext)
            key = hashlib.sha1(data).hexdigest().encode()
            entries[key], good[key.decode()] = data, rgb
    some_jpeg = next(v for v in entries.values() if v[:2] == b"\xff\xd8")
    for key, (data, _) in BAD.items():
        entries[key] = some_jpeg[: len(some_jpeg) // 3] if data is None else data
    lsun.write_lmdb(str(path), entries)
    return str(path), good


def test_key_ranges_cover_every_key_once(lmdb_dir):
    path, good = lmdb_dir
    chunks, n, _ = lsun.plan_lmdb(path, chunk_rows=7)
    assert n == len(good) + len(BAD) and sum(c["count"] for c in chunks) == n
    seen = [k for c in chunks for k, _ in lsun.read_range(c["lmdb"], c["start"], c["count"])]
    assert seen == sorted(seen) and len(set(seen)) == n
    limited, n_lim, _ = lsun.plan_lmdb(path, chunk_rows=7, limit=10)
    assert n_lim == 10 and [c["count"] for c in limited] == [7, 3]


def test_lmdb_is_read_with_the_kernels_readahead(lmdb_dir):
    """A build reads its LMDB once, cold, in key order: readahead off made each 4 KiB page its own disk read (a cold
    key walk 5.2x and read + decode 2.5x slower, benchmarks/lmdb_decode.py). The environment must keep it on."""
    path, _ = lmdb_dir
    flags = lsun.open_env(path).flags()
    assert flags["readahead"] and flags["readonly"] and not flags["lock"]


def test_planning_memory_does_not_grow_with_the_number_of_keys(tmp_path):
    """The driver keeps one spec per chunk, not every key: planning 40k keys takes no more memory than 5k, and the
    fingerprint is still the digest of the full key listing (datasets built before keep their identity)."""
    import tracemalloc

    from preprocessing.sources import fingerprint

    peaks = {}
    for n in (5_000, 40_000):
        keys = sorted(hashlib.sha1(str(i).encode()).hexdigest() for i in range(n))
        lsun.write_lmdb(str(tmp_path / str(n)), {k.encode(): b"x" for k in keys})
        tracemalloc.start()
        chunks, count, digest = lsun.plan_lmdb(str(tmp_path / str(n)), chunk_rows=4096)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n and digest == fingerprint(k.encode().hex() for k in keys)
    assert peaks[40_000] < 1.5 * peaks[5_000] + 64 * 1024, peaks  # a list of keys would be ~5 MB at 40k


def test_build_gives_expected_rows_rejects_and_pixels(lmdb_dir, tmp_path, ray_cluster, caplog, capsys):
    path, good = lmdb_dir
    cfg = BuildConfig(kind="lsun", input=path, shard_rows=8)
    with caplog.at_level(logging.INFO, logger="preprocessing.build"):
        manifest = build_dataset(cfg, str(tmp_path / "ds"))
    assert any("inputs ->" in r.message and "rejects by reason" in r.message for r in caplog.records)  # the summary
    progress = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[progress] center-crop ")]
    assert progress and f"{len(good) + len(BAD)}/{len(good) + len(BAD)} inputs" in progress[-1], progress
    assert manifest["counts"]["rows"] == len(good)
    assert manifest["counts"]["inputs"] == len(good) + len(BAD)
    assert manifest["rejects"]["by_reason"] == {"empty": 1, "not_image": 1, "truncated": 2}
    assert [s["path"] for s in manifest["shards"]] == [dataset_layout.part(i) for i in range(len(manifest["shards"]))]
    ds = shards.ShardDataset(str(tmp_path / "ds"))
    for table in ds.tables():
        keys = table.column("key").to_pylist()
        assert keys == sorted(keys)
    for row in ds:
        ref = cv2.resize(good[row["key"]][:, (good[row["key"]].shape[1] - 256) // 2:][:, :256], (64, 64),
                         interpolation=cv2.INTER_AREA)
        assert row["image"].shape == (64, 64, 3) and row["box"] is None and row["source"] == path
        assert np.abs(row["image"].astype(int) - ref).mean() < 6, row["key"]
    import pyarrow.parquet as pq

    rejects = [r for e in manifest["rejects"]["shards"] for r in pq.read_table(str(tmp_path / "ds" / e["path"])).to_pylist()]
    assert {(r["key"], r["reason"]) for r in rejects} == {(k.decode(), why) for k, (_, why) in BAD.items()}
    assert all(r["detail"] for r in rejects)


@pytest.mark.slow  # a fresh process that starts a local Ray (~13 s)
def test_a_build_on_its_own_local_ray_needs_neither_ray_data_nor_a_dashboard(lmdb_dir, tmp_path):
    """A build's chunks are plain Ray tasks: its process never imports Ray Data (0.5 s of pandas and more a stage,
    issue 22's fixed start-up) and its own local Ray starts no dashboard; the build itself is the same."""
    path, good = lmdb_dir
    code = ("import sys, ray\n"
            "from preprocessing.build import build_dataset\n"
            "from preprocessing.config import BuildConfig\n"
            f"m = build_dataset(BuildConfig(kind='lsun', input={path!r}, shard_rows=8), {str(tmp_path / 'ds')!r}, "
            "progress=False)\n"
            "import json; print(json.dumps([m['counts']['rows'], len(m['shards']), 'ray.data' in sys.modules, "
            "'pandas' in sys.modules, ray._private.worker.global_worker.node.address_info.get('webui_url')]))\n")
    rows, n_shards, ray_data, pandas, dashboard = run_fresh(code)
    assert (rows, n_shards) == (len(good), -(-(len(good) + len(BAD)) // 8))  # every row, in several chunks
    assert (ray_data, pandas) == (False, False)
    assert not dashboard, dashboard


@pytest.mark.slow  # a fresh process that starts a Ray (11 s): `make test-fast` stays under 5 minutes
def test_a_local_command_starts_its_own_ray_whatever_a_killed_ray_start_left_behind(lmdb_dir, tmp_path):
    """`ray start` writes its GCS address to ray_current_cluster in Ray's temp dir, and only `ray stop` removes it:
    a head that was killed or crashed leaves it. `ray.init()` without an address joins what that file names, so a
    command with no cluster address (its own local Ray) hung in Ray's GCS client on the dead address, minutes with
    nothing said (and with a live head there it would have run on that cluster, not its own Ray). Ray's temp dir
    here is this test's own (RAY_TMPDIR, short: Ray's sockets live under it). `auto`, which means that file, probes
    its address first, as any other address."""
    path, good = lmdb_dir
    temp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    try:
        (temp / "ray").mkdir()
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        (temp / "ray" / "ray_current_cluster").write_text(dead)
        code = ("import sys, ray\n"
                "from dcgan import cli\n"
                "from preprocessing import compute\n"
                f"sys.argv = ['dcgan', 'build-lsun', {path!r}, '--out', {str(tmp_path / 'ds')!r}, '--quiet', "
                "'--no-dedup', '--json']\n"
                "seen = []\n"
                "connect = compute.connect\n"
                "def spy(*a, **k):\n"
                "    connect(*a, **k)\n"
                "    seen.append(ray.get_runtime_context().gcs_address)\n"
                "compute.connect = spy\n"
                "rc = cli.main()\n"
                "import time\n"
                "from preprocessing.compute import ClusterUnreachable\n"
                "t = time.monotonic()\n"
                "try:\n"
                "    compute.connect('auto')\n"
                "    auto = 'joined'\n"
                "except ClusterUnreachable as err:\n"
                "    auto = str(err)\n"
                "import json; print(json.dumps([rc, seen, auto, time.monotonic() - t]))\n")
        rc, seen, auto, took = run_fresh(code, timeout=120, RAY_TMPDIR=str(temp))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert rc == 0 and seen and all(a.split(":")[-1] != dead.split(":")[-1] for a in seen), (dead, seen)
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["counts"]["rows"] == len(good)
    # `auto` means that file: its dead address is one line at once, not minutes of Ray retrying it
    assert auto.startswith(f"cannot reach the Ray cluster at {dead} (what cluster.address or RAY_ADDRESS auto finds "
                           "in Ray's ray_current_cluster file)") and took < 10, (auto, took)


@pytest.mark.slow  # a fresh process that starts a local Ray (~13 s): test-fast stays under 5 minutes
def test_a_command_leaves_its_ray_when_it_is_done_not_at_the_interpreters_exit(lmdb_dir, tmp_path):
    """At the interpreter's exit Ray sleeps 0.5 s for workers' log lines before it disconnects (and stops a local
    Ray); `dcgan` leaves Ray as soon as the command returns (issue 22's fixed cost), its work done."""
    path, good = lmdb_dir
    code = ("import sys, ray\n"
            "from dcgan import cli\n"
            f"sys.argv = ['dcgan', 'build-lsun', {path!r}, '--out', {str(tmp_path / 'ds')!r}, '--quiet', '--no-dedup', "
            "'--json']\n"
            "rc = cli.main()\n"
            "import json; print(json.dumps([rc, ray.is_initialized()]))\n")
    assert run_fresh(code) == [0, False]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(good)


def test_idempotent_resumable_and_overwrite_guarded(lmdb_dir, tmp_path, ray_cluster):
    path, _ = lmdb_dir
    out = str(tmp_path / "ds")
    cfg = BuildConfig(kind="lsun", input=path, shard_rows=8)
    first = build_dataset(cfg, out, progress=False)
    with pytest.raises(BuildError, match=r"already holds a dataset \(manifest.json\); pass --overwrite \(a flow.s "
                                         r"build parameter: \"overwrite\": true\)"):
        build_dataset(cfg, out, progress=False)
    # a manifest edited so that it no longer adds up (or not JSON at all) is still the user's dataset: refused too,
    # not taken for an unfinished output and cleared
    manifest_file = tmp_path / "ds" / "manifest.json"
    text = manifest_file.read_text()
    for damaged in (text.replace('"rows": ', '"rows": 1', 1), "{not json"):
        manifest_file.write_text(damaged)
        with pytest.raises(BuildError, match=r"already holds a dataset \(manifest.json\)"):
            build_dataset(cfg, out, progress=False)
        assert manifest_file.read_text() == damaged and len(list((tmp_path / "ds" / "shards").iterdir())) == \
            len(first["shards"])
    manifest_file.write_text(text)
    again = build_dataset(cfg.model_copy(update={"overwrite": True}), out, progress=False)
    assert again["content_hash"] == first["content_hash"] and again["shards"] == first["shards"]
    # A build that stops before its manifest (here: too many rejects) leaves its finished chunks; one shard is
    # lost too. Running again completes it, redoing only that chunk, and gives the same dataset.
    strict = cfg.model_copy(update={"overwrite": True, "max_reject_rate": 0.0})
    with pytest.raises(BuildError, match="max_reject_rate"):
        build_dataset(strict, out, progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists() and (tmp_path / "ds" / "_chunks").exists()
    (tmp_path / "ds" / "shards" / "part-00001.parquet").unlink()
    resumed = build_dataset(cfg, out, progress=False)
    assert resumed["content_hash"] == first["content_hash"]
    n = len(resumed["shards"])
    assert resumed["build_stats"]["chunks"] == n and resumed["build_stats"]["resumed"] == n - 1
    assert not (tmp_path / "ds" / "_chunks").exists()


def test_exported_folder_and_limit(lmdb_dir, tmp_path, ray_cluster):
    path, good = lmdb_dir
    folder = tmp_path / "export"
    for key, data in list(lsun.read_range(path, *[(c["start"], c["count"]) for c in lsun.plan_lmdb(path, 10**6)[0]][0])):
        ext = ".jpg" if data[:2] == b"\xff\xd8" else ".webp" if data[:4] == b"RIFF" else ".bin"
        (folder / key[:2]).mkdir(parents=True, exist_ok=True)
        (folder / key[:2] / f"{key}{ext}").write_bytes(data)
    cfg = BuildConfig(kind="lsun", input=str(folder), shard_rows=16, limit=20)
    assert plan(cfg).inputs == 20
    manifest = build_dataset(cfg, str(tmp_path / "ds"), progress=False)
    rows = manifest["counts"]["rows"]
    assert rows + manifest["counts"]["rejected"] == 20
    keys = shards.ShardDataset(str(tmp_path / "ds")).keys()  # paths relative to the folder, like "ab/<id>.jpg"
    assert {k.split("/")[1].split(".")[0] for k in keys} <= set(good) and len(keys) == rows


def test_same_name_with_other_extensions_gives_distinct_keys(tmp_path):
    """x.jpg, x.webp and sub/x.jpg are three inputs (keys were file stems: two rows under one key)."""
    photo = next(iter(lsun_like_photos().values()))
    (tmp_path / "sub").mkdir()
    for name in ("x.jpg", "x.webp", "sub/x.jpg"):
        (tmp_path / name).write_bytes(encode(photo, "." + name.rsplit(".", 1)[1]))
    p = plan(BuildConfig(kind="lsun", input=str(tmp_path), shard_rows=2))
    assert [item[0] for c in p.chunks for item in c["items"]] == ["sub/x.jpg", "x.jpg", "x.webp"]
    with pytest.raises(AssertionError, match="listed twice.*'x'"):  # a listing bug, caught before any work
        chunk_items([Item("x", "/a/x.jpg"), Item("x", "/a/x.png")], 2)


PLAN = """import sys
from preprocessing import lsun
from preprocessing.errors import InputError
for path in sys.argv[1:]:
    try:
        print("planned", lsun.plan_lmdb(path, 8)[1])
    except InputError as err:
        print(err)
"""


def test_damaged_lmdb_is_a_one_line_input_error_not_a_crash(lmdb_dir, tmp_path):
    path, _ = lmdb_dir
    size = os.path.getsize(f"{path}/data.mdb")
    cases = {name: tmp_path / name / "data.mdb" for name in ("truncated", "random", "overwritten", "intact")}
    for mdb in cases.values():
        mdb.parent.mkdir()
        shutil.copy(f"{path}/data.mdb", mdb)
    os.truncate(cases["truncated"], size // 2)
    cases["random"].write_bytes(np.random.default_rng(0).bytes(size))
    with open(cases["overwritten"], "r+b") as f:  # the two meta pages intact, every other page garbage
        f.seek(2 * os.sysconf("SC_PAGESIZE"))
        f.write(np.random.default_rng(1).bytes(size - f.tell()))
    # The fault: a read that reaches a page past the end of a truncated data.mdb dies of SIGBUS, without a word.
    raw = "import lmdb, sys\nfor _ in lmdb.open(sys.argv[1], readonly=True, lock=False).begin().cursor(): pass"
    crash = subprocess.run([sys.executable, "-c", raw, str(cases["truncated"].parent)], capture_output=True)
    assert crash.returncode == -signal.SIGBUS
    # The fix, also in a child process, so that a crash fails this test rather than killing pytest.
    out = subprocess.run([sys.executable, "-c", PLAN, *(str(m.parent) for m in cases.values())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dict(zip(cases, out.stdout.splitlines()))
    assert lines["intact"] == f"planned {len(lmdb_dir[1]) + len(BAD)}"
    for name, why in (("truncated", "truncated LMDB"), ("random", "not a readable LMDB"),
                      ("overwritten", "corrupt LMDB")):
        assert lines[name].startswith(f"{cases[name]}: {why} ("), lines[name]


def test_a_build_chunk_writes_shards_and_rejects_without_importing_pandas(lmdb_dir, tmp_path):
    """What a build's chunk task runs (`run_chunk`: read, decode, write the shard and the rejects), in a fresh
    process, imports no pandas: pyarrow's `pa.array` on Python objects does (~0.16 s of each fresh build worker's
    first chunk, issue 22's fixed start-up), so the columns are made from their buffers (`shards.text_column`)."""
    path, good = lmdb_dir
    out = str(tmp_path / "ds")
    code = ("import sys, json\n"
            "from preprocessing import build\n"
            "from preprocessing.config import BuildConfig\n"
            f"cfg = BuildConfig(kind='lsun', input={path!r}, shard_rows=8)\n"
            f"done = [build.run_chunk(c, cfg, {out + '/shards'!r}, {out!r}) for c in build.plan(cfg).chunks]\n"
            "print(json.dumps([sum(r['rows'] for r in done), sum(bool(r['rejects']) for r in done), "
            "'pandas' in sys.modules]))\n")
    rows, with_rejects, pandas = run_fresh(code)
    assert rows == len(good) and with_rejects >= 1  # shards and a rejects file were written ...
    assert pandas is False                          # ... and pandas never imported
