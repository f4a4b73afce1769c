"""Resolving the configured model to a local folder and identifying its content.

The content hash covers every file of the model (weights, config, tokenizer, chat
template), so the audit trail can say exactly which model coded a row, and a rerun with
changed weights under the same path is caught. A LoRA adapter (``model.lora_path``)
is checked and hashed the same way, and its hash joins the model's in the row label.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from notecoder.config import ModelConfig
from notecoder.errors import ModelError
from notecoder.storage import Storage, is_s3

log = logging.getLogger(__name__)

HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter ready to load: where it is locally, what it is, its rank."""

    source: str  # as configured: a folder or s3:// prefix
    local_dir: str
    content_hash: str
    rank: int  # the largest rank in its adapter_config.json

    @property
    def label(self) -> str:
        return f"{_name(self.source)}@{self.content_hash[:12]}"


@dataclass(frozen=True)
class ModelRef:
    """A model ready to load: where it is locally and what it is."""

    source: str  # as configured: a folder or s3:// prefix
    local_dir: str
    content_hash: str
    adapter: AdapterRef | None = None

    @property
    def label(self) -> str:
        """What goes into each output row's `model` column.

        ``name@hash`` of the model, then ``+name@hash`` of its LoRA adapter if any:
        rows coded through two adapters of one base model never share a label.
        """
        label = f"{_name(self.source)}@{self.content_hash[:12]}"
        if self.adapter is not None:
            label += f"+{self.adapter.label}"
        return label


def _name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]


def cache_root() -> Path:
    base = os.environ.get("NOTECODER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "notecoder"
    )
    return Path(base)


def resolve_model(
    storage: Storage,
    source: str,
    lora_path: str | None = None,
    max_lora_rank: int = 16,
) -> ModelRef:
    """Check the model (and adapter) and hash their content.

    S3 prefixes are downloaded first. Raises ModelError naming what to change.
    """
    local = _local_folder(storage, source)
    if not local.is_dir():
        raise ModelError(
            f"model {source} is not a folder: set --model to a model folder"
        )
    if not (local / "config.json").is_file():
        raise ModelError(
            f"model {source} has no config.json: point --model at a folder in Hugging "
            "Face layout (config.json, weights, tokenizer)"
        )
    adapter = None
    if lora_path:
        adapter = resolve_adapter(storage, lora_path, max_lora_rank)
    return ModelRef(source, str(local), content_hash(local), adapter)


def _local_folder(storage: Storage, source: str) -> Path:
    if is_s3(source):
        from notecoder.s3model import download_model

        return download_model(storage, source, cache_root() / "models")
    return Path(source)


def resolve_adapter(storage: Storage, source: str, max_rank: int) -> AdapterRef:
    """Check a PEFT LoRA adapter folder (or s3:// prefix) and hash its content.

    Checked here, on the driver, so that a wrong path or a rank above
    ``model.max_lora_rank`` fails before any engine starts; vLLM would only say so
    when the first shard asks for the adapter.
    """
    where = f"LoRA adapter {source} (model.lora_path)"
    try:
        local = _local_folder(storage, source)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    if not local.is_dir():
        raise ModelError(f"{where} is not a folder: point it at a PEFT adapter folder")
    try:
        config = json.loads((local / "adapter_config.json").read_text())
    except OSError:
        raise ModelError(
            f"{where} has no adapter_config.json: point it at a folder saved by PEFT "
            "(adapter_config.json and adapter_model.safetensors)"
        ) from None
    except ValueError:
        raise ModelError(f"{where}: adapter_config.json is not valid JSON") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelError(
            f"{where} is a {config.get('peft_type')} adapter; vLLM serves LoRA only"
        )
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not any((local / name).is_file() for name in weights):
        raise ModelError(f"{where} has no adapter_model.safetensors")
    rank = _adapter_rank(config, where)
    if rank > max_rank:
        allowed = get_args(ModelConfig.model_fields["max_lora_rank"].annotation)
        fit = min((r for r in allowed if r >= rank), default=None)
        hint = f"set model.max_lora_rank to {fit}" if fit else "vLLM cannot serve it"
        raise ModelError(
            f"{where} has rank {rank}, above model.max_lora_rank ({max_rank}): {hint}"
        )
    return AdapterRef(source, str(local), content_hash(local), rank)


def _adapter_rank(config: dict, where: str) -> int:
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise ModelError(
            f"{where}: adapter_config.json needs a positive integer rank 'r'"
        )
    return max(ranks)


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
