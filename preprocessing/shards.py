"""The dataset contract: Parquet shards of training-resolution pixels, committed by a manifest written last.

Layout: preprocessing/dataset_layout.py (<dataset>/manifest.json, shards/part-NNNNN.parquet, rejects/, dedup/).
Rows: key (stable id), image (the training-resolution RGB pixels, uint8 HxWx3 in C order, so training never decodes),
source, box (face box in source pixels, null for LSUN), hash (the dedup code, null until de-duplicated).
The pixels are stored as one fixed-size binary value per row, the shape in the field's metadata ("shape": "H,W,C"):
Parquet encodes a fixed-shape tensor column as a nested list with one repetition level per byte, which made writing
10x and reading 20x slower than the decode itself; a fixed-size binary column is one memcpy each way. Readers trust only what
the manifest lists, and check row counts, sizes and sha256, so a crash never leaves a half dataset that looks whole.

Layer: preprocessing. Longer than most modules because it is the whole dataset contract: the writer, the
reader and the manifest checks of one format, kept in one file so they cannot drift apart.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import dataset_layout, storage
from preprocessing.errors import UserError

SCHEMA_VERSION = 1
CODE_VERSION = "0.1.0"


class DatasetError(UserError, RuntimeError):
    """A dataset that is missing, incomplete, or disagrees with its manifest; the message names the file."""


# ------------------------------------------------------------------------------------------------------ schema


def image_type(resolution: int, channels: int = 3) -> pa.DataType:
    return pa.binary(resolution * resolution * channels)


def image_field(resolution: int, channels: int = 3) -> pa.Field:
    shape = f"{resolution},{resolution},{channels}".encode()
    return pa.field("image", image_type(resolution, channels), nullable=False, metadata={b"shape": shape})


def shard_schema(resolution: int, channels: int = 3) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            image_field(resolution, channels),
            pa.field("source", pa.string()),
            pa.field("box", pa.list_(pa.int32(), 4)),
            pa.field("hash", pa.binary()),
        ],
        metadata={b"dcgan.schema_version": str(SCHEMA_VERSION).encode()},
    )


REJECT_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("source", pa.string()), pa.field("reason", pa.string()),
     pa.field("detail", pa.string())]
)


def make_table(
    keys: Sequence[str],
    images: np.ndarray,
    sources: Sequence[str | None] | None = None,
    boxes: Sequence[Sequence[int] | None] | None = None,
    hashes: Sequence[bytes | None] | None = None,
) -> pa.Table:
    """Rows -> an Arrow table in the shard schema. `images` is (N, R, R, C) uint8."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, R, R, C) uint8, got {images.shape} {images.dtype}")
    n, res, _, ch = images.shape
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} images")
    schema = shard_schema(res, ch)
    image_col = pa.FixedSizeBinaryArray.from_buffers(image_type(res, ch), n, [None, pa.py_buffer(images)])
    return pa.Table.from_arrays(
        [
            text_column(keys, pa.string()),
            image_col,
            text_column(sources if sources is not None else [None] * n, pa.string()),
            box_column(boxes if boxes is not None else [None] * n),
            text_column(hashes if hashes is not None else [None] * n, pa.binary()),
        ],
        schema=schema,
    )


def _validity(values: Sequence[Any]) -> tuple[pa.Buffer | None, int]:
    """Arrow's validity bitmap of a column (None = null) and its null count; no bitmap when nothing is null."""
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    nulls = len(valid) - int(valid.sum())
    return (pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None), nulls


def box_column(boxes: Sequence[Sequence[int] | None]) -> pa.Array:
    """The face boxes (x, y, w, h; None = null, as for LSUN) as a list<int32>[4] column, from its buffers (see
    `text_column`)."""
    values = np.array([[0] * 4 if b is None else [int(v) for v in b] for b in boxes], np.int32).reshape(-1, 4)
    bitmap, nulls = _validity(boxes)
    flat = pa.Array.from_buffers(pa.int32(), values.size, [None, pa.py_buffer(values)])
    return pa.Array.from_buffers(pa.list_(pa.int32(), 4), len(values), [bitmap], nulls, children=[flat])


