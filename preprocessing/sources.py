"""Where raw inputs come from: a local folder, an s3:// prefix, or a file listing image URLs; and fetching their bytes.

Listing happens once, on the driver, and yields `Item`s sorted by key, so chunking them is deterministic. A URL list
(.txt/.lst, .csv/.tsv, .parquet) is the exception, for lists of millions: it is streamed (`plan_url_list`), cut into
chunks in file order (by byte offset; Parquet by row), and each build task reads its own URLs (`url_chunk_items`).
Every entry found is an input: what cannot be one (a hidden file, a dangling symlink, a symlink loop, a URL list
line that is not an http(s):// or s3:// URL) is listed with its reject reason and never read, so it shows up in the
rejects instead of vanishing. Keys are unique names inside the input: the path relative to the folder or prefix
(extension kept), or the URL. Fetching happens in Ray workers: files and objects are read through
`preprocessing.storage`; http(s) URLs are downloaded by `preprocessing.downloads` (no private/loopback/link-local
address unless allowed, on every redirect hop; a redirect cap; a total time limit per attempt; retries with backoff
on transient failures; a size cap; and politeness: robots.txt, X-Robots-Tag opt-outs, per-host limits, Retry-After),
with bounded concurrency. Every failure is a `Reject` with its reason; none stops the build.

Layer: preprocessing. (Listing and fetching stay together: each kind of source is one listing and one fetch.)
"""

from __future__ import annotations

from preprocessing.errors import InputError, MissingError

import csv
import errno
import hashlib
import io
import logging
import os
import stat
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

from preprocessing import storage
from preprocessing.downloads import BAD_URL, UNREACHABLE, Policy, download
from preprocessing.images import Reject

log = logging.getLogger(__name__)

# Reject reasons of fetching: preprocessing.downloads (HTTP_ERROR, TIMEOUT, UNREACHABLE, ...).
# Reject reasons of listing (decided on the driver; such an input is never read).
HIDDEN = "hidden_file"  # a dot-file or dot-folder (.DS_Store, .git, ._AppleDouble): metadata, not a photo
BROKEN_LINK = "broken_link"  # a symlink to nothing
SYMLINK_LOOP = "symlink_loop"  # a symlink that leads back to itself or to a folder listed already
NOT_A_FILE = "not_a_file"  # a FIFO, socket or device: reading it could block forever
UNREADABLE = "unreadable"  # a folder that cannot be listed (permissions)
URL_SCHEMES = ("http", "https", "s3")

URL_LIST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv", ".parquet")
STREAMED_SUFFIXES = URL_LIST_SUFFIXES  # planned by streaming: never held whole on the driver
PARQUET_BATCH = 8192  # rows per Parquet batch read (memory: a row group's url column, read by pyarrow)
BLOCK = 1 << 18


@dataclass(frozen=True)
class Item:
    """One input: `key` orders and names it, `source` is where its bytes are (path, s3:// or http(s):// URI).

    `reject` is (reason, detail) when listing already found that it cannot be an input: it is never read.
    """

    key: str
    source: str
    reject: tuple[str, str] | None = None


