"""One URI for every location: a local path / file:// URI, or s3://bucket/prefix on any S3-compatible store.

The endpoint and credentials come only from the standard AWS settings (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles, instance roles). boto3 does object I/O with bounded
retries and backoff: an object in one GET, or in parallel ranged GETs past MULTIPART_THRESHOLD, and multipart uploads;
`arrow_filesystem` gives Ray Data and Ray Train the same store through pyarrow. No credential is printed or written:
errors name the URI and the cause, never a key.

Layer: preprocessing. Longer than most modules because the two backends of the one interface (local and S3,
with their error translation) belong side by side: every operation is defined once for both.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from preprocessing import settings
from preprocessing.errors import InputError, NoSpaceError, TransientError, UserError, naming_no_space

MULTIPART_THRESHOLD = 64 * 1024 * 1024
BODY_ATTEMPTS = 5  # tries of an object's body broken off mid-way, in all (as boto3's transfer manager)
# Error codes that say "not now" rather than "no": still failing after boto3's retries, they are worth a later retry.
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestTimeTooSkewed"}


class StorageError(UserError, RuntimeError):
    """A storage location that cannot be used (missing bucket, bad credentials, no object)."""


class StorageUnreachable(StorageError, TransientError):
    """The S3 endpoint did not answer (after boto3's own retries): worth another try later."""


class StorageFull(StorageError, NoSpaceError):
    """A local write found its disk (or quota) full: bad input, named by its URI."""


# ---------------------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | Path) -> Path:
    """The filesystem path of a local URI (plain path or file://)."""
    s = str(uri)
    if s.startswith("file://"):
        return Path(urlparse(s).path)
    if "://" in s:
        raise StorageError(f"not a local path: {s}")
    return Path(s)


def normalize(uri: str | Path) -> str:
    """s3:// URIs without a trailing slash; local URIs as absolute paths."""
    s = str(uri)
    if is_s3(s):
        split_s3(s)  # it names a bucket: "s3://" stripped of its slashes was the local folder "s3:"
        return s.rstrip("/")
    return str(local_path(s).expanduser().resolve())


def given(uri: str, what: str) -> str:
    """`uri` resolved (`resolve_location`), or InputError (a ValueError: a config field's validation error) when it
    is empty: `--out "$OUT"` with OUT unset would otherwise mean the current directory, or a default."""
    if not uri.strip():
        raise InputError(f"{what} is empty: give a path or s3://bucket/prefix")
    return resolve_location(uri)


def resolve_location(uri: str | None) -> str | None:
    """Where a configured location really is, decided once at the edge: local paths (relative to the current
    directory, `~` expanded) become absolute, s3:// loses its trailing slash, other URLs (http(s)://) stay as given."""
    if uri is None:
        return None
    s = str(uri).strip()
    if is_s3(s) or s.startswith("file://") or "://" not in s:
        return normalize(s)
    return s


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    for p in parts:
        base = f"{base}/{str(p).strip('/')}"
    return base


def overlaps(a: str, b: str) -> bool:
    """Whether two locations are the same or one lies inside the other (an output there would read or replace its
    own input)."""
    a, b = normalize(a), normalize(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _make_dirs(path: Path, uri: str) -> None:
    """mkdir -p, with a path below a file (`notes.txt/sub`) or an unwritable parent as one StorageError line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise StorageError(f"{uri}: {blocker} is a file, not a folder") from None
    except OSError as err:
        raise StorageError(f"{uri}: cannot create {path} ({err.strerror or err})") from None


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and not parsed.netloc:
        raise StorageError(f"{uri} names no bucket: give s3://BUCKET or s3://BUCKET/PREFIX")
    if parsed.scheme != "s3":
        raise StorageError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def timeout_s() -> float:
    """How long one S3 request may go without an answer before it is retried (DCGAN_S3_TIMEOUT_S, default 60)."""
    return settings.seconds("DCGAN_S3_TIMEOUT_S")


def text(name: str) -> str:
    """`name` as text that UTF-8 can hold: a local file name that is not UTF-8 (Python keeps its bytes as surrogate
    escapes) has those bytes written \\xNN, as LSUN's binary keys are (`lsun.read_range`). Such a name is an input's
    key and source like any other, not a reason for its chunk to fail."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name gives
        return name.encode("utf-8", "backslashreplace").decode()


def endpoint_url() -> str | None:
    """The S3 endpoint from the standard settings (None = AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# ------------------------------------------------------------------------------------------------------- clients


@functools.lru_cache(maxsize=None)
def _client(endpoint: str | None, pid: int):
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 6, "mode": "adaptive"},  # backoff on throttling, 5xx and connection resets
        connect_timeout=min(10.0, timeout_s()),
        read_timeout=timeout_s(),
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def s3_client():
    """A boto3 S3 client for the configured endpoint (one per process; boto3 clients are not fork-safe).

    AWS settings boto3 cannot use (a profile that is not in the config file, a config file it cannot parse, an
    endpoint that is not a URL) fail here, when the client is made, before any request: one line naming the
    settings, not botocore's traceback."""
    from botocore.exceptions import BotoCoreError

    try:
        return _client(endpoint_url(), os.getpid())
    except (BotoCoreError, ValueError) as err:
        raise StorageError(f"the AWS settings do not make an S3 client ({_aws_settings()}): {err}") from None


def _aws_settings() -> str:
    """The AWS settings of this environment that shape a client, as NAME=value (no secrets), or where they come from."""
    names = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
             "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_CA_BUNDLE", "AWS_DEFAULT_REGION", "AWS_REGION")
    shown = [f"{n}={os.environ[n]}" for n in names if os.environ.get(n)]
    return ", ".join(shown) or "~/.aws/config and the defaults"


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def _coded(uri: str, code: str, status: int | None = None) -> StorageError:
    """The error an S3 error code means for `uri` (a whole request's, or one key's in a DeleteObjects answer)."""
    if code in ("NoSuchBucket",):
        return StorageError(f"{uri}: bucket does not exist")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StorageError(f"{uri}: no such object")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return StorageError(f"{uri}: access denied ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/profile")
    if (status or 0) >= 500 or code in TRANSIENT_CODES:
        return StorageUnreachable(f"{uri}: the S3 endpoint kept failing ({code or status}) after retries")
    return StorageError(f"{uri}: S3 error {code or status}")


def _explain(err: Exception, uri: str) -> StorageError:
    """One clear line for the errors users hit: no bucket, no object, bad credentials, no endpoint."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import NoCredentialsError, ReadTimeoutError

    if isinstance(err, ClientError):
        return _coded(uri, err.response.get("Error", {}).get("Code", ""),
                      err.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(err, EndpointConnectionError):
        return StorageUnreachable(f"{uri}: cannot reach the S3 endpoint {endpoint_url() or '(AWS default)'}")
    if isinstance(err, (HTTPClientError, BotoConnectionError, ReadTimeoutError)):
        return StorageUnreachable(f"{uri}: the S3 endpoint kept dropping the connection ({type(err).__name__}) "
                                  "after retries")
    if isinstance(err, Boto3Error):  # boto3's transfer manager wraps what it gave up on
        cause = err.__cause__ or err.__context__
        return _explain(cause, uri) if isinstance(cause, (ClientError, BotoCoreError)) else \
            StorageUnreachable(f"{uri}: transfer failed after retries ({err})")
    if isinstance(err, BotoCoreError):
        return StorageError(f"{uri}: {type(err).__name__}: {err}")
    return StorageError(f"{uri}: {err}")


def _s3_call(uri: str, fn, *args, **kwargs):
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _explain(err, uri) from None


# ------------------------------------------------------------------------------------------------------ objects


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return _get_object(uri, bucket, key)
        except StorageError as err:
            if "no such object" in str(err):
                check_writable(f"s3://{bucket}")  # a missing bucket says so, rather than "no such object"
            raise
    p = local_path(uri)
    if not p.is_file():
        raise StorageError(f"{uri}: no such file")
    return p.read_bytes()


def _get_object(uri: str, bucket: str, key: str) -> bytes:
    """An object's bytes in one GET, read whole. boto3's transfer manager (`download_fileobj`: threads and a queue of
    256 KB writes) cost 2.4x the client CPU of this for a 23 MB shard (3x for a 64 KB manifest) and 1.6-1.7x its wall
    time, against moto (benchmarks/s3_read.py, RESULTS.md); a shard is read once a dedup phase and once an epoch.
    botocore retries the request; a body broken off mid-way is asked for again here, BODY_ATTEMPTS times in all, as the
    transfer manager did. An object larger than MULTIPART_THRESHOLD (a large checkpoint) goes to the transfer manager's
    parallel ranged GETs."""
    from botocore.exceptions import BotoCoreError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    # a body broken off mid-way; urllib3's own errors are a TLS connection cut (SSLError), which botocore passes on
    broken_off = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, Urllib3Error)
    client = s3_client()
    for _ in range(BODY_ATTEMPTS):
        answer = _s3_call(uri, client.get_object, Bucket=bucket, Key=key)
        body = answer["Body"]
        try:
            if answer.get("ContentLength", 0) > MULTIPART_THRESHOLD:
                break
            return body.read()
        except broken_off as err:
            broken = err
        except BotoCoreError as err:  # any other error of the body (a checksum that differs): one line
            raise _explain(err, uri) from None
        finally:
            body.close()
    else:
        raise StorageUnreachable(f"{uri}: the S3 endpoint broke off the object's body {BODY_ATTEMPTS} times "
                                 f"({type(broken).__name__})")
    buf = io.BytesIO()
    _s3_call(uri, client.download_fileobj, bucket, key, buf, Config=_transfer_config())
    return buf.getvalue()


def write_bytes(uri: str, data: bytes | memoryview) -> None:
    """Write an object whole: locally through a temporary file and a rename, so readers never see half of it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client().upload_fileobj, io.BytesIO(data), bucket, key, Config=_transfer_config())
        return
    p = local_path(uri)
    _make_dirs(p.parent, uri)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file is the user's, as their umask says
        with naming_no_space(uri, StorageFull), os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def upload_file(path: str | Path, uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client().upload_file, str(path), bucket, key, Config=_transfer_config())
    else:
        dst = local_path(uri)
        _make_dirs(dst.parent, uri)
        tmp = dst.with_name(f".{dst.name}.tmp")
        try:
            with naming_no_space(uri, StorageFull):
                shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except BaseException:  # no half-copied file left behind (as write_bytes)
            tmp.unlink(missing_ok=True)
            raise