def _utf8(value: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:  # a local file name that is not UTF-8 (a source path, a reject's detail)
        return storage.text(value).encode()


def text_column(values: Sequence[str | bytes | None], type_: pa.DataType) -> pa.Array:
    """A string or binary column (None = null) made from its offsets, data and validity buffers.

    Why not `pa.array`: on Python objects it imports pandas (pyarrow's pandas shim, pyarrow 26), ~0.16 s of a fresh
    build worker's first chunk (`benchmarks/startup.py --first-chunk`), and the build uses pandas nowhere else: its
    chunk worker writes shards and reads none (reading Parquet imports pandas anyway). Equal to
    `pa.array(list(values), type_)`, as `box_column` is for the boxes (tests/test_storage_shards.py)."""
    items = [b"" if v is None else _utf8(v) if isinstance(v, str) else memoryview(v).tobytes() for v in values]
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(b) for b in items], out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        raise ValueError(f"{offsets[-1]} bytes in one {type_} column: more than 32-bit offsets hold")
    bitmap, nulls = _validity(values)
    return pa.Array.from_buffers(type_, len(items), [bitmap, pa.py_buffer(offsets.astype(np.int32)),
                                                     pa.py_buffer(b"".join(items))], nulls)


def image_shape(field: pa.Field) -> tuple[int, int, int]:
    meta = field.metadata or {}
    if b"shape" not in meta:
        raise DatasetError(f"image column has no shape metadata (type {field.type})")
    return tuple(int(v) for v in meta[b"shape"].split(b","))  # type: ignore[return-value]