def fingerprint(lines: Iterable[str]) -> str:
    """A digest of the input listing (names, not contents): a changed listing gives a different fingerprint."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def chunk_items(items: list[Item], chunk_rows: int) -> tuple[list[dict], int, str]:
    """Items in build chunks of `chunk_rows`: (chunk specs, number of inputs, fingerprint of the listing).

    A chunk item is [key, source] or, for an input rejected while listing, [key, source, reason, detail].
    """
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:  # keys name rows and order shards: two inputs under one key is a listing bug, not bad input
        raise AssertionError(f"{len(dup)} input keys listed twice, e.g. {dup[0]!r}")
    rows = [[it.key, it.source, *(it.reject or ())] for it in items]
    chunks = [{"items": rows[i : i + chunk_rows]} for i in range(0, len(rows), chunk_rows)]
    return chunks, len(items), fingerprint("\t".join(r) for r in rows)


# -------------------------------------------------------------------------------------------------- listing


def is_url_list(uri: str) -> bool:
    return str(uri).lower().endswith(URL_LIST_SUFFIXES)


def is_streamed_url_list(uri: str) -> bool:
    return str(uri).lower().endswith(STREAMED_SUFFIXES)


def read_url_list(uri: str) -> list[str]:
    """URLs from a text file (one per line, '#' comments), a CSV/TSV (a `url` column) or Parquet (a `url` column)."""
    data = storage.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        col = "url" if "url" in table.column_names else (table.column_names[0] if table.num_columns == 1 else None)
        if col is None:
            raise InputError(f"{uri}: no 'url' column (columns: {', '.join(table.column_names)})")
        urls = [u for u in table.column(col).to_pylist() if u]
    elif lower.endswith((".csv", ".tsv")):
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig")), delimiter="\t" if lower.endswith(".tsv") else ","))
        if not rows:
            urls = []
        elif "url" in [c.strip().lower() for c in rows[0]]:
            col = [c.strip().lower() for c in rows[0]].index("url")
            urls = [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
        elif len(rows[0]) == 1 and "://" in rows[0][0]:  # a headerless single column of URLs
            urls = [r[0].strip() for r in rows if r and r[0].strip()]
        else:
            raise InputError(f"{uri}: no 'url' column in the header ({', '.join(rows[0])})")
    else:
        lines = (ln.strip() for ln in data.decode("utf-8-sig").splitlines())
        urls = [ln for ln in lines if ln and not ln.startswith("#")]
    unique = sorted(set(urls))
    if len(unique) < len(urls):
        log.warning("%s: %d duplicate URL lines counted once", uri, len(urls) - len(unique))
    return unique


def _lines(uri: str, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of a local or s3:// text file from `offset`, read in 256 KiB blocks (S3: ranged reads)."""
    fs, path = storage.arrow_filesystem(uri)
    try:
        f = fs.open_input_file(path)
    except (FileNotFoundError, OSError) as err:
        raise MissingError(f"input: cannot read the URL list {uri} ({err})") from None
    with f:
        f.seek(offset)
        pos, rest = offset, b""
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield pos, line
                pos += len(line) + 1
        if rest:
            yield pos, rest


def _url_line(raw: bytes, first: bool) -> str | None:
    """The URL of a list line, None for a blank or '#' comment line."""
    text = raw.decode("utf-8", "replace")
    if first:
        text = text.lstrip("\ufeff")
    text = text.strip()
    return text if text and not text.startswith("#") else None


