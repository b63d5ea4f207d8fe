"""build-faces end to end on Ray Data: local folders, S3 prefixes and URL lists served on 127.0.0.1, bad input as
reject rows, failure without a manifest, the CLI, and the S3 output location."""

from __future__ import annotations

import argparse
import http.server
import io
import logging
import os
import threading
import re
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from preprocessing import shards, storage
from preprocessing.build import BuildError, build_dataset
from preprocessing.config import BuildConfig
from preprocessing.errors import InputError, MissingError
from preprocessing.sources import list_items
from realdata import encode, grace_hopper_path, shared_data, skimage_path, skimage_rgb
from local_http import LocalHTTPServer

PHOTOS = {"grace_hopper.jpg": grace_hopper_path(), "astronaut.png": skimage_path("astronaut.png"),
          "camera.png": skimage_path("camera.png"), "coffee.png": skimage_path("coffee.png"),
          "chelsea.png": skimage_path("chelsea.png")}


def bad_files() -> dict[str, tuple[bytes, str]]:
    astro = encode(skimage_rgb("astronaut"), ".jpg")
    return {
        "empty.jpg": (b"", "empty"),
        "notes.txt": (b"just some text\n", "not_image"),
        "cut.jpg": (astro[: len(astro) // 2], "truncated"),
        # 313,600 pixels: over the tests' max_pixels of 310,000 (grace hopper, the largest photo, has 307,200)
        "bomb.png": (encode(np.zeros((560, 560, 3), np.uint8), ".png"), "too_large"),
    }


def write_inputs(put) -> None:
    for name, path in PHOTOS.items():
        put(name, path.read_bytes())
    for name, (data, _) in bad_files().items():
        put(f"bad/{name}", data)
    # 16-bit grey astronaut: converted, still one face.
    grey16 = (cv2.cvtColor(skimage_rgb("astronaut"), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)
    put("grey16.png", cv2.imencode(".png", grey16)[1].tobytes())


def all_rejects(uri: str, manifest: dict) -> list[dict]:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, e["path"]))))
              for e in manifest["rejects"]["shards"]]
    return [r for t in tables for r in t.to_pylist()]


def check_faces_dataset(uri: str, manifest: dict, input_prefix: str, more_rejects: dict[str, int] | None = None,
                        more_rows: tuple[str, ...] = ()) -> None:
    rejected = {"empty": 1, "no_face": 3, "not_image": 1, "too_large": 1, "truncated": 1, **(more_rejects or {})}
    assert manifest["kind"] == "faces"
    assert manifest["counts"]["inputs"] == sum(rejected.values()) + 3 + len(more_rows)
    assert manifest["counts"]["rows"] == 3 + len(more_rows)  # grace hopper, astronaut, 16-bit grey astronaut
    assert manifest["rejects"]["by_reason"] == rejected
    rows = list(shards.ShardDataset(uri))
    assert sorted(r["key"] for r in rows) == sorted(["astronaut.png#0", "grace_hopper.jpg#0", "grey16.png#0",
                                                     *more_rows])  # keys: paths relative to the input
    for r in rows:
        assert r["image"].shape == (64, 64, 3) and r["source"].startswith(input_prefix) and len(r["box"]) == 4
    grey = next(r for r in rows if "grey16" in r["key"])["image"]
    assert (grey[..., 0] == grey[..., 1]).all()  # grey -> RGB
    by_name = {r["key"].rsplit("/", 1)[-1]: r["reason"] for r in all_rejects(uri, manifest)}
    assert by_name["cut.jpg"] == "truncated" and by_name["chelsea.png"] == "no_face"


