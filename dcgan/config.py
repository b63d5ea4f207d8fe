"""Typed configuration with the paper's defaults.

One set of pydantic models serves the CLI, the Prefect flows (as flow parameters) and the tests. Unknown keys and
impossible values fail at load time with the field named, before any Ray worker starts.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from preprocessing.config import BuildConfig, ClusterConfig, DedupConfig, Location, Resolution, Strict
from preprocessing.errors import UserError


def _check_stack(net: str, channels: list[int] | None, strides: list[int] | None, kernel: int | None,
                 kernel_size: int, resolution: int) -> None:
    """An explicit conv stack of G or D (`net`): channels and strides together, one stride per layer, each 1 (side
    kept) or 2 (side doubled in G, halved in D), a kernel that can do both, and a scale that fits the resolution."""
    if (channels is None) != (strides is None):
        raise ValueError(f"{net}_channels and {net}_strides must be given together")
    if channels is None or strides is None:
        if kernel is not None:
            raise ValueError(f"{net}_kernel_size needs {net}_channels and {net}_strides (the pyramid uses kernel_size)")
        return
    if len(channels) != len(strides) or not channels:
        raise ValueError(f"{net}_channels and {net}_strides must have the same, non-zero length")
    if any(s not in (1, 2) for s in strides):
        raise ValueError(f"{net}_strides must be 1 or 2, got {strides}")
    k = kernel_size if kernel is None else kernel
    if k not in (3, 4, 5):
        raise ValueError(f"{net}_kernel_size must be 3, 4 or 5, got {k}")
    if k % 2 == 0 and 1 in strides:
        raise ValueError(f"{net}_kernel_size {k} (kernel_size when not given) cannot keep the side at stride 1: "
                         f"use 3 or 5")
    scale = 2 ** strides.count(2)
    if net == "g" and 4 * scale != resolution:
        raise ValueError(f"g_strides take G's 4x4 projection to {4 * scale}x{4 * scale}, not resolution {resolution}: "
                         f"give {(resolution // 4).bit_length() - 1} stride-2 layers")
    if net == "d" and resolution % scale:
        raise ValueError(f"d_strides downsample by {scale}, which does not divide resolution {resolution}")


class ModelConfig(Strict):
    """The networks. Defaults are the authors' 64x64 faces/LSUN model (widths 1024..128, 5x5 kernels).

    By default G and D are strided pyramids (widths from ngf/ndf, kernel_size). An explicit conv stack replaces a
    pyramid, as in the authors' released 32x32 models: D lists each conv's output width, G each transposed conv's
    input width (the projection's first; the last conv outputs the image), so reversed, G's lists mirror D's.
    """

    resolution: Resolution = Field(64, description="image side in pixels: a power of two from 8 to 256")
    channels: int = Field(3, ge=1, le=4, description="image channels (3 = RGB)")
    z_dim: int = Field(100, ge=1, description="length of z (paper: 100)")
    z_dist: Literal["uniform", "normal"] = Field("uniform", description="uniform = the paper's U[-1, 1]; normal = "
                                                 "N(0, 1) as dcgan.torch and pytorch/examples")
    ngf: int = Field(128, ge=1, description="G width of the last hidden layer; doubles towards the projection")
    ndf: int = Field(128, ge=1, description="D width of the first layer; doubles with depth")
    kernel_size: int = Field(5, description="5 in the authors' code, 4 in dcgan.torch / pytorch examples")
    g_channels: list[PositiveInt] | None = Field(None, description="explicit G stack: the input width of each "
                                                 "transposed conv, the projection's (at 4x4) first; None = pyramid")
    g_strides: list[int] | None = Field(None, description="explicit G stack: 2 doubles the side, 1 keeps it")
    g_kernel_size: int | None = Field(None, description="explicit G stack's kernel: 3, 4 or 5 (odd with stride 1)")
    d_channels: list[PositiveInt] | None = Field(None, description="explicit D stack: the output width of each conv; "
                                                 "None = pyramid")
    d_strides: list[int] | None = Field(None, description="explicit D stack: 2 halves the side, 1 keeps it")
    d_kernel_size: int | None = Field(None, description="explicit D stack's kernel: 3, 4 or 5 (odd with stride 1)")

    @field_validator("kernel_size")
    @classmethod
    def _kernel(cls, v: int) -> int:
        if v not in (4, 5):
            raise ValueError(f"kernel_size must be 4 or 5 (stride-2 up/down-sampling by exactly 2), got {v}")
        return v

    @model_validator(mode="after")
    def _stacks(self) -> "ModelConfig":
        _check_stack("g", self.g_channels, self.g_strides, self.g_kernel_size, self.kernel_size, self.resolution)
        _check_stack("d", self.d_channels, self.d_strides, self.d_kernel_size, self.kernel_size, self.resolution)
        return self

    @property
    def n_up(self) -> int:
        """Number of fractionally-strided convolutions in the G pyramid (strided ones in D's): 4x4 -> resolution."""
        return (self.resolution // 4).bit_length() - 1


class TrainConfig(Strict):
    """Optimisation. Paper section 4: batch 128, Adam lr 2e-4, beta1 0.5, non-saturating GAN loss."""

    batch_size: int = Field(128, ge=1, description="global batch, split evenly over workers; BatchNorm statistics "
                            "and z cover the global batch, so N workers train as 1 worker would")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate (paper: 0.0002)")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (paper: 0.5; 0.9 oscillated)")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2 (Adam's default)")
    weight_decay: float = Field(0.0, ge=0, description="the authors' Theano code used 1e-5 (L2)")
    steps: int = Field(1000, ge=1, description="total training steps, one per global batch: each updates D then G, "
                       "so steps = generator updates; with alternate_updates a step updates D or G in turn, so G "
                       "gets steps / 2 (epochs = steps x batch_size / dataset rows either way)")
    alternate_updates: bool = Field(False, description="authors' quirk: update D and G on alternate minibatches")
    precision: Literal["auto", "fp32", "bf16", "fp64"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 "
                                                                "on CPU; fp64 for checks that runs agree to rounding")
    channels_last: bool | None = Field(None, description="None = on GPU only")
    compile: bool | None = Field(None, description="torch.compile the step; None = on GPU only")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (and sample grids); a lost "
                                  "node costs at most this many steps")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept in the run; older ones are removed")
    log_every: int = Field(10, ge=1, description="steps between metrics rows (metrics.csv, TensorBoard, Prefect)")
    seed: int = Field(0, description="initial weights, each epoch's shard order, and each step's z for the global "
                                     "batch from (seed, step)")
    shuffle_buffer: int = Field(4096, ge=0, description="rows shuffled at a time (seeded windows over the stream's "
                                "lanes), after a fresh seeded shard order every epoch; 0 = the shard order only")
    lanes: int | None = Field(None, ge=1, description="sub-streams of the global batch (preprocessing.stream): each "
                              "worker reads only the shards of its lanes when the worker count divides them; None = "
                              "the largest divisor of batch_size up to 8. Part of the stream: fixed for a run")


SUITES = ("samples", "walks", "arithmetic", "forgetting", "guided-backprop", "memorisation", "digits", "fid", "cifar10",
          "svhn")
"""The evaluation suites (dcgan.evaluation.report runs them in this order)."""


class EvalConfig(Strict):
    """What `dcgan evaluate` runs (see dcgan.evaluation)."""

    suites: list[str] = Field(default_factory=lambda: ["samples", "walks", "arithmetic", "memorisation"],
                              description=f"evaluation suites to run: {', '.join(SUITES)}")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in SUITES]
        if unknown:
            raise ValueError(f"unknown evaluation suites {unknown}; choose from {', '.join(SUITES)}")
        return v
    n_samples: int = Field(64, ge=1, description="images in the evaluation's sample grid")
    cifar10: Location | None = Field(None, description="your cifar-10-python.tar.gz (the cifar10 suite)")
    svhn: Location | None = Field(None, description="folder with train_32x32.mat and test_32x32.mat (svhn suite)")
    inception_weights: Location | None = Field(None, description="pytorch-fid's pt_inception-2015-12-05 "
                                                "weights (fid suite)")


class Config(Strict):
    """A whole experiment: where data and runs live, how to build the data, the model, training, evaluation."""

    name: str = Field("dcgan", description="the experiment's name: names its dataset and run under root")
    root: Location = Field("./runs", validate_default=True,
                           description="storage root URI: datasets/ and runs/ live under it (local paths are "
                                       "relative to the current directory)")
    data: Location | None = Field(None, description="dataset URI; default <root>/datasets/<name>/v1")
    run: Location | None = Field(None, description="run URI; default <root>/runs/<name>")
    build: BuildConfig | None = None
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_follows_build(cls, data: Any) -> Any:
        """A config that builds at some resolution and says nothing of the model's trains at that resolution."""
        if isinstance(data, dict) and isinstance(data.get("build"), dict) and "resolution" in data["build"]:
            model = data.get("model")
            if model is None or (isinstance(model, dict) and "resolution" not in model):
                data = {**data, "model": {**(model or {}), "resolution": data["build"]["resolution"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.train.batch_size % self.cluster.workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by cluster.workers ({self.cluster.workers})"
            )
        if self.train.lanes is not None and self.train.batch_size % self.train.lanes:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by train.lanes "
                             f"({self.train.lanes})")
        if self.build is not None and self.build.resolution != self.model.resolution:
            raise ValueError(
                f"build.resolution ({self.build.resolution}) differs from model.resolution ({self.model.resolution})"
            )
        return self

    @property
    def data_uri(self) -> str:
        return self.data or f"{self.root.rstrip('/')}/datasets/{self.name}/v1"

    @property
    def run_uri(self) -> str:
        return self.run or f"{self.root.rstrip('/')}/runs/{self.name}"


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending field."""


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line naming every offending field: `invalid config.yaml: train.steps: Input should be ...; ...`."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        problems.append(f"{loc}: {e['msg']}")
    return f"invalid {source}: " + "; ".join(problems)


def parse_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def parse_config_text(text: str, source: str) -> Config:
    """A YAML config's text -> Config; malformed YAML or a top level that is not a mapping is one clear error."""
    return parse_config(_yaml_mapping(text, source), source)


def _yaml_mapping(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections (name, root, model, train, ...)")
    return data


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Dotted overrides like {"train.steps": 10} on top of a config's mapping (None values are skipped)."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {key} is not a section in this config")
        node[leaf] = value
    return data


ENV_PREFIX = "env:"  # `--config env:NAME`: the YAML text is the value of the environment variable NAME


def load_config(path: str | Path | None = None, overrides: dict | None = None, base: Config | None = None) -> Config:
    """Load a YAML config (a path or an s3:// URI, or `base`, or the defaults), apply dotted overrides like
    {"train.steps": 10}, validate. An s3:// config lets a RayJob train from object storage (infra/kubernetes)."""
    if path is None:
        data = base.model_dump(mode="json") if base is not None else {}
        return parse_config(apply_overrides(data, overrides), "config")
    source = str(path)
    if source.startswith(ENV_PREFIX):  # a Ray Job's config travels in its environment (dcgan.stages)
        name = source[len(ENV_PREFIX):]
        if name not in os.environ:
            raise ConfigError(f"config {source}: the environment variable {name} is not set")
        text = os.environ[name]
    elif source.startswith("s3://"):
        from preprocessing import storage

        text = storage.read_text(source)  # a missing object or bucket is one line (StorageError)
    else:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if not p.is_file():
            raise ConfigError(f"{p}: is a folder, not a YAML config file")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot be read ({type(err).__name__}: {err})") from None
    return parse_config(apply_overrides(_yaml_mapping(text, source), overrides), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
