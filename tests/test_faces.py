"""Face detection and cropping on real photos that ship in packages (boxes from STACK.md)."""

from __future__ import annotations

import argparse
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from preprocessing import faces
from preprocessing.config import BuildConfig
from preprocessing.errors import InputError
from preprocessing.images import Reject, decode
from realdata import face_composites, grace_hopper_path, shared_data, skimage_path, skimage_rgb


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


KNOWN = {"grace_hopper": (grace_hopper_path(), (155, 105, 222, 222)),
         "astronaut": (skimage_path("astronaut.png"), (177, 66, 95, 95))}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_exactly_the_known_face(name):
    path, box = KNOWN[name]
    cfg = BuildConfig(kind="faces")
    rows = faces.face_rows(str(path), str(path), path.read_bytes(), cfg)
    assert len(rows) == 1
    key, img, source, found = rows[0]
    assert key == f"{path}#0" and source == str(path)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert iou(found, box) > 0.75, found
    assert min(found[2:]) >= cfg.min_face


@pytest.mark.parametrize("name", ["camera.png", "coffee.png", "chelsea.png"])
def test_no_face_in_faceless_photos(name):
    path = skimage_path(name)
    with pytest.raises(Reject) as exc:
        faces.face_rows(str(path), str(path), path.read_bytes(), BuildConfig(kind="faces"))
    assert exc.value.reason == faces.NO_FACE


def test_min_face_filters_the_small_face():
    """The astronaut's face is ~95-106 px: kept at min_face 64, gone at min_face 160."""
    data = skimage_path("astronaut.png").read_bytes()
    with pytest.raises(Reject) as exc:
        faces.face_rows("a", "a", data, BuildConfig(kind="faces", min_face=160))
    assert exc.value.reason == faces.NO_FACE and ">= 160 px" in exc.value.detail


def test_sideways_photo_with_exif_orientation_is_found_upright():
    """Pixels stored rotated, EXIF says rotate back: Haar only sees the face if the orientation is honoured."""
    rgb = decode(grace_hopper_path().read_bytes(), 10**8)
    img = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    rows = faces.face_rows("gh", "gh", buf.getvalue(), BuildConfig(kind="faces"))
    assert len(rows) == 1 and iou(rows[0][3], KNOWN["grace_hopper"][1]) > 0.7


def test_two_faces_in_one_photo_give_two_rows_in_a_stable_order():
    left = skimage_rgb("astronaut")
    right = decode(grace_hopper_path().read_bytes(), 10**8)[:512]
    both = np.concatenate([left, right], axis=1)
    data = cv2.imencode(".png", both[..., ::-1])[1].tobytes()
    rows = faces.face_rows("two", "src", data, BuildConfig(kind="faces"))
    assert [r[0] for r in rows] == ["two#0", "two#1"]
    assert sorted(r[3][0] >= 512 for r in rows) == [False, True]  # one face in each half
    assert rows[0][3][1] <= rows[1][3][1]  # top to bottom


