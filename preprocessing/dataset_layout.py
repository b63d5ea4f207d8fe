"""Where a dataset keeps its files (layer: preprocessing): every name under <dataset>/ is spelled here.

    <dataset>/manifest.json               written last: present (and readable) == complete
    <dataset>/shards/part-NNNNN.parquet   the rows (preprocessing.shards has the schema)
    <dataset>/rejects/part-NNNNN.parquet  inputs that failed, each with its reason
    <dataset>/stats/part-NNNNN.json       one build chunk's figures: inputs, rows, rejects by reason, bytes, seconds
    <dataset>/dedup/                      the hashing model, its report and a picture of collisions
    <dataset>/_chunks/part-NNNNN.json     a finished build chunk (resume state; removed when the build commits)
    <dataset>/staging/                    the build's shards before de-duplication (removed when it commits)
    <dataset>/_dcgan.json                 the project's ownership marker (preprocessing.ownership)
    <dataset>/_lease.json                 who writes the dataset now (preprocessing.lease): present only while a
                                          build or dedup writes it; never removed by pattern (`OWN_FILES`), only by
                                          its holder or the next writer once it expired
"""

from __future__ import annotations

from preprocessing.storage import join

MANIFEST = "manifest.json"
CHUNKS = "_chunks"
STAGING = "staging"
DEDUP = "dedup"
STATS = "stats"

_PART = r"part-\d{5}\.(parquet|json)"
# What the project writes inside a dataset, relative to it; a pattern ending in "/" owns its whole subtree (files
# written by Ray Train or a staged build, whose names are not ours to predict). Anything else is somebody else's.
OWN_FILES = (
    r"manifest\.json", rf"shards/{_PART}", rf"rejects/{_PART}", rf"{CHUNKS}/{_PART}", rf"{STATS}/{_PART}",
    r"dedup/(model\.pt|report\.json|collisions\.png)", r"dedup/_train/", rf"{STAGING}/",
)


def part(index: int, folder: str = "shards") -> str:
    """The relative path of part `index` of a folder (shards, rejects): `shards/part-00012.parquet`."""
    return f"{folder}/part-{index:05d}.parquet"


def rejects(dataset: str) -> str:
    """The folder of the reject shards (each input that failed, with its reason)."""
    return join(dataset, "rejects")


def chunk_state(dataset: str, index: int) -> str:
    return join(dataset, CHUNKS, f"part-{index:05d}.json")


def stats(index: int) -> str:
    """The relative path of build chunk `index`'s figures: `stats/part-00012.json`."""
    return f"{STATS}/part-{index:05d}.json"


def manifest(dataset: str) -> str:
    return join(dataset, MANIFEST)


def lease(dataset: str) -> str:
    return join(dataset, "_lease.json")


# The dedup step's files, relative to the dataset (the manifest's `dedup` section names them so)
DEDUP_MODEL, DEDUP_REPORT, DEDUP_PICTURE = f"{DEDUP}/model.pt", f"{DEDUP}/report.json", f"{DEDUP}/collisions.png"


def dedup_model(dataset: str) -> str:
    """The hashing autoencoder's weights (a plain tensor dict)."""
    return join(dataset, DEDUP_MODEL)


def dedup_report(dataset: str) -> str:
    return join(dataset, DEDUP_REPORT)


def dedup_collisions(dataset: str) -> str:
    """The picture of some duplicate groups (kept member framed green, removed ones red)."""
    return join(dataset, DEDUP_PICTURE)


def dedup_training(dataset: str) -> str:
    """Ray Train's own files while the autoencoder trains for an s3:// dataset (removed after)."""
    return join(dataset, DEDUP, "_train")
