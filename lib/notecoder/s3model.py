"""Models kept on S3: fetched once per node into a local cache, then loaded from disk.

vLLM loads a model from a local folder, so a model given as ``s3://bucket/prefix`` is
downloaded first into ``<cache_dir>/<bucket>/<prefix>/``. The folder records what it
was made from (each object's size and ETag) in a hidden manifest; the next request
lists the prefix again and reuses the folder only if every object is unchanged.

Several engines on one node may ask at once: a file lock next to the folder lets one of
them download while the others wait, and the download goes into a temporary folder
that is renamed into place only when complete, so no engine ever loads half a model.
The lock is ``flock``: sound on one node's local disk, not across nodes sharing NFS
(each node should have its own cache, which is the point of the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from notecoder.errors import ModelError
from notecoder.storage import Storage, is_s3, split_s3

log = logging.getLogger(__name__)

MANIFEST = ".notecoder-download.json"


def download_model(storage: Storage, source: str, cache_dir: Path) -> Path:
    """The local folder holding the model at ``source``, downloading it if needed.

    Raises ModelError when the prefix holds no files or names unsafe paths, and
    StorageError when S3 cannot be read.
    """
    remote = _remote_files(storage, source)
    target = cache_folder(cache_dir, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if _is_current(target, remote):
            log.info("model %s: using the cached copy in %s", source, target)
            return target
        _fetch(storage, source, remote, target)
    return target


def cache_folder(cache_dir: Path, source: str) -> Path:
    """Where the model at an S3 prefix is cached: keyed by bucket and prefix."""
    bucket, key = split_s3(source)
    parts = [bucket, *(p for p in key.split("/") if p)]
    _check_parts(source, parts)
    return Path(cache_dir).joinpath(*parts)


def ensure_local_model(
    storage: Storage, source: str, local_dir: str, content_hash: str | None = None
) -> str:
    """The folder an engine should load, on whichever node the engine runs.

    The driver resolved ``local_dir`` on its own node. For an S3 model every engine
    asks its own node's cache (a listing when the copy is current, a download when it
    is missing or stale) and checks the content hash the driver recorded, so a node
    can neither lack the model nor load an older copy under the run's label. A local
    folder must be visible at the same path on every node (shared storage).
    """
    if is_s3(source):
        from notecoder.modelref import cache_root
        from notecoder.modelref import content_hash as hash_of

        folder = download_model(storage, source, cache_root() / "models")
        if content_hash and hash_of(folder) != content_hash:
            raise ModelError(
                f"model {source} changed since this run began (its content hash no "
                "longer matches run.json): restore it, or start a new run with "
                "--new-run"
            )
        return str(folder)
    if not Path(local_dir).is_dir():
        raise ModelError(
            f"model folder {local_dir} does not exist on this node: put the model on "
            "storage every node sees, or on S3"
        )
    return local_dir


def _check_parts(source: str, parts: list[str]) -> None:
    # An object key may hold '..'; it must never lead a write out of the cache.
    if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
        raise ModelError(
            f"model {source} has a path part the cache cannot hold safely ('.', '..' "
            "or a backslash): move the model to a plain prefix"
        )


def _remote_files(storage: Storage, source: str) -> dict[str, dict]:
    """Relative path -> {size, etag} of every object under the prefix."""
    found = {}
    prefix = source.rstrip("/") + "/"
    for entry in storage.list_files(source, hidden=True):
        rel = entry.uri[len(prefix) :]
        _check_parts(source, rel.split("/"))
        found[rel] = {"size": entry.size, "etag": entry.version}
    if not found:
        raise ModelError(
            f"model {source} holds no files: point --model at the S3 prefix of a "
            "folder in Hugging Face layout"
        )
    return found


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        # Blocks while another process (or thread) of this node holds it.
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_current(target: Path, remote: dict[str, dict]) -> bool:
    """True when the cached folder holds exactly the listed objects, whole."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("files") != remote:
        return False
    local = {
        p.relative_to(target).as_posix(): p.stat().st_size
        for p in target.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    return local == {rel: meta["size"] for rel, meta in remote.items()}


def _fetch(
    storage: Storage, source: str, remote: dict[str, dict], target: Path
) -> None:
    total = sum(meta["size"] for meta in remote.values())
    log.info(
        "model %s: downloading %d files, %.1f MiB, into %s",
        source,
        len(remote),
        total / (1 << 20),
        target,
    )
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel, meta in sorted(remote.items()):
            _fetch_one(storage, source, rel, meta, tmp / rel)
        manifest = {"source": source, "files": remote}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_one(storage: Storage, source: str, rel: str, meta: dict, dest: Path) -> None:
    uri = source.rstrip("/") + "/" + rel
    storage.download(uri, dest)
    size = dest.stat().st_size
    # An ETag is not always an MD5 (multipart uploads, SSE-KMS), so the check is that
    # the object is still the one listed, and that the bytes on disk add up.
    after = storage.info(uri)
    if size != meta["size"] or after is None or after.version != meta["etag"]:
        raise ModelError(
            f"model {source}: {rel} changed while it was downloaded (or arrived "
            "short); run again once the model is no longer being written"
        )


def _swap_in(tmp: Path, target: Path) -> None:
    """Put a complete download in place of the target folder (held under the lock)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