def download_file(uri: str, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(uri, s3_client().download_file, bucket, key, str(path), Config=_transfer_config())
    else:
        shutil.copyfile(local_path(uri), path)


def _head(uri: str) -> dict | None:
    """HEAD of an object, None when there is none; every other failure (no credentials, no endpoint) is explained
    like any other call's."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return _s3_call(uri, s3_client().head_object, Bucket=bucket, Key=key)
    except StorageError as err:
        cause = err.__context__
        if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey",
                                                                                            "NotFound"):
            return None
        raise


def size(uri: str) -> int | None:
    """The size in bytes of one object or file, or None if there is none."""
    if is_s3(uri):
        head = _head(uri)
        return None if head is None else int(head["ContentLength"])
    p = local_path(uri)
    return p.stat().st_size if p.is_file() else None


def exists(uri: str) -> bool:
    if is_s3(uri):
        return _head(uri) is not None
    return local_path(uri).exists()


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """Every object (file) under a prefix (directory), recursively, sorted by URI."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in _s3_call(prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key))):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix):
                    out.append(f"s3://{bucket}/{obj['Key']}")
        return sorted(out)
    root = local_path(prefix)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))


def delete_prefix(uri: str) -> int:
    """Remove one object, or everything under a prefix; returns how many objects went."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        keys = [split_s3(u)[1] for u in list_uris(uri)]  # under `key/`: the object `key` itself is not listed
        if key and not key.endswith("/") and exists(uri):
            keys.append(key)
        _delete_keys(uri, bucket, keys)
        return len(keys)
    p = local_path(uri)
    if p.is_dir():
        n = sum(1 for q in p.rglob("*") if q.is_file())
        shutil.rmtree(p)
        return n
    if p.exists():
        p.unlink()
        return 1
    return 0


DELETE_RETRY_S = (0.5, 2.0, 5.0)  # pauses before a DeleteObjects is sent again for its keys that met a transient error


def delete_objects(uris: list[str]) -> int:
    """Remove these objects, each one object (not a prefix), that a listing has found: on S3 one DeleteObjects a
    1,000 keys of a bucket, where `delete_prefix` makes a listing, a HEAD and a delete of each; local ones as
    `delete_prefix` does. Returns how many were given."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
        else:
            delete_prefix(uri)
    for bucket, keys in by_bucket.items():
        _delete_keys(f"s3://{bucket}/{keys[0]}", bucket, keys)
    return len(uris)


