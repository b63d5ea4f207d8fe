"""Typed parameters of the dataset builds and of de-duplication.

They live here, not in `dcgan`, because `preprocessing` is importable on its own; `dcgan.config.Config` embeds them.
The manifest records `model_dump()` of these, so equal parameters give equal datasets.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from preprocessing.dedup.grid import DEFAULT_VIEWS, MAX_VIEWS
from preprocessing.storage import given


def _location(uri: str) -> str:
    return given(uri, "the location")


Location = Annotated[str, AfterValidator(_location)]
"""A storage location: a local path is made absolute where the config is read (the edge), so every later step,
Ray worker or Ray Job sees the same place. An empty one is refused."""


def _power_of_two_side(v: int) -> int:
    if v <= 0 or v & (v - 1) or not 8 <= v <= 256:
        raise ValueError(f"resolution must be a power of two between 8 and 256, got {v}")
    return v


Resolution = Annotated[int, AfterValidator(_power_of_two_side)]
"""An image side: a power of two from 8 to 256 (the networks double it from 4x4)."""


class Strict(BaseModel):
    """Every config section: unknown keys and impossible values fail when the config is read, naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DedupConfig(Strict):
    """Paper section 4.1: a 3072-128-3072 denoising, dropout-regularised ReLU autoencoder on 32x32 center crops.

    What differs from the paper (docs/dedup.md, measured in benchmarks/dedup_quality.py): the encoder reads whitened
    low-frequency components (`whiten`), training adds bit-balance and decorrelation penalties (`balance`,
    `decorrelate`), and each image is hashed in `views` shifted/zoomed crops whose codes (and `probes` codes one bit
    away) propose pairs that the aligned pixels verify. The paper's plain model is `whiten: 0, balance: 0,
    decorrelate: 0, views: 1`.
    """

    enabled: bool = Field(True, description="de-duplicate after a build (`--no-dedup` turns it off)")
    crop: int = Field(32, description="side of the center crop fed to the autoencoder (3*crop*crop inputs)")
    code_bits: int = Field(128, ge=8, le=1024, description="code units = bits of the semantic hash (paper: 128)")
    epochs: int = Field(10, ge=1, description="autoencoder training epochs over the dataset being de-duplicated (over "
                        "its `train_images` sample when it is larger)")
    train_images: int | None = Field(50_000, ge=1, description="the autoencoder trains on at most this many images, "
                                     "every k-th row of shards spread over the dataset (with views only those "
                                     "shards are read for it), so its cost stops growing with the dataset (3M "
                                     "images: 60x less); every image is still hashed (null = train on all)")
    batch_size: int = Field(256, ge=1, description="autoencoder training batch size")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the autoencoder")
    input_noise: float = Field(0.1, ge=0, description="std of the Gaussian corruption of the denoising AE")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout on the code units while training (paper: "
                                                        "dropout-regularised)")
    whiten: int = Field(32, ge=0, description="PCA components of the 2x2-pooled crop the encoder reads, whitened "
                                              "(0 = raw pixels, as the paper); folded into the saved 3072-128 encoder")
    balance: float = Field(1.0, ge=0, description="weight of the penalty pushing each bit to be on for half the "
                                                  "images (0 = the paper's plain objective)")
    decorrelate: float = Field(1.0, ge=0, description="weight of the penalty on correlation between code bits (0 = "
                                                      "the paper's plain objective)")
    views: int = Field(DEFAULT_VIEWS, ge=1, le=MAX_VIEWS, description="crops hashed per image: 1 = the paper's single "
                       "center-crop hash; more = also crops shifted by up to 4 px (9/25/49/81 = up to 1/2/3/4 px) and "
                       "zoomed by 2-8 px (135 = all), at 2x the crop's resolution; a shared code proposes a pair, "
                       "the aligned pixels decide (finds 1-4 px shifts and re-crops; see docs/dedup.md)")
    probes: int = Field(2, ge=0, le=8, description="with views > 1: each view also proposes its code with one of "
                        "its `probes` least certain bits flipped (multi-probe hashing: a copy whose code is one bit "
                        "away still meets its original; the pixels still decide); 0 = equal codes only")
    radius: int = Field(0, ge=0, description="Hamming radius; 0 = identical codes only (linear time)")
    max_removed: float = Field(0.5, ge=0, le=1, description="fail, writing nothing, when more than this fraction "
                               "of the rows would be removed (the paper removed ~9% of LSUN bedrooms)")
    seed: int = Field(0, description="seed of the autoencoder's initialisation, noise and batch order")


