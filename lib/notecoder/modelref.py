"""Resolving the configured model to a local folder and identifying its content.

The content hash covers every file of the model (weights, config, tokenizer, chat
template), so the audit trail can say exactly which model coded a row, and a rerun with
changed weights under the same path is caught.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from notecoder.errors import ModelError
from notecoder.storage import Storage, is_s3

log = logging.getLogger(__name__)

HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelRef:
    """A model ready to load: where it is locally and what it is."""

    source: str  # as configured: a folder or s3:// prefix
    local_dir: str
    content_hash: str

    @property
    def label(self) -> str:
        """What goes into each output row's `model` column."""
        name = self.source.rstrip("/").rsplit("/", 1)[-1]
        return f"{name}@{self.content_hash[:12]}"


def cache_root() -> Path:
    base = os.environ.get("NOTECODER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "notecoder"
    )
    return Path(base)


def resolve_model(storage: Storage, source: str) -> ModelRef:
    """Check the model and hash its content; S3 prefixes are downloaded first."""
    if is_s3(source):
        from notecoder.s3model import download_model

        local = download_model(storage, source, cache_root() / "models")
    else:
        local = Path(source)
    if not local.is_dir():
        raise ModelError(
            f"model {source} is not a folder: set --model to a model folder"
        )
    if not (local / "config.json").is_file():
        raise ModelError(
            f"model {source} has no config.json: point --model at a folder in Hugging "
            "Face layout (config.json, weights, tokenizer)"
        )
    return ModelRef(source, str(local), content_hash(local))


def content_hash(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes, cached by size and mtime."""
    cache_file = cache_root() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    h = hashlib.sha256()
    changed = False
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            digest = _file_hash(path)
            cache[key] = digest
            changed = True
        h.update(f"{rel}\0{digest}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError as exc:
            log.warning("cannot save the model hash cache (%s)", exc.strerror)
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