def test_crop_square_margin_and_clamping():
    img = skimage_rgb("astronaut")
    box = (177, 66, 95, 95)
    tight = faces.crop_square(img, box, 0.0, 64)
    ref = cv2.resize(img[66:161, 177:272], (64, 64), interpolation=cv2.INTER_AREA)
    assert (tight == ref).all()
    wide = faces.crop_square(img, box, 0.25, 64)  # 95 * 1.5 = 142 px around the same centre
    c = 177 + 47.5, 66 + 47.5
    ref = cv2.resize(img[round(c[1] - 71) : round(c[1] - 71) + 142, round(c[0] - 71) : round(c[0] - 71) + 142],
                     (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(wide.astype(int) - ref).mean() < 1
    corner = faces.crop_square(img, (0, 0, 100, 100), 0.5, 64)  # moved inside the photo, not padded
    assert (corner == cv2.resize(img[:200, :200], (64, 64), interpolation=cv2.INTER_AREA)).all()


def test_pluggable_cascade_and_clear_error_for_a_bad_one(tmp_path):
    alt = cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml"
    cfg = BuildConfig(kind="faces", cascade=alt)
    data = grace_hopper_path().read_bytes()
    rows = faces.face_rows("gh", "gh", data, cfg)
    assert len(rows) == 1 and iou(rows[0][3], KNOWN["grace_hopper"][1]) > 0.6
    with pytest.raises(FileNotFoundError, match="cascade"):
        faces.detector(BuildConfig(kind="faces", cascade="no_such_cascade.xml"))
    junk = tmp_path / "junk.xml"
    junk.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="cascade"):
        faces.detector(BuildConfig(kind="faces", cascade=str(junk)))


def jpeg(rgb: np.ndarray, exif_orientation: int | None = None) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(rgb))
    exif = img.getexif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_a_large_min_face_is_searched_on_a_reduced_jpeg_decode_and_cropped_at_full_resolution():
    """min_face 128 lets Haar (face_px 48) search a JPEG decoded at 1/2 scale in libjpeg: the same face, its box in
    source pixels, the crop the full-resolution one; at min_face 64, or for a PNG, the photo is searched whole."""
    data = grace_hopper_path().read_bytes()
    full = decode(data, 10**8)
    cfg = BuildConfig(kind="faces", min_face=128, margin=0.1)
    boxes, rgb, f = faces.find_faces(data, cfg)
    assert f == 2 and rgb.shape[:2] == (full.shape[0] // 2, full.shape[1] // 2)
    assert len(boxes) == 1 and iou(boxes[0], KNOWN["grace_hopper"][1]) > 0.75, boxes
    assert iou(boxes[0], faces.find_faces(data, cfg, reduce=False)[0][0]) > 0.85
    rows = faces.face_rows("gh", "gh", data, cfg)
    assert len(rows) == 1 and (rows[0][1] == faces.crop_square(full, rows[0][3], 0.1, 64)).all()
    assert faces.find_faces(data, BuildConfig(kind="faces"))[2] == 1  # 64 / 48 < 2
    assert faces.find_faces(data, cfg.model_copy(update={"detect_stride": 1}))[2] == 1  # the exact reference
    assert faces.find_faces(cv2.imencode(".png", full[..., ::-1])[1].tobytes(), cfg)[2] == 1
    # EXIF orientation is applied by the reduced decode too: the sideways photo's face is found upright
    sideways = jpeg(np.rot90(full, 1), exif_orientation=6)
    boxes, _, f = faces.find_faces(sideways, cfg)
    assert f == 2 and len(boxes) == 1 and iou(boxes[0], KNOWN["grace_hopper"][1]) > 0.7
    with pytest.raises(Reject) as exc:  # a faceless photo says where it was searched
        faces.face_rows("c", "c", jpeg(skimage_rgb("coffee")), cfg)
    assert exc.value.reason == faces.NO_FACE and "searched at 1/2 scale" in exc.value.detail


def full_resolution(rgb: np.ndarray, min_face: int = 64) -> list[tuple[int, int, int, int]]:
    """The reference: OpenCV's detector on the photo at its native resolution, minSize = min_face."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    found = cascade.detectMultiScale(grey, 1.1, 5, minSize=(min_face, min_face))
    return sorted(tuple(int(v) for v in b) for b in found) if len(found) else []


def matched(ref, got) -> int:
    """Reference boxes matched one to one by boxes of `got` with IoU >= 0.5."""
    free, n = list(got), 0
    for r in ref:
        best = max(free, key=lambda g: iou(r, g), default=None)
        if best is not None and iou(r, best) >= 0.5:
            free.remove(best)
            n += 1
    return n


def test_detect_stride_1_is_exactly_the_full_resolution_detector():
    photos = [decode(grace_hopper_path().read_bytes(), 10**8), skimage_rgb("astronaut"), skimage_rgb("coffee")]
    photos += [cv2.resize(p, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC) for p in photos[:2]]
    photos += face_composites(2, (64, 200), seed=3)
    for min_face in (64, 100):
        det = faces.detector(BuildConfig(kind="faces", min_face=min_face, detect_stride=1))
        found = [sorted(det.detect(p, min_face)) for p in photos]
        assert found == [full_resolution(p, min_face) for p in photos]
    assert sum(map(len, found)) >= 6  # faces were there to find


def test_default_detection_keeps_the_full_resolution_faces_on_composites():
    """Faces of 64-128 px, where a search on a copy shrunk 2x (the previous default) kept 10 of these 12."""
    photos = face_composites(4, (64, 128), seed=5)
    det = faces.detector(BuildConfig(kind="faces"))
    ref = [full_resolution(p) for p in photos]
    got = [det.detect(p, 64) for p in photos]
    n_ref, hits = sum(map(len, ref)), sum(matched(r, g) for r, g in zip(ref, got))
    assert n_ref >= 10 and hits / n_ref >= 0.97, (hits, n_ref)
    assert sum(map(len, got)) == hits  # and no box the full-resolution detector does not have


def test_detect_stride_flag_and_config():
    from dcgan.commands import build as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    argv = ["build-faces", "photos", "--config", "configs/faces-64.yaml", "--out", "ds"]
    assert cmd.call_of(parser.parse_args(argv)).config.build.detect_stride == 2
    assert cmd.call_of(parser.parse_args(argv + ["--detect-stride", "1"])).config.build.detect_stride == 1
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--detect-stride", "3"])


# ------------------------------------------------------------------------------------------------ YuNet (issue 23)

YUNET = shared_data("yunet", "face_detection_yunet_2026may.onnx")
needs_yunet = pytest.mark.skipif(not YUNET.is_file(), reason=f"no YuNet model at {YUNET}: the project does not ship it; set DCGAN_SHARED_DATA to the folder holding yunet/ (see ../shared/data/yunet/README.md)")


@needs_yunet
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_yunet_finds_the_known_face_under_the_same_rules(name):
    path, box = KNOWN[name]
    cfg = BuildConfig(kind="faces", detector="yunet", detector_model=str(YUNET), margin=0.1)
    rows = faces.face_rows(str(path), str(path), path.read_bytes(), cfg)
    assert len(rows) == 1 and rows[0][1].shape == (64, 64, 3)
    assert iou(rows[0][3], box) > 0.6, rows[0][3]
    found = rows[0][3]  # the same margin rule as Haar's
    assert (rows[0][1] == faces.crop_square(decode(path.read_bytes(), 10**8), found, 0.1, 64)).all()
    with pytest.raises(Reject) as exc:  # and the same minimum size
        faces.face_rows("a", "a", path.read_bytes(), cfg.model_copy(update={"min_face": max(found[2:]) + 40}))
    assert exc.value.reason == faces.NO_FACE


@needs_yunet
@pytest.mark.parametrize("name", ["rocket.jpg", "coffee.png", "chelsea.png"])  # YuNet does find the cameraman's
def test_yunet_no_face_in_faceless_photos(name):
    path = skimage_path(name)
    with pytest.raises(Reject) as exc:
        faces.face_rows("x", "x", path.read_bytes(), BuildConfig(kind="faces", detector="yunet",
                                                                 detector_model=str(YUNET)))
    assert exc.value.reason == faces.NO_FACE


def test_yunet_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="build.detector_model: detector yunet needs"):
        BuildConfig(kind="faces", detector="yunet")
    with pytest.raises(FileNotFoundError, match="build.detector_model"):
        faces.detector(BuildConfig(kind="faces", detector="yunet", detector_model=str(tmp_path / "none.onnx")))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model" * 10)
    with pytest.raises(ValueError, match="build.detector_model: .* is not a loadable YuNet ONNX model"):
        faces.detector(BuildConfig(kind="faces", detector="yunet", detector_model=str(junk)))


@needs_yunet
def test_yunet_model_read_from_s3(s3_bucket):
    from preprocessing import storage

    uri = f"{s3_bucket}/models/yunet.onnx"
    storage.write_bytes(uri, YUNET.read_bytes())
    cfg = BuildConfig(kind="faces", detector="yunet", detector_model=uri)
    rgb = decode(grace_hopper_path().read_bytes(), 10**8)
    boxes = faces.detector(cfg).detect(rgb, 64)
    assert len(boxes) == 1 and iou(boxes[0], KNOWN["grace_hopper"][1]) > 0.6


@needs_yunet
def test_yunet_at_32_px_searches_a_half_size_jpeg_decode():
    """yunet_face_px 32 at min_face 64: the JPEG is decoded at 1/2 in libjpeg (not whole, then shrunk); the astronaut's
    face is still found, and cropped from the full-resolution photo."""
    data = jpeg(skimage_rgb("astronaut"))
    cfg = BuildConfig(kind="faces", detector="yunet", detector_model=str(YUNET), yunet_face_px=32)
    boxes, rgb, f = faces.find_faces(data, cfg)
    assert f == 2 and rgb.shape[:2] == (256, 256)
    assert len(boxes) == 1 and iou(boxes[0], KNOWN["astronaut"][1]) > 0.6, boxes
    rows = faces.face_rows("a", "a", data, cfg)
    assert (rows[0][1] == faces.crop_square(decode(data, 10**8), boxes[0], 0.0, 64)).all()


def _bgr_photos() -> list[np.ndarray]:
    """Real photos with and without faces: the benchmark photos, face composites (2-4 pasted real faces on 640-1024 px
    photos) and three of them resized to sides that are not multiples of 32 (the input padding)."""
    from realdata import face_composites, real_photos

    rgb = list(real_photos().values()) + [np.asarray(p) for p in face_composites(8, seed=3)]
    rgb += [cv2.resize(p, (333, 517), interpolation=cv2.INTER_AREA) for p in rgb[-3:]]
    return [cv2.cvtColor(p, cv2.COLOR_RGB2BGR) for p in rgb]


@needs_yunet
def test_yunet_in_torch_finds_the_faces_opencv_finds():
    """`yunet_device: cpu` (the torch runner, as on a GPU) against OpenCV's FaceDetectorYN on the same photos: the
    same faces in the same order, boxes, landmarks and scores equal up to float rounding. Fails with the padding, the
    cell order, the decoding or the NMS done otherwise."""
    found = {}
    for threshold in (0.8, 0.5):  # the default, and one that lets borderline and false faces through
        ref = faces.YuNetDetector(str(YUNET), score_threshold=threshold)
        ours = faces.YuNetDetector(str(YUNET), score_threshold=threshold, device="cpu")
        found[threshold] = 0
        for bgr in _bgr_photos():
            a, b = ref.faces(bgr), ours.faces(bgr)
            assert a.shape == b.shape, (threshold, bgr.shape, a[:, 14], b[:, 14])
            assert np.abs(a[:, :14] - b[:, :14]).max(initial=0) < 0.01
            assert np.abs(a[:, 14] - b[:, 14]).max(initial=0) < 1e-4
            found[threshold] += len(a)
    assert found[0.8] >= 15 and found[0.5] > found[0.8], found  # not a comparison of empty lists


@needs_yunet
def test_yunet_device_is_checked_and_the_rows_do_not_change(tmp_path):
    """A bad device is a config error naming the field; CUDA in a process without a GPU is a one-line error; the
    build's checks before Ray load the model on the CPU instead (the GPU is the tasks'); and the rows of a photo are
    those of OpenCV's run."""
    from preprocessing.build import preflight

    with pytest.raises(ValueError, match="yunet_device"):
        BuildConfig(kind="faces", detector="yunet", detector_model=str(YUNET), yunet_device="gpu")
    from dcgan.commands import build as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    argv = ["build-faces", "photos", "--out", "ds", "--detector", "yunet", "--detector-model", str(YUNET)]
    assert cmd.call_of(parser.parse_args(argv)).config.build.yunet_device == "opencv"
    assert cmd.call_of(parser.parse_args(argv + ["--yunet-device", "cuda"])).config.build.yunet_device == "cuda"
    cfg = BuildConfig(kind="faces", detector="yunet", detector_model=str(YUNET), yunet_device="cuda", margin=0.1)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="build.yunet_device: cuda, but this process sees no CUDA GPU"):
            faces.detector(cfg)
    preflight(cfg)  # no GPU needed where the build starts
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model" * 10)
    with pytest.raises(ValueError, match="build.detector_model: .*junk.onnx: not an ONNX model"):
        preflight(cfg.model_copy(update={"detector_model": str(junk)}))
    if not torch.cuda.is_available():  # a build task without the GPU fails whole, not with a reject per photo
        from preprocessing import build

        photos = tmp_path / "photos"
        photos.mkdir()
        (photos / "g.jpg").write_bytes(KNOWN["grace_hopper"][0].read_bytes())
        task_cfg = cfg.model_copy(update={"input": str(photos)})
        with pytest.raises(ValueError, match="build.yunet_device: cuda, but this process sees no CUDA GPU"):
            build.run_chunk(build.plan(task_cfg).chunks[0], task_cfg, str(tmp_path / "ds" / "shards"),
                            str(tmp_path / "ds"))
    path, _ = KNOWN["grace_hopper"]
    on_cpu = faces.face_rows("g", "g", path.read_bytes(), cfg.model_copy(update={"yunet_device": "cpu"}))
    opencv = faces.face_rows("g", "g", path.read_bytes(), cfg.model_copy(update={"yunet_device": "opencv"}))
    assert [r[3] for r in on_cpu] == [r[3] for r in opencv] and len(on_cpu) == 1
    assert all((a[1] == b[1]).all() for a, b in zip(on_cpu, opencv))


