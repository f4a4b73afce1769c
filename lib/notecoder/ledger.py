"""The run ledger: every run's totals, and its accuracy when evaluated, night by night.

This is a history of runs for charting cost per 1K tokens, throughput and F1 over
time; it is not the Parquet list of coded note ids that ``--skip-coded`` reads.

    LEDGER/
      run-<run id>.parquet                one row: the run's summary and identity
      eval-<run id>-<UTC time>.parquet    one row: a `notecoder eval --record`

Where: ``output.ledger_uri``; by default ``_notecoder-ledger/`` beside the output
(``<output>/../_notecoder-ledger/``), so nightly outputs written under one prefix
(``s3://bucket/coded/2026-12-04/`` ...) share one ledger. ``""`` keeps none. The
leading underscore hides it, as Spark and notecoder's own readers hide ``_`` folders,
from anything that reads the outputs' parent folder (``--skip-coded
s3://bucket/coded/``, a Spark glob): ledger rows are never taken for coded notes.

Why a file per row: every writer writes a file no other writer names, whole
(:meth:`Storage.write_bytes`), so two nights finishing at once never race and S3
needs neither locking nor appends. A run's file is rewritten at the end of each of
its attempts, so it always holds the totals of the run so far. Reading globs the
folder (:func:`read_history`, or DuckDB/polars on ``LEDGER/run-*.parquet``), and
merges each run with its latest evaluation. Files written by other notecoder
versions may have more or fewer columns; reading unifies them.

Adding to the ledger never fails a run: the run's rows are committed by then, so a
ledger that cannot be written is logged as a warning and the run goes on.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.config import JobConfig
from notecoder.errors import NotecoderError, StorageError
from notecoder.results import STATUSES
from notecoder.storage import Storage, is_s3, join, split_s3
from notecoder.tally import RunSummary

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "_notecoder-ledger"
READ_THREADS = 16
# Rows shown by format_history; the JSON and the picture hold them all.
HISTORY_ROWS_SHOWN = 30

_TIME = pa.timestamp("us", tz="UTC")
_IDENTITY = [
    ("run_id", pa.string()),
    ("kind", pa.string()),
    ("recorded_at", _TIME),
]
_RUN_TEXT = [
    ("created_at", _TIME),
    ("ended_at", _TIME),
    ("status", pa.string()),
    ("complete", pa.bool_()),
    ("model_label", pa.string()),
    ("model_path", pa.string()),
    ("input_uri", pa.string()),
    ("output_uri", pa.string()),
    ("code_set", pa.string()),
    ("notecoder_version", pa.string()),
    ("replaces_run", pa.string()),
]
_NUMBER_TYPES = {"int": pa.int64(), "float": pa.float64()}


def _summary_fields() -> list[tuple[str, pa.DataType]]:
    # Every number of RunSummary becomes a column, so a counter added there is
    # charted here without a change.
    found = [
        (f.name, _NUMBER_TYPES[f.type])
        for f in dataclasses.fields(RunSummary)
        if f.type in _NUMBER_TYPES
    ]
    return found + [("total_tokens", pa.int64())]


RUN_SCHEMA = pa.schema(
    _IDENTITY
    + _RUN_TEXT
    + _summary_fields()
    + [(f"rows_{status}", pa.int64()) for status in STATUSES]
)
EVAL_SCHEMA = pa.schema(
    _IDENTITY
    + [
        ("gold_uri", pa.string()),
        ("predicted_codes", pa.string()),
        ("gold_notes", pa.int64()),
        ("matched_notes", pa.int64()),
        ("code_micro_precision", pa.float64()),
        ("code_micro_recall", pa.float64()),
        ("code_micro_f1", pa.float64()),
        ("code_macro_f1", pa.float64()),
        ("category_micro_f1", pa.float64()),
        ("primary_exact_match", pa.float64()),
        ("coverage", pa.float64()),
    ]
)
EVAL_COLUMNS = [name for name in EVAL_SCHEMA.names if name not in ("run_id", "kind")]


# -- where ----------------------------------------------------------------------------


def default_ledger_uri(output_uri: str) -> str | None:
    """``_notecoder-ledger/`` beside the output; None for an output at a bucket root."""
    if is_s3(output_uri):
        bucket, key = split_s3(output_uri)
        key = key.strip("/")
        if not key:
            return None
        above = key.rsplit("/", 1)[0] if "/" in key else ""
        return f"s3://{bucket}/" + "/".join(p for p in (above, DEFAULT_FOLDER) if p)
    return os.path.join(os.path.dirname(os.path.abspath(output_uri)), DEFAULT_FOLDER)


def ledger_uri(configured: str | None, output_uri: str | None) -> str | None:
    """The ledger a run writes to: ``output.ledger_uri``, else beside the output."""
    if configured is not None:
        return configured or None
    return default_ledger_uri(output_uri) if output_uri else None


def ledger_uri_of_run(manifest: dict[str, Any], output_uri: str) -> str | None:
    """The ledger the run recorded in ``manifest`` (its run.json) writes to."""
    output = manifest.get("config", {}).get("output", {})
    return ledger_uri(output.get("ledger_uri"), output_uri)


# -- writing --------------------------------------------------------------------------


def record_run(
    cfg: JobConfig, manifest: dict[str, Any], summary: RunSummary, storage: Storage
) -> str | None:
    """Add (or update) the run's row; return the file written, None if none was.

    Called by the runner whenever it writes summary.json. Never raises: see the
    module docstring.
    """
    uri = ledger_uri(cfg.output.ledger_uri, cfg.output.uri)
    if uri is None:
        return None
    try:
        row = run_row(manifest, summary, cfg.output.uri or "")
        return _write(storage, uri, f"run-{summary.run_id}.parquet", row, RUN_SCHEMA)
    except Exception as exc:  # a ledger must never fail a run whose rows are committed
        log.warning(
            "run %s: not added to the run ledger at %s (%s); the run is unaffected",
            summary.run_id,
            uri,
            _reason(exc),
        )
        return None


def run_row(
    manifest: dict[str, Any], summary: RunSummary, output_uri: str
) -> dict[str, Any]:
    """The ledger row of a run: its identity from run.json and its summary."""
    attempts = manifest.get("attempts") or [{}]
    model = manifest.get("model", {})
    row = {
        "run_id": summary.run_id,
        "kind": "run",
        "recorded_at": _utcnow(),
        "created_at": _parse_time(manifest.get("created_at")),
        "ended_at": _parse_time(manifest.get("ended_at")),
        "status": attempts[-1].get("status"),
        "complete": summary.shards_committed == summary.shards_total,
        "model_label": model.get("label"),
        "model_path": model.get("path"),
        "input_uri": manifest.get("input", {}).get("uri"),
        "output_uri": output_uri,
        "code_set": manifest.get("code_set"),
        "notecoder_version": manifest.get("notecoder_version"),
        "replaces_run": manifest.get("replaces_run"),
    }
    row.update({k: v for k, v in summary.to_dict().items() if k in RUN_SCHEMA.names})
    row.update({f"rows_{s}": summary.statuses.get(s, 0) for s in STATUSES})
    return row


def record_eval(
    storage: Storage, uri: str, run_id: str, report: Any, gold_uri: str
) -> str:
    """Add one evaluation of run ``run_id`` (an EvalReport); return the file written.

    Raises StorageError when the ledger cannot be written: someone asked for it.
    """
    now = _utcnow()
    row = {
        "run_id": run_id,
        "kind": "eval",
        "recorded_at": now,
        "gold_uri": gold_uri,
        "predicted_codes": report.predicted_codes,
        "gold_notes": report.gold_notes,
        "matched_notes": report.matched_notes,
        "code_micro_precision": report.code.micro.precision,
        "code_micro_recall": report.code.micro.recall,
        "code_micro_f1": report.code.micro.f1,
        "code_macro_f1": report.code.macro.f1,
        "category_micro_f1": report.category.micro.f1,
        "primary_exact_match": report.primary_exact_match,
        "coverage": report.coverage,
    }
    name = f"eval-{run_id}-{now.strftime('%Y%m%dT%H%M%S%fZ')}.parquet"
    return _write(storage, uri, name, row, EVAL_SCHEMA)


def _write(
    storage: Storage, uri: str, name: str, row: dict[str, Any], schema: pa.Schema
) -> str:
    table = pa.Table.from_pylist([row], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    target = join(uri, name)
    storage.write_bytes(target, buf.getvalue())
    log.info("run ledger: wrote %s", target)
    return target


# -- reading --------------------------------------------------------------------------


def read_history(storage: Storage, uri: str) -> list[dict[str, Any]]:
    """One dict per run, oldest first: its latest run row and latest evaluation.

    An evaluated run whose run row is missing (written to another ledger) still
    appears, with its evaluation only. Raises StorageError when nothing is there.
    """
    entries = storage.list_files(uri, suffix=".parquet")
    if not entries:
        raise StorageError(
            f"no run ledger at {uri}: give the folder named by output.ledger_uri, by "
            f"default {DEFAULT_FOLDER}/ beside the outputs"
        )
    with ThreadPoolExecutor(min(READ_THREADS, len(entries))) as pool:
        tables = list(pool.map(lambda e: _read(storage, e.uri), entries))
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist()
    return _merge(rows)


def _read(storage: Storage, uri: str) -> pa.Table:
    try:
        with storage.open_input(uri) as handle:
            return pq.read_table(handle)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(
            f"ledger file {uri} is not readable Parquet ({type(exc).__name__}): "
            "remove it"
        ) from None


def _merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["recorded_at"] or _EPOCH):
        latest[row["run_id"], row["kind"]] = row
    merged: dict[str, dict[str, Any]] = {}
    for (run_id, kind), row in latest.items():
        entry = merged.setdefault(run_id, {"run_id": run_id})
        if kind == "eval":
            entry.update({c: row.get(c) for c in EVAL_COLUMNS if c != "recorded_at"})
            entry["evaluated_at"] = row["recorded_at"]
        else:
            entry.update({k: v for k, v in row.items() if k not in EVAL_COLUMNS})
            entry["recorded_at"] = row["recorded_at"]
    # Eval-only keys are filled with None so every dict has the same keys.
    keys = {k for entry in merged.values() for k in entry}
    out = [{k: entry.get(k) for k in sorted(keys)} for entry in merged.values()]
    return sorted(out, key=lambda e: (e.get("created_at") or _EPOCH, e["run_id"]))


# -- showing --------------------------------------------------------------------------


def format_history(
    history: list[dict[str, Any]], last: int = HISTORY_ROWS_SHOWN
) -> str:
    """The newest ``last`` runs as a terminal table, one line per run."""
    head = (
        f"{'started (UTC)':<16}  {'run':<8}  {'model':<20}  {'notes':>9}  "
        f"{'tokens/s':>9}  {'$/1K tok':>9}  {'$/1K notes':>10}  {'F1':>5}"
    )
    lines = [f"run ledger: {len(history)} run(s)", head]
    for e in history[-last:]:
        lines.append(
            f"{_stamp(e.get('created_at')):<16}  {e['run_id'][-8:]:<8}  "
            f"{(e.get('model_label') or '-')[:20]:<20}  "
            f"{_num(e.get('rows'), '{:,}'):>9}  "
            f"{_num(e.get('tokens_per_second'), '{:,.1f}'):>9}  "
            f"{_num(e.get('usd_per_1k_tokens'), '{:.6f}'):>9}  "
            f"{_num(e.get('usd_per_1k_notes'), '{:.4f}'):>10}  "
            f"{_num(e.get('code_micro_f1'), '{:.3f}'):>5}"
        )
    if len(history) > last:
        lines.append(f"(older {len(history) - last} run(s) in --json and the picture)")
    return "\n".join(lines)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _stamp(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


# -- small helpers --------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _reason(exc: Exception) -> str:
    # notecoder's own messages are PHI-free; a foreign one is named by type only.
    return str(exc) if isinstance(exc, NotecoderError) else type(exc).__name__