def _delete_keys(uri: str, bucket: str, keys: list[str]) -> None:
    """These keys of `bucket` deleted in DeleteObjects of up to 1,000 (S3's limit); `uri` names them in an error."""
    client = s3_client()
    for i in range(0, len(keys), 1000):
        _delete_objects(uri, client, bucket, keys[i : i + 1000])


def _delete_objects(uri: str, client, bucket: str, keys: list[str]) -> None:
    """One DeleteObjects of up to 1,000 keys. S3 answers 200 even when some keys were not deleted: each is listed in
    the answer's Errors. Keys that met a transient error (InternalError, SlowDown) are sent again after each pause;
    any other error, or a transient one still there after the last pause, raises, naming the first key, so a prune or
    an overwrite never counts as gone an object that is still there."""
    import time

    for pause in (*DELETE_RETRY_S, None):
        answer = _s3_call(uri, client.delete_objects, Bucket=bucket,
                          Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        errors = answer.get("Errors") or []
        if not errors:
            return
        transient = [e for e in errors if e.get("Code") in TRANSIENT_CODES]
        if len(transient) < len(errors) or pause is None:
            first = next((e for e in errors if e.get("Code") not in TRANSIENT_CODES), errors[0])
            err = _coded(f"s3://{bucket}/{first.get('Key')}", first.get("Code") or "unknown")
            raise type(err)(f"{err}; {len(errors)} of {len(keys)} objects were not deleted")
        keys = [e["Key"] for e in transient]
        time.sleep(pause)


def check_writable(uri: str) -> None:
    """Fail early, in one line, when a location cannot be written (missing bucket, bad credentials, no endpoint)."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        try:
            _s3_call(f"s3://{bucket}", s3_client().head_bucket, Bucket=bucket)
        except StorageError as err:
            if "no such object" in str(err):  # HEAD on a bucket answers a bare 404
                raise StorageError(f"s3://{bucket}: bucket does not exist") from None
            raise
    else:
        p = local_path(uri)
        _make_dirs(p, uri)
        if not os.access(p, os.W_OK):
            raise StorageError(f"{uri}: not writable")


# ------------------------------------------------------------------------------------------------------ pyarrow


def arrow_filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for Ray Data / Ray Train, with the same endpoint as boto3."""
    import pyarrow.fs as pafs

    return (s3_arrow_filesystem() if is_s3(uri) else pafs.LocalFileSystem()), arrow_path(uri)


def arrow_path(uri: str) -> str:
    """The path of `uri` inside its pyarrow filesystem (no filesystem is built: cheap for thousands of shards)."""
    if not is_s3(uri):
        return str(local_path(uri).expanduser().resolve())
    bucket, key = split_s3(uri)
    return f"{bucket}/{key}".rstrip("/")


def s3_arrow_filesystem():
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    ep = endpoint_url()
    if ep:
        parsed = urlparse(ep)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=6)
    kwargs["connect_timeout"] = min(10.0, timeout_s())
    kwargs["request_timeout"] = timeout_s()
    return pafs.S3FileSystem(**kwargs)