def pixels(column: pa.Array | pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """A fixed-size binary image column -> (N, *shape) uint8, zero-copy for a single chunk."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = int(np.prod(shape))
    buf = column.buffers()[1]
    if buf is None:
        return np.zeros((0, *shape), np.uint8)
    return np.frombuffer(buf, np.uint8, count=len(column) * width, offset=column.offset * width).reshape(-1, *shape)


def images_of(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The image column as one (N, R, R, C) uint8 array, without copying per row."""
    return pixels(table.column("image"), image_shape(table.schema.field("image")))


# ------------------------------------------------------------------------------------------------------ writing


def _leaf(field: pa.Field) -> str:
    """The Parquet column path of a field (a per-column codec is keyed by it: a list's values are `name.list.element`,
    and a codec keyed by the bare name would leave them uncompressed). Shard schemas nest no deeper than a list."""
    t = field.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"{field.name}.list.element"
    return field.name


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    """The table as a Parquet file, in an Arrow buffer: a BytesIO sink copied every page in, then the whole file out
    (benchmarks/RESULTS.md, the codec section)."""
    buf = pa.BufferOutputStream()
    # Pixels in Snappy, the codec every Parquet reader has: on 64x64 LSUN-layout crops (benchmarks/shard_codec.py)
    # the files are 2% larger than with zstd, and cost ~0.7x zstd's CPU to write and to read; every epoch of
    # training reads them again. Keys and sources (text) in zstd. Both are deterministic.
    codecs = {_leaf(f): "snappy" if f.name == "image" else "zstd" for f in table.schema}
    pq.write_table(table, buf, compression=codecs, row_group_size=1024, write_statistics=["key"])
    return buf.getvalue()


def write_table(dataset_uri: str, relpath: str, table: pa.Table) -> dict[str, Any]:
    """Write one Parquet file under the dataset and return its manifest entry (path, rows, bytes, sha256)."""
    data = memoryview(_parquet_bytes(table))
    storage.write_bytes(storage.join(dataset_uri, relpath), data)
    return {"path": relpath, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def content_hash(shards: Iterable[dict[str, Any]]) -> str:
    """One digest of the dataset's rows: the shards' checksums in order."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s['path']}:{s['rows']}:{s['sha256']}\n".encode())
    return h.hexdigest()


def write_manifest(
    dataset_uri: str,
    *,
    kind: str,
    resolution: int,
    shards: list[dict[str, Any]],
    rejects: list[dict[str, Any]] | None = None,
    reject_counts: dict[str, int] | None = None,
    inputs: int | None = None,
    dedup: dict[str, Any] | None = None,
    inputs_fingerprint: str | None = None,
    params: dict[str, Any] | None = None,
    channels: int = 3,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a dataset: the manifest is the last object written, and its presence means complete."""
    shards = sorted(shards, key=lambda s: s["path"])
    rows = sum(s["rows"] for s in shards)
    reject_counts = dict(sorted((reject_counts or {}).items()))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "resolution": resolution,
        "channels": channels,
        "counts": {
            "inputs": inputs,
            "rows": rows,
            "rejected": sum(reject_counts.values()),
            "duplicates_removed": (dedup or {}).get("removed", 0),
        },
        "content_hash": content_hash(shards),
        "shards": shards,
        "rejects": {"by_reason": reject_counts, "shards": sorted(rejects or [], key=lambda s: s["path"])},
        "dedup": dedup or {"method": "none"},
        "inputs_fingerprint": inputs_fingerprint,
        "params": params or {},
        "code_version": CODE_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        manifest.update(extra)
    storage.write_json(dataset_layout.manifest(dataset_uri), manifest)
    return manifest


# ------------------------------------------------------------------------------------------------------ reading


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    uri = dataset_layout.manifest(dataset_uri)
    try:
        if not storage.exists(uri):
            raise DatasetError(f"{dataset_uri}: no {dataset_layout.MANIFEST} (not a dataset, or its build did not finish)")
        manifest = storage.read_json(uri)
    except storage.StorageUnreachable:
        raise  # the store is failing, not this file: transient, retried
    except storage.StorageError as err:
        raise DatasetError(str(err)) from None
    except ValueError as err:
        raise DatasetError(f"{uri}: not valid JSON ({err})") from None
    return check_manifest(manifest, uri)


def has_manifest(dataset_uri: str) -> bool:
    """Whether a manifest is there, readable or not: a writer replaces such a dataset only when told to overwrite
    (one whose manifest no longer adds up is still the user's dataset, not an unfinished output to clear)."""
    return storage.exists(dataset_layout.manifest(dataset_uri))


def is_complete(dataset_uri: str) -> bool:
    """Whether `dataset_uri` holds a committed dataset: its manifest exists and reads (the one test of completeness:
    the manifest is written last)."""
    try:
        read_manifest(dataset_uri)
        return True
    except DatasetError:
        return False


def check_manifest(manifest: Any, uri: str) -> dict[str, Any]:
    """The fields readers rely on, with their types: a hand-edited or foreign manifest is one clear error."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{uri}: a manifest is a JSON object, this is a {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{uri}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    for field in ("kind", "resolution", "shards"):
        if field not in manifest:
            raise DatasetError(f"{uri}: missing field {field!r}")
    expect = {"kind": str, "resolution": int, "channels": int, "shards": list, "counts": dict}
    for field, kind in expect.items():
        value = manifest.get(field)
        if field in manifest and (not isinstance(value, kind) or isinstance(value, bool)):
            raise DatasetError(f"{uri}: field {field!r} should be {kind.__name__}, not {type(value).__name__}")
    entry_types = {"path": str, "rows": int, "bytes": int, "sha256": str}
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise DatasetError(f"{uri}: shards[{i}] should be an object with path, rows, bytes, sha256")
        for field, kind in entry_types.items():
            if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                raise DatasetError(f"{uri}: shards[{i}].{field} should be {kind.__name__}, "
                                   f"not {type(entry.get(field)).__name__}")
    rows = sum(e["rows"] for e in manifest["shards"])
    counts = manifest.setdefault("counts", {"rows": rows})
    if not isinstance(counts.get("rows", 0), int):
        raise DatasetError(f"{uri}: counts.rows should be int")
    counts.setdefault("rows", rows)
    # A shard entry removed or edited by hand left a dataset that read fewer rows than it said, without a word.
    edited = "(edited by hand, or not written by this project): rebuild the dataset or restore its manifest"
    if counts["rows"] != rows:
        raise DatasetError(f"{uri}: its shards hold {rows:,} rows, its counts.rows says {counts['rows']:,} {edited}")
    if "content_hash" in manifest and manifest["content_hash"] != content_hash(manifest["shards"]):
        raise DatasetError(f"{uri}: its shard list does not give its content_hash {edited}")
    return manifest


def check_shard(dataset_uri: str, entry: dict[str, Any], data: bytes, resolution: int, channels: int = 3,
                checksums: bool = True) -> pq.ParquetFile:
    """A shard's bytes against its manifest entry: same size, sha256, row count and schema; the opened file."""
    where = f"shard {entry['path']}"
    _check_size(dataset_uri, entry, len(data))
    if checksums and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DatasetError(f"{where}: sha256 differs from the manifest of {dataset_uri} "
                           "(corrupt or replaced; rebuild the dataset or restore the shard)")
    parquet = pq.ParquetFile(pa.BufferReader(data))
    if parquet.metadata.num_rows != entry["rows"]:
        raise DatasetError(f"{where}: {parquet.metadata.num_rows} rows, manifest says {entry['rows']}")
    schema, expected = parquet.schema_arrow, image_field(resolution, channels)
    if (schema.get_field_index("image") < 0 or schema.field("image").type != expected.type
            or (schema.field("image").metadata or {}).get(b"shape") != expected.metadata[b"shape"]):
        raise DatasetError(f"{where}: schema does not match version {SCHEMA_VERSION} at resolution {resolution}")
    return parquet


def _check_size(dataset_uri: str, entry: dict[str, Any], size: int) -> None:
    if size != entry["bytes"]:
        raise DatasetError(f"shard {entry['path']}: {size} bytes, the manifest of {dataset_uri} says {entry['bytes']} "
                           "(replaced or truncated; rebuild the dataset or restore the shard)")


def _missing(dataset_uri: str, entry: dict[str, Any]) -> DatasetError:
    return DatasetError(f"shard {entry['path']} listed in the manifest is missing "
                        f"({storage.join(dataset_uri, entry['path'])})")


def read_listed(dataset_uri: str, entry: dict[str, Any]) -> bytes:
    """A listed shard's bytes; DatasetError when it is not there (an unreachable store stays transient)."""
    try:
        return storage.read_bytes(storage.join(dataset_uri, entry["path"]))
    except storage.StorageUnreachable:
        raise  # the store is failing, not this file: transient, retried
    except storage.StorageError:
        raise _missing(dataset_uri, entry) from None


def check_sizes(dataset_uri: str, manifest: dict[str, Any]) -> None:
    """Every shard the manifest lists is there with its size: a missing, truncated or replaced shard found before a
    stage writes anything, at one HEAD a shard (no read; the readers check the bytes: `verify`'s other checks)."""
    from concurrent.futures import ThreadPoolExecutor

    entries = manifest["shards"]
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(lambda e: storage.size(storage.join(dataset_uri, e["path"])), entries))
    for entry, got in zip(entries, sizes):
        if got is None:
            raise _missing(dataset_uri, entry)
        _check_size(dataset_uri, entry, got)


def verify(dataset_uri: str, manifest: dict[str, Any] | None = None, checksums: bool = True) -> dict[str, Any]:
    """Check every shard the manifest lists: present, same size, same sha256, same row count, same schema."""
    manifest = manifest or read_manifest(dataset_uri)
    for entry in manifest["shards"]:
        check_shard(dataset_uri, entry, read_listed(dataset_uri, entry), manifest["resolution"],
                    manifest.get("channels", 3), checksums)
    return manifest


@dataclass
class _Shard:
    path: str
    start: int
    rows: int


class ShardDataset:
    """Plain-Python reader (length, iteration, random access) for evaluation, dedup and tests.

    Shards are loaded lazily and the most recent one is cached, so sequential access reads each file once.
    `check`: True verifies every shard up front (`verify`: the whole dataset read once more); "on_read" checks each
    shard the same way when it is loaded, so a reader of a sample of a large dataset reads it once.
    """

    def __init__(self, dataset_uri: str, check: bool | str = True, checksums: bool = True):
        self.uri = dataset_uri
        self._check_on_read = check == "on_read"
        self._checksums = checksums
        self.manifest = (verify(dataset_uri, checksums=checksums) if check is True
                         else read_manifest(dataset_uri))
        self._shards, start = [], 0
        for entry in self.manifest["shards"]:
            self._shards.append(_Shard(entry["path"], start, entry["rows"]))
            start += entry["rows"]
        self._len = start
        self._cache: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def shard_table(self, i: int) -> pa.Table:
        if self._cache is None or self._cache[0] != i:
            entry = self.manifest["shards"][i]
            if self._check_on_read:
                data = read_listed(self.uri, entry)
                check_shard(self.uri, entry, data, self.resolution, self.manifest.get("channels", 3), self._checksums)
            else:
                data = storage.read_bytes(storage.join(self.uri, entry["path"]))
            self._cache = (i, pq.read_table(io.BytesIO(data)))
        return self._cache[1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not -self._len <= index < self._len:
            raise IndexError(index)
        index %= self._len
        lo, hi = 0, len(self._shards) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._shards[mid].start <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo, index - self._shards[lo].start

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = self._locate(index)
        row = self.shard_table(s).slice(r, 1)
        out = row.drop_columns(["image"]).to_pylist()[0]
        out["image"] = images_of(row)[0]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for table in self.tables():
            imgs = images_of(table)
            for j, row in enumerate(table.drop_columns(["image"]).to_pylist()):
                row["image"] = imgs[j]
                yield row

    def tables(self) -> Iterator[pa.Table]:
        for i in range(len(self._shards)):
            yield self.shard_table(i)

    def images(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(N, R, R, C) uint8 for the given row indices (all rows if None)."""
        if indices is None:
            return np.concatenate([images_of(t) for t in self.tables()]) if self._shards else np.zeros((0,))
        return np.stack([self[int(i)]["image"] for i in indices])

    def keys(self) -> list[str]:
        return [k for t in self.tables() for k in t.column("key").to_pylist()]


def shard_uris(dataset_uri: str, manifest: dict[str, Any] | None = None) -> list[str]:
    manifest = manifest or read_manifest(dataset_uri)
    return [storage.join(dataset_uri, s["path"]) for s in manifest["shards"]]
