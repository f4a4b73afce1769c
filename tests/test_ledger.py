"""The run ledger: where it goes, one file per run, merging runs with evaluations.

Pure logic on local files; the runner's call into the ledger is checked on a real run
in test_report.py, and `eval --record` in test_eval_cli.py.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notecoder import ledger
from notecoder.config import load_config
from notecoder.errors import StorageError
from notecoder.evaluate import evaluate
from notecoder.storage import Storage
from notecoder.tally import ShardTally, summarise

from .conftest import REPO

T0 = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)


def _cfg(output, **overrides):
    return load_config(
        REPO / "configs" / "local.yaml", {"output.uri": str(output), **overrides}
    )


def _summary(run_id: str, rows: int = 100, wall: float = 50.0):
    tally = ShardTally(
        shard_id="s1",
        file_uri="/in/a.parquet",
        rows=rows,
        statuses={"ok": rows - 2, "empty_note": 2},
        prompt_tokens=rows * 40,
        completion_tokens=rows * 10,
    )
    return summarise(
        run_id,
        [tally],
        shards_total=2,
        shards_failed=0,
        shards_retried=1,
        wall_seconds=wall,
        accelerator_seconds=wall,
        engines=1,
        accelerators_per_engine=1,
        cost=_cfg("/x").cost,
    )


def _manifest(run_id: str, created: datetime, status: str = "succeeded"):
    return {
        "run_id": run_id,
        "created_at": created.isoformat(timespec="seconds"),
        "ended_at": None,
        "model": {"label": "demo@abc", "path": "/models/demo"},
        "input": {"uri": "/in"},
        "code_set": "ICD-10-CM test",
        "notecoder_version": "0.1.0",
        "attempts": [{"status": status}],
        "config": {"output": {"ledger_uri": None}},
    }


def _eval_report(f1_hits: int):
    """A real EvalReport: ``f1_hits`` of 4 notes predicted right."""
    codes = pa.list_(pa.struct([("code", pa.string()), ("valid", pa.bool_())]))
    ids = ["a", "b", "c", "d"]
    said = ["I10" if i < f1_hits else "E11.9" for i in range(4)]
    predictions = pa.table(
        {
            "note_id": ids,
            "codes": pa.array([[{"code": c, "valid": True}] for c in said], codes),
            "primary_code": said,
            "status": ["ok"] * 4,
        }
    )
    gold = pa.table({"note_id": ids, "gold_icd10": [["I10"]] * 4})
    return evaluate(predictions, gold)


def test_default_ledger_sits_beside_the_output(tmp_path):
    assert ledger.default_ledger_uri(str(tmp_path / "nightly" / "2026-11-01")) == str(
        tmp_path / "nightly" / "_notecoder-ledger"
    )
    assert ledger.default_ledger_uri("s3://b/coded/2026-11-01/") == (
        "s3://b/coded/_notecoder-ledger"
    )
    assert ledger.default_ledger_uri("s3://b/out") == "s3://b/_notecoder-ledger"
    # Beside a bucket root there is nowhere to go: no ledger rather than a wrong one.
    assert ledger.default_ledger_uri("s3://b") is None
    assert ledger.ledger_uri("", "/data/out") is None
    assert ledger.ledger_uri("s3://b/ledger", "/data/out") == "s3://b/ledger"


def test_a_run_writes_one_file_rewritten_by_its_later_attempts(tmp_path):
    out = tmp_path / "nightly" / "one"
    cfg = _cfg(out)
    manifest = _manifest("r1", T0, status="failed")
    first = ledger.record_run(cfg, manifest, _summary("r1", rows=60), Storage())
    manifest["attempts"].append({"status": "succeeded"})
    again = ledger.record_run(cfg, manifest, _summary("r1", rows=100), Storage())
    assert first == again
    files = sorted((tmp_path / "nightly" / "_notecoder-ledger").iterdir())
    assert [f.name for f in files] == ["run-r1.parquet"]
    table = pq.read_table(files[0])
    assert table.schema.equals(ledger.RUN_SCHEMA)
    row = table.to_pylist()[0]
    assert (row["rows"], row["status"], row["rows_empty_note"]) == (100, "succeeded", 2)
    assert row["total_tokens"] == 100 * 50
    assert row["created_at"] == T0
    assert row["usd_per_1k_tokens"] == pytest.approx(_summary("r1").usd_per_1k_tokens)
    # Hidden from readers of the outputs' parent folder (--skip-coded, Spark).
    assert Storage().list_files(str(tmp_path / "nightly"), suffix=".parquet") == []


def test_history_merges_runs_with_their_latest_evaluation(tmp_path):
    store, uri = Storage(), str(tmp_path / "ledger")
    cfg = _cfg(tmp_path / "o", **{"output.ledger_uri": uri})
    # Recorded out of order: the history is ordered by when each run started.
    for i in (2, 0, 1):
        run_id = f"run{i}"
        summary = _summary(run_id, rows=100 + i)
        ledger.record_run(
            cfg, _manifest(run_id, T0 + timedelta(days=i)), summary, store
        )
    ledger.record_eval(store, uri, "run1", _eval_report(1), "/gold.parquet")
    ledger.record_eval(store, uri, "run1", _eval_report(3), "/gold.parquet")
    ledger.record_eval(store, uri, "gone", _eval_report(4), "/gold.parquet")
    history = ledger.read_history(store, uri)
    assert [e["run_id"] for e in history] == ["gone", "run0", "run1", "run2"]
    by_id = {e["run_id"]: e for e in history}
    assert by_id["run1"]["code_micro_f1"] == pytest.approx(0.75)
    assert by_id["run1"]["rows"] == 101 and by_id["run1"]["recorded_at"] is not None
    assert by_id["run0"]["code_micro_f1"] is None
    # An evaluation whose run row is elsewhere still shows, with its scores only.
    assert by_id["gone"]["code_micro_f1"] == 1.0 and by_id["gone"]["rows"] is None
    assert len({frozenset(e) for e in history}) == 1  # every entry has the same keys
    table = ledger.format_history(history)
    assert "run ledger: 4 run(s)" in table and "0.750" in table


def test_files_from_other_versions_are_read_together(tmp_path):
    store, uri = Storage(), tmp_path / "ledger"
    cfg = _cfg(tmp_path / "o", **{"output.ledger_uri": str(uri)})
    ledger.record_run(cfg, _manifest("old", T0), _summary("old"), store)
    newer = pq.read_table(uri / "run-old.parquet").to_pylist()[0]
    newer.update(run_id="new", created_at=T0 + timedelta(days=1), gpu_model="L4")
    del newer["rows_error"]
    pq.write_table(pa.Table.from_pylist([newer]), uri / "run-new.parquet")
    history = ledger.read_history(store, str(uri))
    assert [e["run_id"] for e in history] == ["old", "new"]
    assert history[1]["gpu_model"] == "L4" and history[0]["gpu_model"] is None
    assert history[1]["rows_error"] is None and history[0]["rows_error"] == 0


def test_concurrent_runs_never_collide(tmp_path):
    store, uri = Storage(), str(tmp_path / "ledger")
    cfg = _cfg(tmp_path / "o", **{"output.ledger_uri": uri})
    start = threading.Barrier(8)

    def night(i):
        start.wait()
        run_id = f"night{i}"
        ledger.record_run(cfg, _manifest(run_id, T0), _summary(run_id), store)

    threads = [threading.Thread(target=night, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger.read_history(store, uri)) == 8


def test_a_ledger_that_cannot_be_written_never_fails_the_run(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the ledger folder should be")
    cfg = _cfg(tmp_path / "o", **{"output.ledger_uri": str(blocker)})
    with caplog.at_level(logging.WARNING, logger="notecoder.ledger"):
        written = ledger.record_run(cfg, _manifest("r", T0), _summary("r"), Storage())
    assert written is None
    assert "not added to the run ledger" in caplog.text
    assert (
        ledger.record_run(
            _cfg(tmp_path / "o", **{"output.ledger_uri": ""}),
            _manifest("r", T0),
            _summary("r"),
            Storage(),
        )
        is None
    )


def test_reading_a_missing_ledger_says_where_to_look(tmp_path):
    with pytest.raises(StorageError, match="no run ledger at"):
        ledger.read_history(Storage(), str(tmp_path / "nowhere"))
