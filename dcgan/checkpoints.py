"""Checkpoints of a run on any storage URI: <run>/checkpoints/step-NNNNNNN/{state.pt, COMPLETE}.

`state.pt` holds G, D, both optimizers, the step, the RNG state, the fixed sample z and the config, using only types
that `torch.load(weights_only=True)` accepts (no pickled classes). The `COMPLETE` marker names its size and sha256,
so a checkpoint cut off mid-upload is never taken for a valid one. Training writes them through Ray Train
(`write_dir`, then `ray.train.report`), which uploads them and keeps the newest `train.keep_checkpoints`.

Layer: dcgan.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcgan import run_layout
from dcgan.config import Config, parse_config
from preprocessing import storage
from preprocessing.errors import UserError, naming_no_space

if TYPE_CHECKING:  # torch is imported where a checkpoint is written or loaded: asking which steps exist needs none
    import torch

    from dcgan.networks import Discriminator, Generator

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"checkpoints/step-(\d{7,})/COMPLETE$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the architecture asked for."""


def complete_steps(run_uri: str) -> list[int]:
    """Steps of every checkpoint whose COMPLETE marker exists, ascending (valid or not: see `valid_steps`)."""
    steps = []
    for uri in storage.list_uris(run_layout.checkpoints(run_uri), suffix=run_layout.MARKER_FILE):
        m = STEP_DIR.search(uri.replace("\\", "/"))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def surplus_steps(run_uri: str, keep: int, valid: int | None = None) -> list[int]:
    """The complete checkpoints a run holds beyond its newest `keep`, but never `valid` (the run's newest valid one,
    kept whatever its age where newer ones are corrupt): what the trainer removes, under the run's lease."""
    return [step for step in complete_steps(run_uri)[:-keep] if step != valid]


def _marker(uri: str) -> dict[str, Any]:
    """A checkpoint's COMPLETE marker, checked for the fields it must have; CheckpointError otherwise."""
    try:
        marker = storage.read_json(run_layout.checkpoint_marker(uri))
    except storage.StorageUnreachable:
        raise  # the store is failing, not this file: transient, retried
    except storage.StorageError as err:
        raise CheckpointError(f"{uri}: not complete ({err})") from None
    except ValueError:
        raise CheckpointError(f"{uri}/COMPLETE: not a valid marker (empty or not JSON)") from None
    if not (isinstance(marker, dict) and isinstance(marker.get("bytes"), int)
            and isinstance(marker.get("sha256"), str)):
        raise CheckpointError(f"{uri}/COMPLETE: not a valid marker (needs bytes and sha256)")
    return marker


def check(run_uri: str, step: int) -> dict[str, Any]:
    """The cheap checks of one checkpoint (marker readable, state.pt present with the marker's size)."""
    uri = run_layout.checkpoint(run_uri, step)
    marker = _marker(uri)
    size = storage.size(run_layout.checkpoint_state(uri))
    if size is None:
        raise CheckpointError(f"{uri}/state.pt is missing")
    if size != marker["bytes"]:
        raise CheckpointError(f"{uri}/state.pt: {size:,} bytes, its COMPLETE marker says {marker['bytes']:,} (cut off)")
    return marker


def valid_steps(run_uri: str) -> list[int]:
    """Steps of the checkpoints that pass the cheap checks (no sha256: see `latest_step`), ascending."""
    out = []
    for step in complete_steps(run_uri):
        try:
            check(run_uri, step)
            out.append(step)
        except CheckpointError:
            continue
    return out


def resume_state(run_uri: str) -> dict[str, Any] | None:
    """What a run resumes from: the newest valid checkpoint's state (`load_state`), or None for a run with no
    checkpoint, or whose every checkpoint is a write that never finished (state.pt missing or shorter than its
    marker says: the disk filled up, the upload was cut off). Those hold no progress, so the run starts again at
    step 0 (one warning; they stay in place until new checkpoints replace them) rather than refusing the same command
    that stopped it. A checkpoint written whole that fails its checksum is damage: `load_state` refuses that."""
    steps = complete_steps(run_uri)
    if not steps:
        return None
    if not valid_steps(run_uri):
        log.warning("%s: no checkpoint was written whole (step %s: state.pt missing or cut off, left in place): "
                    "starting at step 0", run_uri, ", ".join(map(str, steps)))
        return None
    return load_state(run_uri)


_told: set[str] = set()  # the corrupt checkpoints this process has told of


def _skip(err: CheckpointError) -> None:
    """Each corrupt checkpoint is told of once in a command: one that asks where the run stands and then loads it
    (an evaluation's done-check, then its models) told of it twice. `forget_told` starts a new command's count."""
    if str(err) not in _told:
        _told.add(str(err))
        log.warning("skipping a corrupt checkpoint (left in place): %s", err)