def _csv_records(uri: str, offset: int, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(byte offset where the record starts, its fields) from `offset`: csv.reader pulls one line at a time, so the
    lines consumed so far end where the next record starts (a quoted field may span lines)."""
    end = [offset]

    def lines():
        for at, raw in _lines(uri, offset):
            end[0] = at + len(raw) + 1
            yield raw.decode("utf-8", "replace").lstrip("\ufeff" if at == 0 else "") + "\n"

    start = offset
    for record in csv.reader(lines(), delimiter=delimiter):
        yield start, record
        start = end[0]


def _parquet_file(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (FileNotFoundError, OSError) as err:
        raise MissingError(f"input: cannot read the URL list {uri} ({err})") from None
    except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid and kin: not a Parquet file
        raise InputError(f"input: {uri} is not a readable Parquet URL list ({type(err).__name__}: {err})"[:300]) \
            from None


def _layout(uri: str) -> dict:
    """Where a list's URLs are, found once on the driver (part of each chunk spec): for a CSV/TSV the `url` column's
    index and whether row 0 is a header (a headerless list is one column of URLs); for Parquet the column's name."""
    lower = uri.lower()
    if lower.endswith(".parquet"):
        names = _parquet_file(uri).schema_arrow.names
        col = "url" if "url" in names else (names[0] if len(names) == 1 else None)
        if col is None:
            raise InputError(f"{uri}: no 'url' column (columns: {', '.join(names)})")
        return {"column": col}
    if lower.endswith((".csv", ".tsv")):
        head = next((r for _, r in _csv_records(uri, 0, "\t" if lower.endswith(".tsv") else ",")), [])
        names = [c.strip().lower() for c in head]
        if "url" in names:
            return {"column": names.index("url"), "header": True}
        if len(head) == 1 and "://" in head[0]:
            return {"column": 0, "header": False}
        raise InputError(f"{uri}: no 'url' column in the header ({', '.join(head)})")
    return {}


def _entries(uri: str, start: int, layout: dict) -> Iterator[tuple[int, str | None]]:
    """(position, URL or None for a blank or comment line or cell) of a URL list from `start`; the position is a
    byte offset (text, CSV/TSV) or a row number (Parquet), where a chunk starting at that entry reads from."""
    lower = uri.lower()
    if lower.endswith(".parquet"):
        pf = _parquet_file(uri)
        first, groups, row = 0, [], 0  # only the row groups from the one holding `start`
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start:
                groups.append(g)
            else:
                first = row + n
            row += n
        row = first
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups, columns=[layout["column"]]):
            for value in batch.column(0).to_pylist():
                if row >= start:
                    text = str(value).strip() if value is not None else ""
                    yield row, text or None
                row += 1
        return
    if lower.endswith((".csv", ".tsv")):
        col, skip_header = layout["column"], layout["header"] and start == 0
        for at, record in _csv_records(uri, start, "\t" if lower.endswith(".tsv") else ","):
            if skip_header:
                skip_header = False
                continue
            yield at, (record[col].strip() or None) if len(record) > col else None
        return
    for at, raw in _lines(uri, start):
        yield at, _url_line(raw, at == 0)


