"""Planning: find the archive's Parquet files, read their footers, cut shards.

Planning runs on the driver before any engine starts, reads only footers, and finds
every problem it can (no files, missing columns, unreadable files) so that a bad input
fails in seconds with one message, not an hour into a run.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.config import InputConfig
from notecoder.errors import PlanError, StorageError
from notecoder.storage import GLOB_CHARS, FileEntry, Storage

log = logging.getLogger(__name__)

# Footer reads are latency-bound on S3; a few threads hide most of it.
FOOTER_THREADS = 16
MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class Shard:
    """A run of whole row groups of one file: the unit of work and of commit."""

    shard_id: str
    file_uri: str
    row_groups: tuple[int, ...]
    num_rows: int
    partitions: tuple[tuple[str, str], ...] = ()


@dataclass
class InputFile:
    entry: FileEntry
    row_group_rows: list[int]
    columns: list[str]
    partitions: dict[str, str] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass
class Plan:
    """What a run will code."""

    input_uri: str
    files: list[InputFile]
    shards: list[Shard]

    @property
    def total_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Changes when any input file is added, removed or rewritten."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.entry.uri}\0{f.entry.size}\0{f.entry.version}\n".encode())
        return h.hexdigest()[:32]


def find_files(storage: Storage, uri: str) -> list[FileEntry]:
    """The Parquet files an input URI names: a file, a glob, or a folder/prefix."""
    if any(c in uri for c in GLOB_CHARS):
        return storage.glob(uri)
    entry = storage.info(uri)
    if entry is not None:
        return [entry]
    return storage.list_files(uri, suffix=".parquet")


def plan_archive(storage: Storage, input_cfg: InputConfig, shard_rows: int) -> Plan:
    """Plan a run over ``input_cfg.uri``; raises PlanError naming every bad file."""
    uri = input_cfg.uri
    if not uri:
        raise PlanError("no input given: pass --input or set input.uri")
    try:
        entries = find_files(storage, uri)
    except StorageError as exc:
        raise PlanError(f"cannot list input {uri}: {exc}") from None
    if not entries:
        raise PlanError(
            f"no Parquet files found at {uri}: point --input at a folder, glob or file "
            "holding *.parquet"
        )
    root = uri if storage.info(uri) is None else None
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(entries))) as pool:
        results = list(pool.map(lambda e: _read_footer(storage, e, root), entries))
    files = [r for r in results if isinstance(r, InputFile)]
    problems = [r for r in results if isinstance(r, str)]
    problems += _column_problems(files, input_cfg)
    if problems:
        raise PlanError(_summarise_problems(uri, len(entries), problems))
    shards = [s for f in files for s in _cut(f, shard_rows)]
    log.info(
        "planned %d shards over %d files, %d rows",
        len(shards),
        len(files),
        sum(s.num_rows for s in shards),
    )
    return Plan(uri, files, shards)


def _read_footer(
    storage: Storage, entry: FileEntry, root: str | None
) -> InputFile | str:
    try:
        with storage.open_input(entry.uri) as handle:
            meta = pq.ParquetFile(handle).metadata
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        columns = list(meta.schema.to_arrow_schema().names)
    except (StorageError, OSError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{entry.uri} is not readable Parquet ({reason}): fix or remove it"
    return InputFile(entry, rows, columns, _partitions(entry.uri, root))


def _partitions(file_uri: str, root: str | None) -> dict[str, str]:
    """Hive partition keys from folder names below the input root (key=value)."""
    if root is None:
        return {}
    rel = (
        file_uri[len(root.rstrip("/")) :]
        if file_uri.startswith(root.rstrip("/"))
        else ""
    )
    parts = {}
    for piece in rel.strip("/").split("/")[:-1]:
        key, eq, value = piece.partition("=")
        if eq and key:
            parts[key] = value
    return parts


def _column_problems(files: list[InputFile], cfg: InputConfig) -> list[str]:
    problems = []
    needed = [cfg.id_column, cfg.text_column, *cfg.passthrough_columns]
    for f in files:
        available = set(f.columns) | set(f.partitions)
        missing = [c for c in needed if c not in available]
        if missing:
            problems.append(
                f"{f.entry.uri} has no column {', '.join(map(repr, missing))} (it has: "
                f"{', '.join(f.columns)}); set input.id_column / input.text_column / "
                "input.passthrough_columns to match"
            )
    return problems


def _summarise_problems(uri: str, n_files: int, problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    text = f"input {uri}: {len(problems)} of {n_files} files cannot be used:\n  "
    text += "\n  ".join(shown)
    if more:
        text += f"\n  ... and {more} more"
    return text


def _cut(f: InputFile, shard_rows: int) -> list[Shard]:
    shards = []
    start, rows = 0, 0
    for i, n in enumerate(f.row_group_rows):
        rows += n
        last = i == len(f.row_group_rows) - 1
        if rows >= shard_rows or last:
            groups = tuple(range(start, i + 1))
            shards.append(_shard(f, groups, rows))
            start, rows = i + 1, 0
    return [s for s in shards if s.num_rows > 0]


def _shard(f: InputFile, groups: tuple[int, ...], rows: int) -> Shard:
    key = f"{f.entry.uri}\0{f.entry.size}\0{f.entry.version}\0{groups[0]}-{groups[-1]}"
    shard_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Shard(
        shard_id, f.entry.uri, groups, rows, tuple(sorted(f.partitions.items()))
    )


def read_shard(storage: Storage, shard: Shard, columns: list[str]) -> pa.Table:
    """Read a shard's rows, only the named columns; partition keys become columns."""
    parts = dict(shard.partitions)
    file_cols = [c for c in columns if c not in parts]
    with storage.open_input(shard.file_uri) as handle:
        table = pq.ParquetFile(handle).read_row_groups(
            list(shard.row_groups), columns=file_cols
        )
    if table.num_rows != shard.num_rows:
        raise StorageError(
            f"{shard.file_uri} changed since planning: shard {shard.shard_id} expected "
            f"{shard.num_rows} rows, read {table.num_rows}"
        )
    for name in columns:
        if name in parts and name not in table.column_names:
            table = table.append_column(name, pa.array([parts[name]] * table.num_rows))
    return table.select(columns)
