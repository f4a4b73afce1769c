"""One storage layer for local disk and S3.

Every path notecoder handles is a URI string: a local path (``/data/notes``) or
``s3://bucket/prefix``. :class:`Storage` resolves each URI to a pyarrow filesystem and
offers the handful of operations the job needs, so the planning, coding and commit code
is the same for both and tests exercise the same lines against disk and a real S3 API.

Writes are whole-or-nothing: locally a temporary name in the same folder and a rename;
on S3 the object only becomes visible when its upload completes (a single PUT, or a
multipart upload that is aborted on failure), so a reader never sees half a file.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from notecoder.errors import StorageError

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store. Credentials never live here: they come
    from the standard AWS chain (environment, profile, instance or pod role)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"  # "auto", "path" or "virtual"


@dataclass(frozen=True)
class FileEntry:
    """A file found under an input URI."""

    uri: str
    size: int
    version: str  # what changes when the content does: size+mtime locally, ETag on S3


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and S3 alike."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(uri.rstrip(os.sep))


class Storage:
    """Read, list and atomically write files on local disk or S3."""

    def __init__(self, s3: S3Settings | None = None):
        self.s3 = s3 or S3Settings()
        self._s3fs: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    # -- resolution -----------------------------------------------------------------

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and in-filesystem path for a URI."""
        if is_s3(uri):
            return self._s3(), uri[len("s3://") :]
        if "://" in uri:
            scheme = uri.split("://", 1)[0]
            raise StorageError(
                f"unsupported URI scheme {scheme!r} in {uri}: use a local path or s3://"
            )
        return self._local, os.path.abspath(uri)

    def _s3(self) -> pafs.S3FileSystem:
        if self._s3fs is None:
            kwargs: dict = {}
            if self.s3.region:
                kwargs["region"] = self.s3.region
            if self.s3.endpoint_url:
                scheme, _, host = self.s3.endpoint_url.partition("://")
                kwargs["endpoint_override"] = host or scheme
                if host:
                    kwargs["scheme"] = scheme
            if self.s3.addressing_style == "virtual":
                kwargs["force_virtual_addressing"] = True
            self._s3fs = pafs.S3FileSystem(**kwargs)
        return self._s3fs

    def _uri(self, fs: pafs.FileSystem, path: str) -> str:
        return "s3://" + path if isinstance(fs, pafs.S3FileSystem) else path

    # -- reading --------------------------------------------------------------------

    def info(self, uri: str) -> FileEntry | None:
        """Size and version of a file, or None when there is none."""
        fs, path = self.resolve(uri)
        try:
            st = fs.get_file_info(path)
        except OSError as exc:
            raise StorageError(f"cannot look up {uri}: {_reason(exc)}") from None
        if st.type != pafs.FileType.File:
            return None
        return FileEntry(uri, st.size, _version(st))

    def exists(self, uri: str) -> bool:
        return self.info(uri) is not None

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        try:
            return fs.get_file_info(path).type == pafs.FileType.Directory
        except OSError as exc:
            raise StorageError(f"cannot look up {uri}: {_reason(exc)}") from None

    def read_bytes(self, uri: str) -> bytes:
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

    def list_files(self, uri: str, suffix: str = "") -> list[FileEntry]:
        """Files below a folder or prefix (recursive), sorted by URI.

        Names starting with '_' or '.' (markers, temp files) are left out, and so is
        anything inside a folder whose name starts that way.
        """
        fs, path = self.resolve(uri)
        selector = pafs.FileSelector(
            path.rstrip("/"), recursive=True, allow_not_found=True
        )
        try:
            infos = fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"cannot list {uri}: {_reason(exc)}") from None
        base = path.rstrip("/")
        found = []
        for st in infos:
            if st.type != pafs.FileType.File or not st.path.endswith(suffix):
                continue
            rel = st.path[len(base) :].lstrip("/")
            if any(part[:1] in "_." for part in rel.split("/")):
                continue
            found.append(FileEntry(self._uri(fs, st.path), st.size, _version(st)))
        return sorted(found, key=lambda e: e.uri)

    def glob(self, pattern: str) -> list[FileEntry]:
        """Files matching a glob; the part before the first wildcard is listed."""
        cut = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
        root = pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else "."
        matches = [
            entry
            for entry in self.list_files(root)
            if fnmatch.fnmatchcase(entry.uri, self._normal(pattern))
        ]
        return matches

    def _normal(self, pattern: str) -> str:
        return pattern if is_s3(pattern) else os.path.abspath(pattern)

    # -- writing --------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file so that readers see all of it or nothing."""
        fs, path = self.resolve(uri)
        try:
            if isinstance(fs, pafs.LocalFileSystem):
                self._write_local(path, data)
            else:
                # The data is complete before the upload starts; the object exists only
                # once close() completes the PUT, so an interrupted upload leaves none.
                with fs.open_output_stream(path) as f:
                    f.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {_reason(exc)}") from None

    def _write_local(self, path: str, data: bytes) -> None:
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

    def delete(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {_reason(exc)}") from None


def local_path(uri: str) -> Path:
    """The local path of a non-S3 URI."""
    if is_s3(uri):
        raise StorageError(f"{uri} is not a local path")
    return Path(uri)


def _version(st: pafs.FileInfo) -> str:
    mtime = st.mtime_ns if st.mtime_ns is not None else 0
    return f"{st.size}-{mtime}"


def _reason(exc: OSError) -> str:
    # pyarrow's messages carry the path and the cause; they never carry file contents.
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