def plan_url_list(uri: str, chunk_rows: int, limit: int | None = None) -> tuple[list[dict], int, str]:
    """A URL list in chunks of `chunk_rows` URLs, streamed: (chunk specs, inputs, fingerprint).

    Text (.txt/.lst) and CSV/TSV lists are read in 256 KiB blocks and cut by byte offset, Parquet by row (batches of
    a row group at a time). The driver keeps one small spec per chunk (where it starts, its URL count, a digest of
    its URLs, the ones to skip, where the URLs are) and 8 bytes per URL (a hash, to find repeated URLs: a URL is an
    input once, where it first appears), not the URLs. File order is kept (a list of millions is not sorted on the
    driver); rows are sorted by key within each chunk.
    """
    import array

    import numpy as np

    layout = _layout(uri)
    chunks: list[dict] = []
    seen = array.array("Q")
    whole = hashlib.sha256()
    chunk_hash = None
    n = 0
    for at, url in _entries(uri, 0, layout):
        if url is None:
            continue
        if limit and n >= limit:
            break
        if n % chunk_rows == 0:
            if chunks:
                chunks[-1]["sha256"] = chunk_hash.hexdigest()
            chunks.append({"urllist": uri, "offset": at, "count": 0, **layout})
            chunk_hash = hashlib.sha256()
        line = url.encode("utf-8", "surrogateescape") + b"\n"
        whole.update(line)
        chunk_hash.update(line)
        chunks[-1]["count"] += 1
        seen.append(int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little"))
        n += 1
    if chunks:
        chunks[-1]["sha256"] = chunk_hash.hexdigest()
    if n == 0:
        raise MissingError(f"input: no URLs in {uri}")
    codes = np.frombuffer(seen, np.uint64)
    ranked = np.sort(codes)
    repeated = np.unique(ranked[1:][ranked[1:] == ranked[:-1]])  # hashes of URLs listed more than once
    del ranked
    repeats, firsts = [], set()
    for start in range(0, len(codes) if len(repeated) else 0, 1 << 16):  # in blocks: isin copies and sorts
        for r in (start + np.nonzero(np.isin(codes[start:start + (1 << 16)], repeated))[0]).tolist():
            if codes[r] in firsts:  # every occurrence after a URL's first
                repeats.append(r)
            else:
                firsts.add(codes[r])
    del codes, seen
    for r in repeats:
        chunks[r // chunk_rows].setdefault("skip", []).append(r % chunk_rows)
    if len(repeats):
        log.warning("%s: %d duplicate URL lines counted once", uri, len(repeats))
    return chunks, n - len(repeats), whole.hexdigest()


def url_chunk_items(chunk: dict) -> list[list[str]]:
    """A streamed chunk's items ([key, source] or [key, source, reason, detail]), read from where it starts; raises
    InputError if the URLs are no longer those planned (the list changed under the build)."""
    skip, items, h, i = set(chunk.get("skip", ())), [], hashlib.sha256(), 0
    layout = {k: chunk[k] for k in ("column", "header") if k in chunk}
    for _, url in _entries(chunk["urllist"], chunk["offset"], layout):
        if i == chunk["count"]:
            break
        if url is None:
            continue
        h.update(url.encode("utf-8", "surrogateescape") + b"\n")
        if i not in skip:
            it = url_item(url)
            items.append([it.key, it.source, *(it.reject or ())])
        i += 1
    if h.hexdigest() != chunk.get("sha256", h.hexdigest()) or i != chunk["count"]:
        where = "row" if chunk["urllist"].lower().endswith(".parquet") else "byte"
        raise InputError(f"input: {chunk['urllist']} changed while it was being built (URLs from {where} "
                         f"{chunk['offset']} differ from the plan); start the build again")
    return items


def url_item(url: str) -> Item:
    """A URL list line as an input: only http(s):// and s3:// URLs are read; a local path or file:// URL never is."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in URL_SCHEMES and parsed.netloc:
        return Item(url, url)
    what = "no host" if scheme in URL_SCHEMES else f"scheme {scheme!r}" if scheme else "a local path"
    return Item(url, url, (BAD_URL, f"{what}: a URL list names http(s):// or s3:// URLs only; not read"))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_folder(root: str) -> list[Item]:
    """Every entry under a local folder, keyed by its path relative to the folder (not sorted).

    Symlinks to files are inputs. A symlinked folder is followed once: real folders are listed first, then symlinked
    ones in order found; a link whose target folder (by real path) is listed already, which includes every link to
    an ancestor, is a SYMLINK_LOOP row, so nothing is listed twice and no walk goes round forever.
    """
    real_root = os.path.realpath(root)
    items, listed = [], {real_root}
    folders: deque[tuple[str, str]] = deque([(real_root, "")])  # (path, key prefix) still to list
    links: deque[tuple[str, str]] = deque()  # symlinked folders, (path, key) followed after the real ones
    while folders or links:
        if not folders:
            path, key = links.popleft()
            target = os.path.realpath(path)
            if target in listed:
                items.append(Item(key, path, (SYMLINK_LOOP, f"links to {target}, which is listed already")))
            else:
                listed.add(target)
                folders.append((path, f"{key}/"))
            continue
        folder, prefix = folders.popleft()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if not prefix:
                raise InputError(f"input: cannot list {root} ({err.strerror})") from None
            items.append(Item(prefix.rstrip("/"), folder, (UNREADABLE, f"cannot list folder: {err.strerror}")))
            continue
        texts: dict[str, str] = {}
        for e in entries:
            key = prefix + storage.text(e.name)  # a name that is not UTF-8: its bytes as \xNN
            if texts.setdefault(key, e.name) != e.name:  # a name that is not UTF-8 and one that spells its \xNN
                raise InputError(f"input: two file names in {storage.text(folder)} read {key!r} (one is not UTF-8): "
                                 "rename one")
            if _hidden(e.name):
                items.append(Item(key, e.path, (HIDDEN, "hidden folder, not listed" if e.is_dir() else "not read")))
                continue
            try:
                mode = os.stat(e.path).st_mode  # follows symlinks
            except OSError as err:
                if not e.is_symlink():  # gone since the folder was read, or no permission
                    items.append(Item(key, e.path, (UNREADABLE, err.strerror)))
                else:
                    reason = SYMLINK_LOOP if err.errno == errno.ELOOP else BROKEN_LINK
                    items.append(Item(key, e.path, (reason, f"symlink to {os.readlink(e.path)!r}: {err.strerror}")))
                continue
            if stat.S_ISDIR(mode):
                if e.is_symlink():
                    links.append((e.path, key))
                else:
                    listed.add(os.path.realpath(e.path))
                    folders.append((e.path, f"{key}/"))
            elif stat.S_ISREG(mode):
                items.append(Item(key, e.path))
            else:
                items.append(Item(key, e.path, (NOT_A_FILE, "a FIFO, socket or device, not read")))
    return items


def list_items(uri: str, limit: int | None = None) -> list[Item]:
    """Every input of a folder, s3:// prefix or URL list, sorted by key, at most `limit`.

    Every entry is listed, whatever its name: a non-image becomes a reject row, not an unexplained absence.
    """
    if is_url_list(uri):
        items = [url_item(u) for u in read_url_list(uri)]
    elif storage.is_s3(uri):
        base = storage.normalize(uri) + "/"
        items = []
        for u in storage.list_uris(uri):
            key = u[len(base):]
            hidden = any(_hidden(part) for part in key.split("/"))
            items.append(Item(key, u, (HIDDEN, "not read") if hidden else None))
    else:
        path = storage.local_path(uri)
        if not path.is_dir():
            lmdb_file = path.name in ("data.mdb", "lock.mdb") and path.is_file()  # LSUN's folder holds these two
            raise MissingError(f"input: {uri} is " + (f"a file of an LMDB: give its folder, {path.parent}" if lmdb_file
                               else "not a folder, an s3:// prefix or a URL list "
                               f"({', '.join(URL_LIST_SUFFIXES)})"))
        items = list_folder(str(path))
    if not items:
        raise MissingError(f"input: no files under {uri}")
    items.sort(key=lambda it: it.key)
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------------------------- fetching


def fetch(source: str, timeout_s: float = 10.0, retries: int = 2, max_bytes: int = 20_000_000,
          policy: Policy = Policy()) -> bytes:
    """The bytes of one input (local path, s3:// object, or http(s) URL under the network `policy`); raises Reject."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else "file"
    if scheme in ("http", "https"):
        return download(source, timeout_s, retries, max_bytes, policy)
    if scheme not in ("file", "s3"):
        raise Reject(BAD_URL, f"unsupported scheme {scheme!r}")
    try:
        return storage.read_bytes(source)
    except storage.StorageUnreachable:
        raise  # the store, not the input, is failing: the chunk is retried rather than the input rejected
    except storage.StorageError as err:
        raise Reject(UNREACHABLE, str(err)[:200]) from None
    except OSError as err:
        raise Reject(UNREACHABLE, f"{type(err).__name__}: {err}"[:200]) from None


def interleave_hosts(items: list[list[str]]) -> list[list[str]]:
    """Chunk items [key, source, ...] reordered round-robin over their URLs' hosts: a sorted URL list puts a host's
    URLs side by side, and per-host limits would then idle a task's download threads. Fetch order only: a chunk's
    rows and rejects are sorted by key afterwards."""
    by_host: dict[str, deque] = {}
    for it in items:
        by_host.setdefault(urlparse(it[1]).netloc.lower() if "://" in it[1] else "", deque()).append(it)
    queues, out = list(by_host.values()), []
    while queues:
        queues = [q for q in queues if q]
        for q in queues:
            out.append(q.popleft())
    return out


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[R]:
    """fn over items on a thread pool, results in input order, with at most ~2 x concurrency results held."""
    if concurrency <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fetch") as pool:
        window: deque = deque()
        for it in items:
            window.append(pool.submit(fn, it))
            if len(window) >= 2 * concurrency:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
