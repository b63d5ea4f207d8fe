"""Which locations and files the project may delete or overwrite: only those it wrote (layer: preprocessing).

Before the first write into a location (a dataset, a de-duplicated copy, a run), `claim` makes it ours: an empty or
missing location gets a marker object (`_dcgan.json`, written first); a location with our marker, or one that holds a
dataset/run this project committed before markers existed, is ours already; anything else is refused with one line
(`OwnershipError`, exit 2), because it holds files somebody else wrote. `--overwrite` does not change that rule: it
only lets a build replace *our* dataset, and `remove_own` deletes nothing but files named as the project names them
(`shards/part-00012.parquet`, `checkpoints/step-0000500/...`), so a user's notes inside a dataset folder survive even
an overwrite. The same holds on S3, where an empty prefix is one with no object under it.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Callable, Literal

from preprocessing import dataset_layout, storage
from preprocessing.errors import InputError, UserError

MARKER = "_dcgan.json"
Kind = Literal["dataset", "run", "demo-input"]

# What the project writes inside a location of each kind, relative to it (a run is only ever claimed, never cleaned
# by pattern: Ray Train's retention removes its old checkpoints). A demo input is `make demo`'s export of MNIST
# digits (pipelines.demo): digits/<index>-<label>.png and its stamp; digits at the top level are an older export's.
OWN_FILES: dict[str, tuple[str, ...]] = {"dataset": dataset_layout.OWN_FILES, "run": (),
                                         "demo-input": (r"digits/\d{5}-\d\.png", r"export\.txt", r"\d{5}-\d\.png")}


class OwnershipError(UserError):
    """A location that holds files this project did not write (or of another kind): it is left untouched."""


def _compiled(kind: str) -> re.Pattern:
    parts = [p + ".*" if p.endswith("/") else p for p in OWN_FILES[kind]]
    return re.compile("|".join(f"(?:{p})" for p in parts))


def is_own_file(kind: Kind, relpath: str) -> bool:
    """Whether `relpath` (relative to a location of `kind`) is named as the project names its files."""
    return relpath == MARKER or _compiled(kind).fullmatch(relpath.replace("\\", "/")) is not None


def _relative(location: str, uri: str) -> str:
    return uri[len(location.rstrip("/")) + 1:]


def contents(location: str) -> list[str]:
    """Every object under a location, hidden files and links included, relative to it, sorted."""
    location = storage.normalize(location)
    if storage.is_s3(location):
        return [_relative(location, u) for u in storage.list_uris(location)]
    root = storage.local_path(location)
    if not root.is_dir():
        return []
    out = []
    for folder, dirs, files in os.walk(root):  # does not follow links: a linked folder is one entry
        here = Path(folder)
        out += [(here / f).relative_to(root).as_posix() for f in files]
        out += [(here / d).relative_to(root).as_posix() for d in dirs if (here / d).is_symlink()]
    return sorted(out)


def _prune_emptied_dirs(location: str, removed: list[str]) -> None:
    """Remove the local folders that deleting `removed` left empty (never one that held anything else)."""
    if storage.is_s3(location):
        return
    root = storage.local_path(location)
    folders = {parent for p in removed for parent in (root / p).parents if parent != root and root in parent.parents}
    for folder in sorted(folders, key=lambda f: -len(f.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def marker_kind(location: str) -> str | None:
    """The kind recorded in the location's marker, or None when it has none (or an unreadable one)."""
    uri = storage.join(location, MARKER)
    if not storage.exists(uri):
        return None
    try:
        data = storage.read_json(uri)
    except (storage.StorageError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def claim(location: str, kind: Kind, *, legacy: Callable[[str], bool] | None = None) -> str:
    """Make `location` ours before writing into it; returns its normalized URI.

    Ours already: it has our marker of this kind, or `legacy(location)` recognises what an earlier version of the
    project committed there (the marker is then added). Claimed now: it is missing or empty. Refused otherwise.
    """
    location = storage.normalize(location)
    if not storage.is_s3(location) and storage.local_path(location).is_file():
        raise InputError(f"{location} is a file; give a folder (or s3:// prefix) for the {kind}")
    if storage.is_s3(location) and storage.split_s3(location)[1] and storage.exists(location):
        raise InputError(f"{location} is an object; give a prefix for the {kind}")
    found = marker_kind(location)
    if found == kind:
        return location
    if found is not None:
        raise OwnershipError(f"{location} holds a {found} of this project, not a {kind}; choose another location")
    others = [p for p in contents(location) if p != MARKER]
    if others and not (legacy and legacy(location)):
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OwnershipError(f"{location} holds files this project did not write ({shown}); choose an empty or new "
                             f"location for the {kind} (nothing was changed)")
    storage.check_writable(location)
    storage.write_json(storage.join(location, MARKER), {
        "kind": kind, "written_by": "dcgan-cluster",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "this location is managed by dcgan-cluster: it deletes or overwrites only files it wrote here",
    })
    return location


def remove_own(location: str, kind: Kind, under: str = "") -> int:
    """Delete the project's own files under `location` (or its subfolder `under`), never anything else, never the
    marker; returns how many went. The manifest goes first, so a dataset stops looking complete before it shrinks."""
    location = storage.normalize(location)
    if marker_kind(location) != kind:
        raise OwnershipError(f"{location} is not a {kind} this project wrote; nothing was removed")
    prefix = under.strip("/")
    mine = [p for p in contents(location) if p != MARKER and is_own_file(kind, p)
            and (not prefix or p == prefix or p.startswith(prefix + "/"))]
    mine.sort(key=lambda p: (p != dataset_layout.MANIFEST, p))
    uris = [storage.join(location, p) for p in mine]
    if mine[:1] == [dataset_layout.MANIFEST]:  # alone: a DeleteObjects removes its keys in no set order
        storage.delete_objects(uris[:1])
        uris = uris[1:]
    # the listing above found every file, so they go in DeleteObjects of 1,000 on S3, not with a listing, a HEAD and
    # a delete each (a build's chunk records, three requests a chunk at its end: issue 22)
    storage.delete_objects(uris)
    _prune_emptied_dirs(location, mine)
    return len(mine)
