"""One storage layer for local disk and S3.

Every path notecoder handles is a URI string: a local path (``/data/notes``) or
``s3://bucket/prefix``. :class:`Storage` offers the handful of operations the job needs
on both, so planning, coding and committing run the same lines against disk and a real
S3 API, and the tests exercise both.

Writes are whole-or-nothing. Locally a file is written under a hidden temporary name
in the same folder and renamed. On S3 an object becomes visible only when its upload
completes: a single PUT, or a multipart upload that is aborted on any failure. pyarrow's
S3 output stream is not used for writing because it completes the upload when it is
closed, even when closed by an exception, and so would publish half a file.

On S3, listing, heads, writes, copies, deletes and downloads go through boto3 (which
also gives ETags, the version notecoder records for an input object); pyarrow's S3
filesystem serves only random-access reads of Parquet. Both take credentials from the
standard AWS chain only (environment, profile, instance or pod role): nothing here
accepts, stores or logs a key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import posixpath
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from notecoder.errors import StorageError

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["
# Objects up to this size go in one PUT; larger ones in a multipart upload.
MULTIPART_THRESHOLD = 64 << 20
# S3 wants every part but the last to be at least 5 MiB.
MULTIPART_PART_SIZE = 16 << 20
# boto3's standard mode retries throttling, timeouts and 5xx with capped backoff.
S3_RETRY_ATTEMPTS = 5


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store. Credentials never live here: they come
    from the standard AWS chain (environment, profile, instance or pod role)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"  # "auto", "path" or "virtual"


@dataclass(frozen=True)
class FileEntry:
    """A file found under a URI."""

    uri: str
    size: int
    version: str  # what changes when the content does: size+mtime locally, ETag on S3


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Bucket and key of an ``s3://`` URI (the key may be empty)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri} names no bucket: use s3://bucket/prefix")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and S3 alike."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(uri.rstrip(os.sep))


def relative_to(uri: str, base: str) -> str:
    """The '/'-separated path of ``uri`` below ``base`` (as listed by Storage)."""
    if is_s3(uri):
        return uri[len(base.rstrip("/")) + 1 :]
    return Path(os.path.relpath(uri, os.path.abspath(base))).as_posix()


def _hidden(rel: str) -> bool:
    """True for markers and temporary files: a path part starting with '_' or '.'."""
    return any(part[:1] in "_." for part in rel.split("/"))


class Storage:
    """Read, list and atomically write files on local disk or S3."""

    def __init__(self, s3: S3Settings | None = None):
        self.s3 = s3 or S3Settings()
        self._s3fs: pafs.S3FileSystem | None = None
        self._client: Any = None
        self._lock = threading.Lock()
        self._local = pafs.LocalFileSystem()

    # -- clients --------------------------------------------------------------------

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and in-filesystem path for a URI."""
        if is_s3(uri):
            split_s3(uri)
            return self._pyarrow_s3(), uri[len("s3://") :]
        if "://" in uri:
            scheme = uri.split("://", 1)[0]
            raise StorageError(
                f"unsupported URI scheme {scheme!r} in {uri}: use a local path or s3://"
            )
        return self._local, os.path.abspath(uri)

    def _pyarrow_s3(self) -> pafs.S3FileSystem:
        with self._lock:
            if self._s3fs is None:
                self._s3fs = pafs.S3FileSystem(**pyarrow_s3_options(self.s3))
            return self._s3fs

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (boto3 imported lazily)."""
        with self._lock:
            if self._client is None:
                self._client = make_s3_client(self.s3)
            return self._client

    # -- reading --------------------------------------------------------------------

    def info(self, uri: str) -> FileEntry | None:
        """Size and version of a file, or None when there is none."""
        if is_s3(uri):
            return self._s3_info(uri)
        fs, path = self.resolve(uri)
        try:
            st = fs.get_file_info(path)
        except OSError as exc:
            raise StorageError(f"cannot look up {uri}: {_reason(exc)}") from None
        if st.type != pafs.FileType.File:
            return None
        return FileEntry(uri, st.size, _local_version(st))

    def _s3_info(self, uri: str) -> FileEntry | None:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            return None
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot look up {uri}: {_s3_reason(exc)}") from None
        return FileEntry(uri, head["ContentLength"], head["ETag"].strip('"'))

    def exists(self, uri: str) -> bool:
        return self.info(uri) is not None

    def is_dir(self, uri: str) -> bool:
        """True for a local folder, or an S3 prefix holding at least one object."""
        if not is_s3(uri):
            return os.path.isdir(uri)
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        try:
            found = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {_s3_reason(exc)}") from None
        return found.get("KeyCount", 0) > 0

    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as exc:
                if _s3_code(exc) in ("404", "NoSuchKey"):
                    raise StorageError(f"{uri} does not exist") from None
                raise StorageError(f"cannot read {uri}: {_s3_reason(exc)}") from None
        fs, path = self.resolve(uri)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {_reason(exc)}") from None

    def open_input(self, uri: str) -> pa.NativeFile:
        """A random-access handle (for Parquet footers and row groups)."""
        fs, path = self.resolve(uri)
        try:
            return fs.open_input_file(path)
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot open {uri}: {_reason(exc)}") from None

    def list_files(
        self, uri: str, suffix: str = "", hidden: bool = False
    ) -> list[FileEntry]:
        """Files below a folder or prefix (recursive), sorted by URI.

        Unless ``hidden``, names starting with '_' or '.' (markers, temporary files)
        are left out, and so is anything inside a folder whose name starts that way.
        A folder or prefix that does not exist lists as empty.
        """
        found = self._s3_list(uri) if is_s3(uri) else self._local_list(uri)
        kept = [
            entry
            for rel, entry in found
            if entry.uri.endswith(suffix) and (hidden or not _hidden(rel))
        ]
        return sorted(kept, key=lambda e: e.uri)

    def _local_list(self, uri: str) -> list[tuple[str, FileEntry]]:
        fs, path = self.resolve(uri)
        base = path.rstrip("/")
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        try:
            infos = fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"cannot list {uri}: {_reason(exc)}") from None
        return [
            (
                st.path[len(base) :].lstrip("/"),
                FileEntry(st.path, st.size, _local_version(st)),
            )
            for st in infos
            if st.type == pafs.FileType.File
        ]

    def _s3_list(self, uri: str) -> list[tuple[str, FileEntry]]:
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # a "folder" placeholder some tools create
                    entry = FileEntry(
                        f"s3://{bucket}/{obj['Key']}",
                        obj["Size"],
                        obj["ETag"].strip('"'),
                    )
                    found.append((obj["Key"][len(prefix) :], entry))
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {_s3_reason(exc)}") from None
        return found

    def glob(self, pattern: str) -> list[FileEntry]:
        """Files matching a glob; the part before the first wildcard is listed."""
        cut = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
        root = pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else "."
        wanted = pattern if is_s3(pattern) else os.path.abspath(pattern)
        return [
            entry
            for entry in self.list_files(root)
            if fnmatch.fnmatchcase(entry.uri, wanted)
        ]

    # -- writing --------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file so that readers see all of it or nothing."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self._put(bucket, key, data)
            except Exception as exc:
                raise StorageError(f"cannot write {uri}: {_s3_reason(exc)}") from None
            return
        _fs, path = self.resolve(uri)
        try:
            _write_local(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None

    def _put(self, bucket: str, key: str, data: bytes) -> None:
        if len(data) <= MULTIPART_THRESHOLD:
            # One PUT: S3 stores the whole body or nothing.
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        client = self.client
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            for number, start in enumerate(
                range(0, len(data), MULTIPART_PART_SIZE), start=1
            ):
                body = data[start : start + MULTIPART_PART_SIZE]
                sent = client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    Body=body,
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Until completed, the upload is invisible; aborting frees its parts. A
            # process killed here cannot abort: its parts stay invisible (never an
            # object) until the bucket's AbortIncompleteMultipartUpload rule clears
            # them, so set one (see README).
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
            raise

    def copy(self, src: str, dst: str) -> None:
        """Copy one file whole (server-side on S3)."""
        if is_s3(src) and is_s3(dst):
            (sb, sk), (db, dk) = split_s3(src), split_s3(dst)
            try:
                # The managed copy switches to a multipart copy above 5 GB itself.
                self.client.copy({"Bucket": sb, "Key": sk}, db, dk)
            except Exception as exc:
                raise StorageError(
                    f"cannot copy {src} to {dst}: {_s3_reason(exc)}"
                ) from None
            return
        self.write_bytes(dst, self.read_bytes(src))

    def delete(self, uri: str) -> None:
        """Delete a file; one that is already gone is no error."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise StorageError(f"cannot delete {uri}: {_s3_reason(exc)}") from None
            return
        fs, path = self.resolve(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {_reason(exc)}") from None

    def download(self, uri: str, dest: Path) -> None:
        """Copy a file to a local path (parallel ranged GETs on S3).

        Not atomic: download into a temporary folder and rename it when complete.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not is_s3(uri):
            shutil.copyfile(uri, dest)
            return
        bucket, key = split_s3(uri)
        try:
            # The managed download pins every ranged GET to the ETag it saw first
            # (IfMatch), so an object replaced midway fails instead of mixing.
            self.client.download_file(bucket, key, str(dest))
        except Exception as exc:
            raise StorageError(f"cannot download {uri}: {_s3_reason(exc)}") from None


# At DEBUG these print signed request headers (the access key id) and request bodies
# (a part's rows): never wanted in a job log, whatever level the job logs at.
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def make_s3_client(s3: S3Settings) -> Any:
    """A boto3 S3 client from the settings; credentials from the AWS chain only."""
    import boto3
    from botocore.config import Config

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    style = (
        {}
        if s3.addressing_style == "auto"
        else {"addressing_style": s3.addressing_style}
    )
    config = Config(
        region_name=s3.region,
        s3=style,
        retries={"mode": "standard", "max_attempts": S3_RETRY_ATTEMPTS},
    )
    # A session per client: boto3's default session is not safe to share between
    # threads while clients are being made.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=s3.endpoint_url, config=config)


def pyarrow_s3_options(s3: S3Settings) -> dict[str, Any]:
    """Keyword arguments for pyarrow's S3FileSystem.

    pyarrow has no switch for path-style addressing: it uses it whenever an endpoint
    is set, which is where path style matters (MinIO, moto, on-premises stores).
    """
    options: dict[str, Any] = {}
    if s3.region:
        options["region"] = s3.region
    if s3.endpoint_url:
        scheme, sep, host = s3.endpoint_url.partition("://")
        options["endpoint_override"] = (host if sep else scheme).rstrip("/")
        if sep:
            options["scheme"] = scheme
    if s3.addressing_style == "virtual":
        options["force_virtual_addressing"] = True
    return options


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def local_path(uri: str) -> Path:
    """The local path of a non-S3 URI."""
    if is_s3(uri):
        raise StorageError(f"{uri} is not a local path")
    return Path(uri)


def _local_version(st: pafs.FileInfo) -> str:
    mtime = st.mtime_ns if st.mtime_ns is not None else 0
    return f"{st.size}-{mtime}"


def _reason(exc: OSError) -> str:
    # pyarrow's messages carry the path and the cause; they never carry file contents.
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _s3_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _s3_reason(exc: Exception) -> str:
    """The cause of a boto3 failure, with the fix where there is an obvious one.

    Only the error code and type are shown: botocore's messages are PHI-free, but a
    short code is what a person acts on, and it can never echo a request body.
    """
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (
            "no usable AWS credentials: provide them through the standard AWS chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance or "
            "pod role); notecoder never reads them from its config"
        )
    if isinstance(exc, EndpointConnectionError):
        return "cannot reach the S3 endpoint: check s3.endpoint_url and the network"
    code = _s3_code(exc)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"{code}: the credentials from the AWS chain may not do this"
    if code == "NoSuchBucket":
        return "NoSuchBucket: the bucket does not exist (check the URI and s3.region)"
    return code or type(exc).__name__