def test_faces_from_a_local_folder(tmp_path, ray_cluster, caplog):
    src = tmp_path / "photos"

    def put(name, data):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    write_inputs(put)
    put(".DS_Store", b"\0\0\0\1Bud1")  # hidden: a reject row, never read
    os.symlink("grace_hopper.jpg", src / "hopper_link.jpg")  # a link to a file is an input
    os.symlink("missing.jpg", src / "dangling.jpg")
    os.symlink("..", src / "bad" / "up")  # a loop: its target is listed already
    # names that are not UTF-8 (an old archive's Latin-1): Python holds their bytes as surrogate escapes
    put(os.fsdecode(b"caf\xe9.jpg"), PHOTOS["grace_hopper.jpg"].read_bytes())
    put(os.fsdecode(b"notes-\xff.txt"), b"not an image")
    # 6 bad of 16 inputs (37.5%) passes a 40% cap only if hidden files, loops and faceless photos are not counted.
    cfg = BuildConfig(kind="faces", input=str(src), shard_rows=4, max_pixels=310_000, max_reject_rate=0.4)
    with caplog.at_level(logging.INFO, logger="preprocessing.build"):
        manifest = build_dataset(cfg, str(tmp_path / "ds"))
    check_faces_dataset(str(tmp_path / "ds"), manifest, str(src), more_rows=("hopper_link.jpg#0", "caf\\xe9.jpg#0"),
                        more_rejects={"hidden_file": 1, "broken_link": 1, "symlink_loop": 1, "not_image": 2})
    rows = {r["key"]: r for r in shards.ShardDataset(str(tmp_path / "ds"))}
    assert rows["caf\\xe9.jpg#0"]["source"] == f"{src}/caf\\xe9.jpg"  # its bytes written \xNN: the chunk failed on it
    rejects = {r["key"]: r for r in all_rejects(str(tmp_path / "ds"), manifest)}
    assert rejects["notes-\\xff.txt"]["reason"] == "not_image"
    assert rejects["bad/up"]["reason"] == "symlink_loop" and str(src) in rejects["bad/up"]["detail"]
    assert rejects[".DS_Store"]["detail"] == "not read" and "missing.jpg" in rejects["dangling.jpg"]["detail"]
    assert any("rejects by reason" in r.message for r in caplog.records)


