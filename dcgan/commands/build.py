"""`dcgan build-lsun` and `dcgan build-faces`: raw inputs -> a sharded, de-duplicated dataset with a manifest.

Parameters come from a config's `build:`/`dedup:` sections (`--config`), each flag overriding one field; `--out` is
the config's dataset location (`data`). Exit status 0 with a summary, or 2 with one line naming what was wrong.

Layer: dcgan.
"""

from __future__ import annotations

import argparse

from dcgan.commands import add_config_flags, config_of, finish


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", dest="data", help="dataset location (local path or s3://bucket/prefix): manifest.json and "
                                              "shards/ go here (default: the config's <root>/datasets/<name>/v1)")
    add_config_flags(p)
    p.add_argument("--resolution", type=int, dest="build.resolution", help="side of the stored images (default 64)")
    p.add_argument("--limit", type=int, dest="build.limit", help="use at most N inputs (the first N by key)")
    p.add_argument("--shard-rows", type=int, dest="build.shard_rows", help="inputs per chunk/shard (default 2048)")
    p.add_argument("--max-reject-rate", type=float, dest="build.max_reject_rate",
                   help="fail if more than this fraction of inputs is bad (default 1.0)")
    p.add_argument("--max-pixels", type=int, dest="build.max_pixels",
                   help="decompression-bomb cap on width*height, checked before decoding (default 50,000,000)")
    p.add_argument("--overwrite", action="store_true", default=None, dest="build.overwrite",
                   help="replace a dataset this project built at --out (files it did not write are never touched)")
    p.add_argument("--no-dedup", action="store_false", default=None, dest="dedup.enabled",
                   help="skip the autoencoder de-duplication (paper section 4.1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def register(sub) -> None:
    lsun = sub.add_parser("build-lsun", aliases=["build-center-crop"],
                          help="LSUN LMDB (or any folder of images) -> center-cropped sharded dataset",
                          description="Decode, center-crop and resize an LSUN LMDB, a folder or an s3:// prefix of "
                                      "images into a sharded dataset (paper section 4.1), de-duplicated by default.")
    lsun.add_argument("input", metavar="LMDB_OR_DIR", nargs="?", help="LMDB directory, image folder or s3:// prefix "
                      "(default: the config's build.input)")
    _common(lsun)
    lsun.set_defaults(func=run, stage="build-lsun")

    faces = sub.add_parser("build-faces", help="photos (folder, s3:// prefix or URL list) -> face crops dataset",
                           description="Detect faces with OpenCV in photos, keep the high-resolution ones, crop them "
                                       "square and shard them (paper section 4.2), de-duplicated by default.")
    faces.add_argument("input", metavar="INPUT", nargs="?",
                       help="folder, s3:// prefix, or .txt/.csv/.parquet list of http(s):// or s3:// URLs")
    _common(faces)
    faces.add_argument("--min-face", type=int, dest="build.min_face",
                       help="smallest face side kept, in source pixels (default 64)")
    faces.add_argument("--margin", type=float, dest="build.margin",
                       help="context around a face, as a fraction of its side on each side (default 0)")
    faces.add_argument("--detector", choices=("haar", "yunet"), dest="build.detector",
                       help="haar (default, the paper's OpenCV cascade) or yunet (OpenCV's CNN; needs --detector-model)")
    faces.add_argument("--detector-model", dest="build.detector_model",
                       help="the YuNet ONNX file for --detector yunet (local path or s3://; you supply it)")
    faces.add_argument("--yunet-device", dest="build.yunet_device",
                       help="where YuNet runs: opencv (default, OpenCV's DNN on the CPU) or cuda (the same model in "
                            "torch on a GPU; each build task asks Ray for build.yunet_gpus of one)")
    faces.add_argument("--cascade", dest="build.cascade",
                       help="cascade name under cv2.data.haarcascades, a cascade XML file, or a YuNet .onnx model")
    faces.add_argument("--scale-factor", type=float, dest="build.scale_factor",
                       help="Haar detector's pyramid step (default 1.1)")
    faces.add_argument("--min-neighbors", type=int, dest="build.min_neighbors",
                       help="Haar detector's neighbour votes for a face (default 5)")
    faces.add_argument("--detect-stride", type=int, choices=(1, 2), dest="build.detect_stride",
                       help="1: OpenCV's detectMultiScale at full resolution, every window (exact); 2 (default): "
                            "every other window first, then every window around each hit (the same boxes, "
                            "under 0.5%% of the faces lost, 1.6-2.6x faster)")
    faces.add_argument("--download-concurrency", type=int, dest="build.download_concurrency",
                       help="parallel downloads per build task for URL lists (default 16)")
    faces.add_argument("--download-timeout", type=float, dest="build.download_timeout_s",
                       help="seconds one download attempt may take in all (default 10)")
    faces.add_argument("--download-retries", type=int, dest="build.download_retries",
                       help="retries of a download that failed transiently (default 2)")
    faces.add_argument("--max-download-bytes", type=int, dest="build.max_download_bytes",
                       help="largest download accepted, in bytes (default 20,000,000)")
    faces.set_defaults(func=run, stage="build-faces")


def call_of(args):
    from dcgan.stages import StageCall

    from dcgan.stages import BUILD_KINDS

    extra = {"build.kind": BUILD_KINDS[args.stage]}
    if args.input:
        extra["build.input"] = args.input
    cfg = config_of(argparse.Namespace(**{**vars(args), **extra}))
    return StageCall(args.stage, cfg, {"progress": not args.quiet})


def summary(r: dict) -> str:
    c = r["counts"]
    lines = [f"{r['kind']} dataset at {r['dataset']}: {c['rows']} rows of {r['resolution']}x{r['resolution']} in "
             f"{r['shards']} shards from {c['inputs']} inputs; {c.get('duplicates_removed', 0)} duplicates removed; "
             f"content hash {str(r['content_hash'])[:16]}" + (" (already built: skipped)" if r["skipped"] else "")]
    if r["rejects"]:
        lines.append("rejects by reason: " + ", ".join(f"{k} {v}" for k, v in r["rejects"].items()))
    return "\n".join(lines)


def run(args) -> int:
    return finish(args, call_of(args), summary)
