"""`notecoder report` on a real run: finished, half-finished, retried, with history.

One real run of the sample archive (the vLLM CPU build, a local Ray cluster) is
reported on as it is, and copies of its output are edited into the states a run is
found in when its driver is still going or was killed.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from notecoder.cli import main
from notecoder.config import load_config
from notecoder.report import build_report
from notecoder.runner import run_job
from notecoder.storage import Storage

from .conftest import REPO, assert_no_fragments, note_fragments

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def coded(ray_local, sample_archive, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("nightly") / "coded"
    cfg = load_config(
        REPO / "configs" / "local.yaml",
        {
            "input.uri": str(sample_archive),
            "output.uri": str(out),
            "model.path": str(demo_model),
        },
    )
    summary = run_job(cfg, echo=lambda _line: None)
    return out, summary


@pytest.fixture(scope="module")
def fragments(sample_archive):
    table = pq.read_table(sample_archive, columns=["text"])
    return note_fragments(table.column("text").to_pylist())


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _copy(src, dst, keep: int, attempts: list[dict], finished: list[float]):
    """A copy of a finished output, as a driver still going or killed leaves it.

    Keeps the first ``keep`` commit markers, gives their shards the ``finished``
    times (each started 2 s before), and replaces the run's attempts.
    """
    shutil.copytree(src, dst)
    markers = sorted((dst / "_notecoder" / "shards").glob("*.json"))
    for marker in markers[keep:]:
        marker.unlink()
    for marker, end in zip(markers[:keep], finished, strict=True):
        data = json.loads(marker.read_text())
        data["tally"].update(started_at=end - 2.0, finished_at=end)
        marker.write_text(json.dumps(data))
    run_file = dst / "_notecoder" / "run.json"
    manifest = json.loads(run_file.read_text())
    manifest.pop("ended_at", None)
    manifest["attempts"] = attempts
    run_file.write_text(json.dumps(manifest))
    (dst / "_notecoder" / "summary.json").unlink()
    return markers[:keep]


def test_finished_run_agrees_with_its_summary(coded):
    out, summary = coded
    result = _cli("report", out, "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["run"]
    saved = json.loads((out / "_notecoder" / "summary.json").read_text())
    assert run["state"] == "finished" and run["run_id"] == summary.run_id
    assert (run["shards_committed"], run["shards_planned"]) == (6, 6)
    assert run["rows_done"] == run["rows_planned"] == 300
    for key in ("rows", "prompt_tokens", "completion_tokens", "statuses"):
        assert run["summary"][key] == saved[key], key
    for key in ("wall_seconds", "usd_per_1k_tokens", "usd_per_1k_notes"):
        assert run["summary"][key] == pytest.approx(saved[key]), key
    walls = [s["wall_seconds"] for s in run["slowest"]]
    assert walls == sorted(walls, reverse=True) and len(walls) == 5
    assert run["retried"] == []
    timeline = run["timeline"]
    assert timeline[-1]["rows"] == 300
    assert timeline[-1]["tokens"] == saved["total_tokens"]
    assert [p["seconds"] for p in timeline] == sorted(p["seconds"] for p in timeline)


def test_terminal_table_and_no_note_text(coded, fragments):
    out, summary = coded
    result = _cli("report", out)
    assert result.exit_code == 0, result.output
    assert "6 of 6 shards (100%), 300 of 300 notes" in result.output
    assert "slowest shards (of 6 committed)" in result.output
    assert "per 1K tokens" in result.output and summary.run_id in result.output
    assert_no_fragments(result.output, fragments, "the report")


def test_pictures_are_written_and_self_contained(coded, tmp_path):
    out, _ = coded
    png, page = tmp_path / "run.png", tmp_path / "run.html"
    result = _cli("report", out, "--png", png, "--html", page)
    assert result.exit_code == 0, result.output
    width, height = _png_size(png.read_bytes())
    assert (width, height) == (1200, 420)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1
    for external in ("http://", "https://", 'src="//', "url("):
        assert external not in text, f"the page refers to {external}"


def test_half_finished_run_reports_progress_and_elapsed_time(coded, tmp_path):
    out, _ = coded
    now = float(int(time.time()))
    copy = tmp_path / "half"
    running = [{"started_at": _iso(now - 100), "status": "running"}]
    _copy(out, copy, 4, running, [now - 60, now - 50, now - 40, now - 30])
    report = build_report(Storage(), str(copy), now=now)
    assert report.state == "running"
    assert (report.shards_committed, report.shards_planned) == (4, 6)
    assert report.rows_done < report.rows_planned == 300
    attempt = report.attempts[-1]
    assert (attempt.timing, attempt.wall_seconds) == ("elapsed so far", 100.0)
    assert report.timeline[-1].seconds == 100.0  # drawn up to now
    assert attempt.startup_seconds == 100 - 60 - 2  # to the first shard's start
    assert report.summary.wall_seconds == 100.0
    assert report.summary.usd > 0 and report.summary.usd_per_1k_tokens > 0
    left = report.rows_planned - report.rows_done
    assert report.eta_seconds == pytest.approx(left * 100.0 / report.rows_done)
    result = _cli("report", copy)
    assert "4 of 6 shards (67%)" in result.output and "left" in result.output


def test_killed_attempt_and_retried_shard(coded, tmp_path):
    out, _ = coded
    t0 = float(int(time.time())) - 1000
    attempts = [
        {"started_at": _iso(t0), "status": "interrupted"},
        {
            "started_at": _iso(t0 + 100),
            "status": "succeeded",
            "wall_seconds": 30.0,
            "accelerator_seconds": 30.0,
            "engines": 1,
            "accelerators_per_engine": 1,
            "shards_coded": 3,
            "shards_retried": 1,
            "shards_failed": [],
        },
    ]
    # Attempt 1 was killed after three shards; attempt 2 coded the rest, one of
    # them on its second try.
    copy = tmp_path / "resumed"
    ends = [t0 + 10, t0 + 11, t0 + 12, t0 + 110, t0 + 111, t0 + 112]
    markers = _copy(out, copy, 6, attempts, ends)
    retried = json.loads(markers[4].read_text())
    retried["tally"]["attempt"] = 2
    markers[4].write_text(json.dumps(retried))
    report = build_report(Storage(), str(copy))
    killed, resumed = report.attempts
    assert (killed.timing, killed.wall_seconds, killed.shards_coded) == (
        "to its last shard",
        12.0,
        3,
    )
    assert (resumed.timing, resumed.wall_seconds) == ("recorded", 30.0)
    assert report.summary.wall_seconds == 42.0
    assert report.summary.shards_retried == 1
    assert [s.shard_id for s in report.retried] == [retried["tally"]["shard_id"]]
    assert report.state == "succeeded" and report.eta_seconds is None
    assert "shards committed after a retry: 1" in _cli("report", copy).output


def test_run_added_itself_to_the_ledger(coded):
    out, summary = coded
    files = sorted((out.parent / "_notecoder-ledger").glob("*.parquet"))
    assert [f.name for f in files] == [f"run-{summary.run_id}.parquet"]
    row = pq.read_table(files[0]).to_pylist()[0]
    assert row["rows"] == summary.rows == 300
    assert row["complete"] is True and row["status"] == "succeeded"
    assert row["usd_per_1k_tokens"] == pytest.approx(summary.usd_per_1k_tokens)
    assert row["input_uri"] and row["model_label"].startswith("demo@")


def test_history_table_and_picture(coded, tmp_path):
    out, summary = coded
    ledger_dir = out.parent / "_notecoder-ledger"
    png = tmp_path / "trend.png"
    result = _cli("report", "--history", ledger_dir, "--png", png)
    assert result.exit_code == 0, result.output
    assert "run ledger: 1 run(s)" in result.output
    assert summary.run_id[-8:] in result.output
    assert _png_size(png.read_bytes()) == (1200, 420)
    both = _cli("report", out, "--history", ledger_dir, "--json", "--png", png)
    data = json.loads(both.stdout)
    assert data["run"]["run_id"] == data["history"][0]["run_id"] == summary.run_id
    assert _png_size(png.read_bytes()) == (1200, 840)


def test_no_run_is_one_clear_error(tmp_path):
    result = _cli("report", tmp_path)
    assert result.exit_code == 1
    assert "holds no notecoder run" in result.output
    assert _cli("report").exit_code == 2  # neither OUTPUT nor --history


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