class BuildConfig(Strict):
    """How raw inputs become a sharded dataset (build-lsun and build-faces share it)."""

    kind: Literal["center-crop", "faces"] = Field(
        "center-crop", description="center-crop: each image's largest centred square, resized (LSUN scenes, ImageNet, "
                                   "any folder or LMDB of images: the paper's build-lsun); faces: OpenCV face boxes "
                                   "cropped square (build-faces)")
    @field_validator("kind", mode="before")
    @classmethod
    def _lsun_is_center_crop(cls, v):
        return "center-crop" if v == "lsun" else v  # the name configs and manifests used before

    input: Location | None = Field(None, description="LMDB dir, image folder, s3:// prefix or URL list file")
    resolution: Resolution = Field(64, description="side of the stored square images, in pixels")
    limit: int | None = Field(None, ge=1, description="read at most this many inputs")
    shard_rows: int = Field(2048, ge=1, description="rows per shard file")
    max_reject_rate: float = Field(1.0, ge=0, le=1, description="fail the build if more inputs than this are rejected")
    max_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb cap on width*height")
    overwrite: bool = Field(False, description="replace an existing dataset at the output (only one this project "
                            "wrote; other files are refused, never deleted)")
    # faces
    min_face: int = Field(64, ge=1, description="smallest detected face side kept, in source pixels")
    margin: float = Field(0.0, ge=0, le=1, description="extra context around a face box, as a fraction of its side")
    detector: Literal["haar", "yunet"] = Field("haar", description="face detector: haar = OpenCV's Haar cascade "
                                               "(the paper's era; `cascade`), yunet = OpenCV's YuNet CNN "
                                               "(cv2.FaceDetectorYN; `detector_model`), more accurate and faster")
    detector_model: Location | None = Field(None, description="the YuNet ONNX file for `detector: yunet` (local path "
                                            "or s3://; you supply it, the project never downloads one)")
    yunet_face_px: int = Field(64, ge=16, le=256, description="YuNet searches a min_face face at this side, on a copy "
                               "of the photo shrunk to it (never enlarged; a JPEG decoded at 1/2-1/8 scale by libjpeg "
                               "where that reaches it): 32 is ~3.5-4.5x faster and misses more small faces "
                               "(benchmarks/face_detect.py --detectors)")
    yunet_device: str = Field("opencv", pattern=r"^(opencv|cpu|cuda)$", description="where YuNet runs: "
                              "opencv = OpenCV's DNN on the task's CPU (cv2.FaceDetectorYN); cuda (or cpu) = "
                              "the same ONNX graph in torch on that device, with FaceDetectorYN's decoding and NMS "
                              "(the same faces up to float rounding: a face scored at the threshold may go either "
                              "way); with cuda each build task asks Ray for `yunet_gpus` of a GPU")
    yunet_gpus: float = Field(0.125, gt=0, le=1, description="the share of a GPU each build task asks Ray for when "
                              "yunet_device is cuda (0.125: eight tasks a GPU, as many as the CPUs of a typical "
                              "8-GPU node allow); unmeasured on a GPU so far")
    cascade: str = Field("haarcascade_frontalface_default.xml", description="file under cv2.data.haarcascades or a path")
    scale_factor: float = Field(1.1, gt=1, description="cascade pyramid step between scales (detectMultiScale)")
    min_neighbors: int = Field(5, ge=0, description="overlapping detections a face needs (detectMultiScale); "
                               "higher = fewer false faces")
    detect_stride: Literal[1, 2] = Field(2, description="cascade search: 1 = OpenCV's detectMultiScale at full "
                                         "resolution, every window; 2 = every other window of the same pyramid "
                                         "first, then every window around each hit (same boxes, faster; from "
                                         "min_face 96 on a JPEG decoded at 1/2-1/8 scale, where min_face stays "
                                         ">= 48 px)")
    # URL lists
    download_concurrency: int = Field(16, ge=1, description="parallel downloads per build task (URL lists)")
    download_timeout_s: float = Field(10.0, gt=0, description="seconds before a download attempt is abandoned")
    download_retries: int = Field(2, ge=0, description="retries of a failed download before it is a reject")
    max_download_bytes: int = Field(20_000_000, ge=1, description="larger downloads are rejected, not read")
    allow_private_hosts: list[str] = Field(default_factory=list, description="host names or CIDR ranges (e.g. "
                                           "mirror.internal, 10.0.0.0/8) that URL lists may reach although private, "
                                           "loopback or link-local; every other such address is refused")
    max_redirects: int = Field(5, ge=0, description="redirects a download may follow (each hop is checked)")
    contact: str = Field("", description="a URL or e-mail address put in the User-Agent (`dcgan-cluster/0.1 (DCGAN "
                         "dataset build; +contact)`) so site owners can reach whoever runs the build")
    robots_txt: bool = Field(True, description="honour each host's robots.txt (RFC 9309; fetched once per host and "
                             "worker process); a disallowed URL is a `robots` reject")
    opt_out_tags: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
                                    description="X-Robots-Tag directives that skip a response, read from its headers "
                                    "before the body (an `opt_out` reject; [] = none)")
    host_concurrency: int = Field(4, ge=1, description="downloads in flight per host, over the whole build (all its "
                                  "tasks on all nodes)")
    host_rate: float = Field(10.0, ge=0, description="requests started per second per host, over the whole build "
                             "(0 = no limit)")
    max_retry_wait_s: float = Field(30.0, ge=0, description="longest wait a 429/503 (its Retry-After, or 1, 2, 4 ... "
                                    "s) is given; a host asking for more is a `rate_limited` reject")

    @model_validator(mode="after")
    def _yunet_needs_its_model(self):
        if self.detector == "yunet" and not self.detector_model:
            raise ValueError("build.detector_model: detector yunet needs the YuNet ONNX file (a local path or s3://)")
        return self

    @field_validator("allow_private_hosts")
    @classmethod
    def _hosts_or_ranges(cls, v: list[str]) -> list[str]:
        import ipaddress
        import re

        for entry in v:
            e = str(entry).strip().strip("[]")
            try:
                ipaddress.ip_network(e, strict=False)
            except ValueError:
                if not re.fullmatch(r"(?i)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?", e):
                    raise ValueError(f"{entry!r} is neither a host name nor an address or CIDR range") from None
        return v