@needs_yunet
@pytest.mark.parametrize("edit, error", [
    (lambda b: b[: len(b) // 2], "not an ONNX model"),                          # truncated
    (lambda b: b.replace(b"MaxPool", b"MaxPoo1"), "ONNX op MaxPoo1 is not one the torch runner knows"),
    (lambda b: b.replace(b"kps_32", b"kps_3x"), r"not a YuNet model \(no output kps_32\)"),
])
def test_a_yunet_file_the_torch_runner_cannot_run_is_one_error_naming_it(tmp_path, edit, error):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(edit(YUNET.read_bytes()))
    with pytest.raises(ValueError, match=f"build.detector_model: .*bad.onnx: .*{error}"):
        faces.YuNetDetector(str(bad), device="cpu")


@needs_yunet
def test_a_damaged_yunet_file_loads_or_is_one_error_never_a_traceback(tmp_path):
    """60 copies of the model with random bytes overwritten (a third also cut short), seeded: each either loads in
    the torch runner (a damaged weight value) or is one InputError line naming the file, never another exception."""
    import random

    data, rng = YUNET.read_bytes(), random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(60):
        b = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bytes(b[: rng.randrange(len(b))] if i % 3 == 0 else b))
        try:
            faces.YuNetDetector(str(path), device="cpu")
            outcomes["loaded"] += 1
        except InputError as err:
            assert str(err).startswith(f"build.detector_model: {path}: ") and "\n" not in str(err), err
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 20, outcomes
