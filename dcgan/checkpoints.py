"""Checkpoints of a run on any storage URI: <run>/checkpoints/step-NNNNNNN/{state.pt, COMPLETE}.

`state.pt` holds G, D, both optimizers, the step, the RNG state, the fixed sample z and the config, using only types
that `torch.load(weights_only=True)` accepts (no pickled classes). The `COMPLETE` marker is written after the state
and names its size and sha256, so a checkpoint cut off mid-upload is never taken for the newest one.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any

import torch

from dcgan.config import Config, parse_config
from dcgan.networks import Discriminator, Generator
from preprocessing import storage
from preprocessing.errors import UserError

STEP_DIR = re.compile(r"checkpoints/step-(\d{7,})/COMPLETE$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the architecture asked for."""


def checkpoint_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, "checkpoints", f"step-{step:07d}")


def complete_steps(run_uri: str) -> list[int]:
    """Steps of every checkpoint whose COMPLETE marker exists, ascending."""
    steps = []
    for uri in storage.list_uris(storage.join(run_uri, "checkpoints"), suffix="COMPLETE"):
        m = STEP_DIR.search(uri.replace("\\", "/"))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(run_uri: str) -> int | None:
    steps = complete_steps(run_uri)
    return steps[-1] if steps else None


def save(run_uri: str, step: int, state: dict[str, Any]) -> str:
    """Write state.pt, then the COMPLETE marker; returns the checkpoint URI."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    uri = checkpoint_uri(run_uri, step)
    storage.write_bytes(storage.join(uri, "state.pt"), data)
    storage.write_json(
        storage.join(uri, "COMPLETE"), {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    return uri


def prune(run_uri: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints (and any incomplete older ones); returns removed steps."""
    steps = complete_steps(run_uri)
    removed = steps[:-keep] if keep > 0 else steps
    for s in removed:
        uri = checkpoint_uri(run_uri, s)
        storage.delete_prefix(storage.join(uri, "COMPLETE"))  # unmark first: a crash mid-delete leaves no half "complete"
        storage.delete_prefix(uri)
    return removed


def load_state(run_uri: str, step: int | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict of a complete checkpoint (the newest if `step` is None), checked against its marker."""
    if step is None:
        step = latest_step(run_uri)
        if step is None:
            raise CheckpointError(f"{run_uri}: no complete checkpoint under checkpoints/")
    uri = checkpoint_uri(run_uri, step)
    try:
        marker = storage.read_json(storage.join(uri, "COMPLETE"))
        data = storage.read_bytes(storage.join(uri, "state.pt"))
    except storage.StorageError as err:
        raise CheckpointError(f"checkpoint step {step} of {run_uri} is not complete: {err}") from None
    if len(data) != marker["bytes"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise CheckpointError(f"{uri}/state.pt: size or sha256 differs from its COMPLETE marker (corrupt)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


@dataclass
class LoadedRun:
    generator: Generator
    discriminator: Discriminator
    config: Config
    step: int
    state: dict[str, Any]


def load_models(run_uri: str, step: int | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """G and D of a run's checkpoint, built from the config stored with it."""
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