class ClusterConfig(Strict):
    """Where Ray Train runs. `address` None = RAY_ADDRESS or a local in-process Ray."""

    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU); cross-replica BatchNorm when > 1")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); CPU workers use gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker (input decoding "
                                   "runs in the worker: ~1.2 cores per H100 at 64px)")
    address: str | None = Field(None, description="where stages run: http(s)://HEAD:8265 = a Ray Job, auto or "
                                "HOST:PORT = join that cluster; None = RAY_ADDRESS, else a local Ray")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers: PACK fills a node's GPUs first (fast NVLink, fewer nodes); "
                            "SPREAD uses as many nodes as it can; STRICT_* refuse to start otherwise (and wait for a "
                            "replacement node after a node is lost)")
    max_failures: int = Field(3, ge=0, description="worker/node failures Ray Train recovers from by resuming")
    pass_credentials: bool = Field(False, description="pass this machine's AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN to "
                                   "Ray Jobs (readable by anyone with Jobs API access); by default the cluster's "
                                   "nodes use their own credentials (environment, profile, instance or pod role)")
    submit: Literal["jobs-api", "rayjob"] = Field(
        "jobs-api", description="how a cluster runs `train`: jobs-api = a Ray Job on the standing cluster at address / "
                                "RAY_ADDRESS; rayjob = a KubeRay RayJob (a cluster for this run, deleted after) created "
                                "through the Kubernetes API from infra/kubernetes/rayjob-train.yaml")
    image: str | None = Field(None, description="container image of a rayjob's pods (default: the template's)")