def test_faces_from_s3_to_s3_and_idempotent(s3_bucket, ray_cluster):
    prefix = f"{s3_bucket}/raw/photos"
    write_inputs(lambda name, data: storage.write_bytes(f"{prefix}/{name}", data))
    storage.write_bytes(f"{prefix}/.thumbs/grace_hopper.jpg", PHOTOS["grace_hopper.jpg"].read_bytes())
    cfg = BuildConfig(kind="faces", input=prefix, shard_rows=4, max_pixels=310_000)
    out = f"{s3_bucket}/datasets/faces/v1"
    first = build_dataset(cfg, out, progress=False)
    assert storage.exists(f"{out}/manifest.json") and storage.exists(f"{out}/shards/part-00000.parquet")
    check_faces_dataset(out, first, prefix, more_rejects={"hidden_file": 1})
    assert not storage.list_uris(f"{out}/_chunks")
    second = build_dataset(cfg.model_copy(update={"overwrite": True}), out, progress=False)
    assert second["content_hash"] == first["content_hash"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(2.0)
        elif self.path.startswith("/flaky"):  # 503 once, then the photo: a retry fixes it
            _Handler.flaky_calls += 1
            if _Handler.flaky_calls == 1:
                self.send_error(503)
                return
            self.path = "/grace_hopper.jpg"
        super().do_GET()

    flaky_calls = 0


@pytest.fixture
def http_photos(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for name in ("grace_hopper.jpg", "astronaut.png", "coffee.png"):
        (root / name).write_bytes(PHOTOS[name].read_bytes())
    (root / "page.html").write_text("<html><body>not an image</body></html>")
    (root / "slow").mkdir()
    (root / "slow" / "astronaut.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    (root / "big.png").write_bytes(encode(np.zeros((2000, 2000, 3), np.uint8) + 7, ".bmp"))

    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    server = LocalHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_faces_from_a_url_list(http_photos, tmp_path, ray_cluster):
    base = http_photos
    urls = [f"{base}/grace_hopper.jpg", f"{base}/astronaut.png", f"{base}/coffee.png", f"{base}/missing.jpg",
            f"{base}/slow/astronaut.png", f"{base}/page.html", f"{base}/big.png", f"{base}/flaky.jpg",
            "http://127.0.0.1:9/refused.jpg", "ftp://example.org/x.jpg",
            # Neither is read: the local photo has a face, so reading it would give a row.
            "file:///etc/passwd", str(PHOTOS["grace_hopper.jpg"])]
    listing = tmp_path / "urls.csv"
    listing.write_text("name,url\n" + "".join(f"n{i},{u}\n" for i, u in enumerate(urls)))
    cfg = BuildConfig(kind="faces", input=str(listing), shard_rows=5, download_timeout_s=1.5, download_retries=1,
                      allow_private_hosts=["127.0.0.1"],  # the test server; every other private address is refused
                      max_download_bytes=1_000_000)
    started = time.perf_counter()
    manifest = build_dataset(cfg, str(tmp_path / "ds"), progress=False)
    assert time.perf_counter() - started < 30
    reasons = {r["key"]: (r["reason"], r["detail"]) for r in all_rejects(str(tmp_path / "ds"), manifest)}
    assert manifest["counts"]["inputs"] == 12 and manifest["counts"]["rows"] == 3, reasons
    assert reasons["file:///etc/passwd"] == ("bad_url", "scheme 'file': a URL list names http(s):// or s3:// URLs "
                                                        "only; not read")
    assert reasons[str(PHOTOS["grace_hopper.jpg"])][1].startswith("a local path: ")
    assert reasons[f"{base}/missing.jpg"][0] == "http_error" and "404" in reasons[f"{base}/missing.jpg"][1]
    assert reasons[f"{base}/slow/astronaut.png"][0] == "timeout"
    assert reasons[f"{base}/page.html"][0] == "not_image"
    assert reasons[f"{base}/big.png"][0] == "download_too_large"
    assert reasons["http://127.0.0.1:9/refused.jpg"][0] == "unreachable"
    assert reasons["ftp://example.org/x.jpg"][0] == "bad_url"
    assert reasons[f"{base}/coffee.png"][0] == "no_face"
    keys = shards.ShardDataset(str(tmp_path / "ds")).keys()
    assert sorted(keys) == sorted([f"{base}/grace_hopper.jpg#0", f"{base}/astronaut.png#0", f"{base}/flaky.jpg#0"])


def test_listing_reports_every_entry_it_does_not_read(tmp_path):
    """Links, loops, hidden and special files are listed with their reason (not dropped); keys are relative paths."""
    src, outside = tmp_path / "photos", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    (src / ".cache").mkdir()
    outside.mkdir()
    for path in (src / "a.jpg", src / "sub" / "a.png", src / ".cache" / "a.jpg", outside / "b.jpg"):
        path.write_bytes(PHOTOS["grace_hopper.jpg"].read_bytes())
    links = {"link.jpg": "sub/a.png", "gone.jpg": "nowhere.jpg", "self.jpg": "self.jpg", "sub/up": "..",
             "out": str(outside), "out_again": str(outside), "sub/out": "../out"}
    for name, target in links.items():
        os.symlink(target, src / name)
    os.mkfifo(src / "pipe")  # reading it would block forever
    got = {it.key: (it.reject[0] if it.reject else None, it.source) for it in list_items(str(src))}
    assert {k: why for k, (why, _) in got.items()} == {
        ".cache": "hidden_file", "a.jpg": None, "gone.jpg": "broken_link", "link.jpg": None, "out/b.jpg": None,
        "out_again": "symlink_loop", "pipe": "not_a_file", "self.jpg": "symlink_loop", "sub/a.png": None,
        "sub/out": "symlink_loop", "sub/up": "symlink_loop"}
    assert got["link.jpg"][1] == str(src / "link.jpg") and got["out/b.jpg"][1] == str(src / "out" / "b.jpg")


def test_a_name_that_is_not_utf8_and_one_that_spells_its_bytes_are_one_line(tmp_path):
    """A Latin-1 name's key spells its bytes \\xNN; a second file whose UTF-8 name is that spelling would give two
    inputs one key (keys name rows): a line that names them, not the listing's assertion."""
    src = tmp_path / "photos"
    src.mkdir()
    (src / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"a")
    assert [it.key for it in list_items(str(src))] == ["caf\\xe9.jpg"]
    (src / "caf\\xe9.jpg").write_bytes(b"b")
    with pytest.raises(InputError, match=re.escape(f"two file names in {src} read {'caf' + chr(92) + 'xe9.jpg'!r}")):
        list_items(str(src))


def test_missing_or_unloadable_cascade_fails_once_before_any_input_is_read(tmp_path):
    """A configuration fault, not one "error" reject per photo: raised before the input is listed or --out made."""
    out = tmp_path / "ds"
    cfg = BuildConfig(kind="faces", input=str(tmp_path / "not-listed-yet"), cascade="no_such_cascade.xml")
    with pytest.raises(MissingError, match="cascade: 'no_such_cascade.xml'"):
        build_dataset(cfg, str(out), progress=False)
    junk = tmp_path / "junk.xml"
    junk.write_text("<opencv_storage><cascade>not one</cascade></opencv_storage>")
    with pytest.raises(InputError, match=f"cascade: {junk} "):
        build_dataset(cfg.model_copy(update={"cascade": str(junk)}), str(out), progress=False)
    assert not out.exists()


def test_failure_leaves_no_manifest(tmp_path, ray_cluster):
    src = tmp_path / "junk"
    src.mkdir()
    for name, (data, _) in bad_files().items():
        (src / name).write_bytes(data)
    (src / "ok.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    with pytest.raises(BuildError, match="max_reject_rate"):
        build_dataset(BuildConfig(kind="faces", input=str(src), max_reject_rate=0.5, max_pixels=310_000),
                      str(tmp_path / "a"), progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()
    (src / "ok.png").unlink()
    with pytest.raises(BuildError, match="no usable rows"):
        build_dataset(BuildConfig(kind="faces", input=str(src)), str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert (tmp_path / "b" / "rejects" / "part-00000.parquet").exists()  # the reasons are there to read


def test_cli_build_faces_and_overwrite_refusal(tmp_path, ray_cluster, capsys):
    from dcgan.commands import build as cmd

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("grace_hopper.jpg", "chelsea.png"):
        (src / name).write_bytes(PHOTOS[name].read_bytes())
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    argv = ["build-faces", str(src), "--out", str(tmp_path / "ds"), "--min-face", "64", "--margin", "0.1",
            "--no-dedup", "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "1 rows of 64x64" in out and "no_face 1" in out
    args = parser.parse_args(argv)  # the same build again: nothing to do
    assert args.func(args) == 0 and "already built: skipped" in capsys.readouterr().out
    other = [a if a != "0.1" else "0.2" for a in argv]  # another margin is another dataset: refused over this one
    args = parser.parse_args(other)
    with pytest.raises(BuildError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args(other + ["--overwrite"])
    assert args.func(args) == 0
    manifest = shards.read_manifest(str(tmp_path / "ds"))
    assert manifest["params"]["margin"] == 0.2 and manifest["params"]["min_face"] == 64


@pytest.mark.slow
def test_dedup_integration_writes_final_shards_and_removes_staging(tmp_path, ray_cluster):
    """With dedup on: staging shards -> preprocessing.dedup.deduplicate -> out/shards + manifest; staging removed."""
    pytest.importorskip("preprocessing.dedup.dataset")
    from preprocessing.config import DedupConfig

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("a.jpg", "b.jpg"):  # the same photo twice: identical crops must collide
        (src / name).write_bytes(PHOTOS["grace_hopper.jpg"].read_bytes())
    (src / "c.png").write_bytes(PHOTOS["astronaut.png"].read_bytes())
    out = str(tmp_path / "ds")
    manifest = build_dataset(BuildConfig(kind="faces", input=str(src)), out,
                             # the paper's plain hash: three images are too few for the default's whitening
                             dedup=DedupConfig(epochs=1, batch_size=4, whiten=0, balance=0, decorrelate=0, views=1),
                             progress=False)
    assert manifest["dedup"]["method"] != "none" and manifest["dedup"]["removed"] >= 1
    assert manifest["counts"]["rows"] == 3 - manifest["dedup"]["removed"]
    assert all(s["path"].startswith("shards/") for s in manifest["shards"])
    assert not (tmp_path / "ds" / "staging").exists()
    shards.verify(out)


@pytest.mark.slow
def test_a_gpu_face_build_waits_for_an_autoscalers_gpu_then_says_it_never_came(tmp_path, ray_cluster, monkeypatch):
    """`yunet_device: cuda` on a cluster with no GPU whose autoscaler may add one (its maximum, which Ray reads from
    the autoscaler's config; here that reading is made to say so) submits the tasks and waits
    DCGAN_WORKERS_WAIT_S for a GPU: then one line, not a hang. With no autoscaler it is refused at once."""
    from preprocessing import compute
    from preprocessing.build import GpusNeverCame

    model = shared_data("yunet", "face_detection_yunet_2026may.onnx")
    src = tmp_path / "photos"
    src.mkdir()
    (src / "g.jpg").write_bytes(PHOTOS["grace_hopper.jpg"].read_bytes())
    cfg = BuildConfig(kind="faces", input=str(src), detector="yunet", detector_model=str(model), yunet_device="cuda")
    with pytest.raises(InputError, match="build.yunet_device: cuda, but the Ray cluster has 0 GPUs"):
        build_dataset(cfg, str(tmp_path / "ds"))
    monkeypatch.setattr(compute, "autoscaler_maximum", lambda: {"CPU": 64.0, "GPU": 8.0})
    monkeypatch.setenv(compute.WAIT_ENV, "2")
    t = time.perf_counter()
    with pytest.raises(GpusNeverCame, match=r"no GPU for the build's tasks within 2 s \(DCGAN_WORKERS_WAIT_S\)"):
        build_dataset(cfg, str(tmp_path / "ds"))
    assert time.perf_counter() - t < 30