def forget_told() -> None:
    """A new command or stage in this process (a flow runs several): its corrupt checkpoints are told of again."""
    _told.clear()


def latest_step(run_uri: str) -> int | None:
    """The newest checkpoint whose content passes its checks (size and sha256, as `load_state` checks it), with the
    same fallback: a corrupt newer one is reported in one warning line and the one before it counts. Run completion
    and the resume step use this, so a same-size corruption of the final checkpoint is not taken for a finished run."""
    for step in reversed(complete_steps(run_uri)):
        try:
            _verified_bytes(run_uri, step)
            return step
        except CheckpointError as err:
            _skip(err)
    return None


def _encode(step: int, state: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return data, {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save(run_uri: str, step: int, state: dict[str, Any]) -> str:
    """Write state.pt, then the COMPLETE marker, straight to the run; returns the checkpoint URI."""
    data, marker = _encode(step, state)
    uri = run_layout.checkpoint(run_uri, step)
    storage.write_bytes(run_layout.checkpoint_state(uri), data)
    storage.write_json(run_layout.checkpoint_marker(uri), marker)
    return uri


def write_dir(folder: str | Path, step: int, state: dict[str, Any]) -> Path:
    """A checkpoint in a local folder (state.pt and its COMPLETE marker), for Ray Train to upload into the run;
    however the upload orders the two files, a cut-off one fails the marker's size/sha256 checks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, marker = _encode(step, state)
    with naming_no_space(str(folder)):  # a full temporary disk
        (folder / run_layout.STATE_FILE).write_bytes(data)
        (folder / run_layout.MARKER_FILE).write_text(json.dumps(marker))
    return folder


def _verified_bytes(run_uri: str, step: int) -> bytes:
    """A checkpoint's state.pt, after the cheap checks and its size and sha256 against the marker."""
    uri = run_layout.checkpoint(run_uri, step)
    marker = check(run_uri, step)
    try:
        data = storage.read_bytes(run_layout.checkpoint_state(uri))
    except storage.StorageUnreachable:
        raise  # the store is failing, not this checkpoint: transient, retried (taken for corrupt, the run would
        #        resume from an older one and train its newer steps again)
    except storage.StorageError as err:
        raise CheckpointError(f"{uri}/state.pt: {err}") from None
    if len(data) != marker["bytes"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise CheckpointError(f"{uri}/state.pt: size or sha256 differs from its COMPLETE marker (corrupt)")
    return data


def _load_step(run_uri: str, step: int, map_location) -> dict[str, Any]:
    import torch

    uri = run_layout.checkpoint(run_uri, step)
    data = _verified_bytes(run_uri, step)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file whose checksum matched: still a bad checkpoint
        raise CheckpointError(f"{uri}/state.pt: cannot be loaded ({type(err).__name__})") from None


def load_state(run_uri: str, step: int | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict of a checkpoint, checked against its marker (size and sha256).

    With `step`, exactly that checkpoint (CheckpointError if it is missing or corrupt). Without, the newest valid
    one: a corrupt newer checkpoint is reported in one warning line and left in place, and the one before it is used.
    """
    if step is not None:
        if step not in complete_steps(run_uri):
            have = ", ".join(map(str, complete_steps(run_uri))) or "none"
            raise CheckpointError(f"{run_uri}: no checkpoint at step {step} (complete checkpoints: {have})")
        return _load_step(run_uri, step, map_location)
    steps = complete_steps(run_uri)
    if not steps:
        if not storage.exists(run_uri) and not storage.list_uris(run_uri):
            raise CheckpointError(f"{run_uri}: no such run")
        raise CheckpointError(f"{run_uri}: no complete checkpoint under checkpoints/ (has the run trained yet?)")
    for s in reversed(steps):
        try:
            return _load_step(run_uri, s, map_location)
        except CheckpointError as err:
            _skip(err)
    raise CheckpointError(f"{run_uri}: every checkpoint ({', '.join(map(str, steps))}) is corrupt; see the warnings")


@dataclass
class LoadedRun:
    generator: Generator
    discriminator: Discriminator
    config: Config
    step: int
    state: dict[str, Any]


def load_models(run_uri: str, step: int | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """G and D of a run's checkpoint, built from the config stored with it."""
    from dcgan.networks import Discriminator, Generator

    state = load_state(run_uri, step, map_location=device)
    cfg = parse_config(state["config"], source=f"{run_uri} checkpoint config")
    g, d = Generator(cfg.model), Discriminator(cfg.model)
    try:
        g.load_state_dict(state["generator"])
        d.load_state_dict(state["discriminator"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{run_uri} step {state['step']}: weights do not fit the config's networks: {first}") from None
    return LoadedRun(g.to(device), d.to(device), cfg, int(state["step"]), state)
