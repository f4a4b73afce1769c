"""Incremental runs: code only the notes that no earlier run coded.

A nightly run over a growing archive is told where the notes coded before are
(``--skip-coded URI``, repeatable; ``input.skip_coded`` in a config): an earlier
notecoder output (its committed parts are read, nothing else), a folder holding such
outputs (``s3://bucket/coded/`` above ``coded/2026-12-03/`` ...), or a Parquet ledger
(a file, folder or glob holding the id column). The driver reads only the id column
of those, once, into one Arrow array the engines share through Ray's object store.

Each engine reads its shard whole, leaves out the rows whose id is in the set, and
codes the rest. So for every shard: rows in = rows coded (in the part) + rows skipped
(counted in the shard's tally and the run summary), and a shard whose rows were all
coded before commits an empty part. Every id of an earlier output counts as coded,
whatever its status: re-coding an ``error`` row would put a second row for that note
into a second output, which is worse for the reader than one row that says it failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from notecoder.commit import META_DIR, OutputLayout
from notecoder.errors import ConfigError, PlanError, StorageError
from notecoder.storage import GLOB_CHARS, Storage, is_s3, join, relative_to

log = logging.getLogger(__name__)

RUN_FILE = f"{META_DIR}/run.json"
# Ids hashed per step when fingerprinting the set; bounds memory, not the result.
HASH_BATCH = 100_000


@dataclass(frozen=True)
class SkipSet:
    """Ids coded before, and what they were read from."""

    ids: pa.Array  # unique, no nulls, of the input's id type
    sources: tuple[str, ...]
    fingerprint: str  # changes when the set of ids does

    def record(self) -> dict[str, Any]:
        """What run.json says about it."""
        return {
            "uris": list(self.sources),
            "ids": len(self.ids),
            "fingerprint": self.fingerprint,
        }


def load_skip_set(
    storage: Storage,
    uris: list[str],
    id_column: str,
    id_type: pa.DataType,
    output_uri: str,
) -> SkipSet | None:
    """Read the ids coded before from every URI; None when no URI is given.

    Raises ConfigError when a URI is the output itself, and PlanError when a source
    has no files, lacks the id column, or holds ids of another type.
    """
    if not uris:
        return None
    arrays = []
    for uri in uris:
        if _same_place(uri, output_uri):
            raise ConfigError(
                f"--skip-coded {uri} is the output itself: a rerun already skips the "
                "shards it committed; name an earlier output or a ledger instead"
            )
        for column, ids in _ids_from(storage, uri, id_column):
            arrays.append(_cast(ids, id_type, column, uri))
    ids = pc.unique(pa.chunked_array(arrays, id_type).combine_chunks()).drop_null()
    skip = SkipSet(ids, tuple(uris), _fingerprint(ids))
    log.info("skipping notes coded before: %d ids from %d sources", len(ids), len(uris))
    return skip


def _cast(ids: pa.Array, id_type: pa.DataType, column: str, uri: str) -> pa.Array:
    try:
        return ids.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise PlanError(
            f"--skip-coded {uri}: its id column {column!r} holds {ids.type} values "
            f"that do not convert to the input's {id_type}: point it at a ledger "
            "of the same ids"
        ) from None


def _same_place(a: str, b: str) -> bool:
    if is_s3(a) or is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _ids_from(storage: Storage, uri: str, id_column: str) -> list[tuple[str, pa.Array]]:
    """(id column, ids) for each part of one source: outputs and ledger files."""
    outputs, ledger_files = _find_sources(storage, uri)
    found, files_read = [], len(ledger_files)
    for root in outputs:
        layout = OutputLayout(storage, root)
        manifest = layout.read_json(layout.run_file) or {}
        # Only committed parts count, under the id column that run was told to use.
        column = manifest.get("settings", {}).get("input.id_column", id_column)
        files = layout.committed_parts()
        files_read += len(files)
        found.append((column, _read_ids(storage, files, column, uri)))
    if ledger_files:
        found.append((id_column, _read_ids(storage, ledger_files, id_column, uri)))
    if not files_read:
        raise PlanError(
            f"--skip-coded {uri}: no committed parts or Parquet files found there; "
            "name an earlier notecoder output (or a folder of them) or a Parquet "
            "ledger of ids"
        )
    log.info(
        "--skip-coded %s: %d notecoder outputs, %d ledger files",
        uri,
        len(outputs),
        len(ledger_files),
    )
    return found


def _find_sources(storage: Storage, uri: str) -> tuple[list[str], list[str]]:
    """The notecoder outputs at or below ``uri``, and its other Parquet files.

    A folder holding nightly outputs (``coded/2026-12-03/``, ``coded/2026-12-04/``)
    counts each output's committed parts and nothing else of it; Parquet files
    outside any output are ledger files.
    """
    from notecoder.plan import find_files

    try:
        if any(c in uri for c in GLOB_CHARS) or storage.info(uri) is not None:
            return [], [e.uri for e in find_files(storage, uri)]
        entries = storage.list_files(uri, hidden=True)
    except StorageError as exc:
        raise PlanError(f"--skip-coded {uri}: {exc}") from None
    rels = [(relative_to(e.uri, uri), e.uri) for e in entries]
    roots = [
        rel[: -len(RUN_FILE)].rstrip("/")
        for rel, _ in rels
        if rel == RUN_FILE or rel.endswith("/" + RUN_FILE)
    ]
    ledger = [
        full
        for rel, full in rels
        if rel.endswith(".parquet")
        and not any(p[:1] in "_." for p in rel.split("/"))
        and not any(root == "" or rel.startswith(root + "/") for root in roots)
    ]
    return [join(uri, r) if r else uri for r in sorted(roots)], ledger


def _read_ids(storage: Storage, files: list[str], column: str, source: str) -> pa.Array:
    chunks = [_read_column(storage, f, column, source) for f in files]
    if not chunks:
        return pa.array([], pa.string())
    return pa.chunked_array(chunks).combine_chunks()


def _read_column(storage: Storage, file_uri: str, column: str, source: str) -> pa.Array:
    try:
        with storage.open_input(file_uri) as handle:
            parquet = pq.ParquetFile(handle)
            if column not in parquet.schema_arrow.names:
                raise PlanError(
                    f"--skip-coded {source}: {file_uri} has no column {column!r}; "
                    "set input.id_column to the ledger's id column"
                )
            return parquet.read(columns=[column]).column(column).combine_chunks()
    except (StorageError, OSError, pa.ArrowException) as exc:
        reason = type(exc).__name__
        raise PlanError(
            f"--skip-coded {source}: cannot read {file_uri} ({reason}): fix or remove "
            "it"
        ) from None


def _fingerprint(ids: pa.Array) -> str:
    ordered = ids.take(pc.sort_indices(ids))
    h = hashlib.sha256(str(ids.type).encode())
    for start in range(0, len(ordered), HASH_BATCH):
        chunk = ordered.slice(start, HASH_BATCH).to_pylist()
        h.update(("\n".join(map(str, chunk)) + "\n").encode())
    return h.hexdigest()[:32]


def input_id_type(storage: Storage, file_uri: str, id_column: str) -> pa.DataType:
    """The Arrow type of the id column in one input file (a footer read)."""
    with storage.open_input(file_uri) as handle:
        schema = pq.read_schema(handle)
    if id_column in schema.names:
        return schema.field(id_column).type
    # A Hive partition key used as the id column: partition values are strings.
    return pa.string()


def drop_skipped(
    table: pa.Table, id_column: str, skip_ids: pa.Array | None
) -> tuple[pa.Table, int]:
    """The rows whose id is not in ``skip_ids``, and how many were left out."""
    if skip_ids is None or len(skip_ids) == 0:
        return table, 0
    ids = table.column(id_column)
    # A null id is never in the set; fill_null keeps filter() from dropping it.
    seen = pc.fill_null(pc.is_in(ids, value_set=skip_ids.cast(ids.type)), False)
    kept = table.filter(pc.invert(seen))
    return kept, table.num_rows - kept.num_rows
