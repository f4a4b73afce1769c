"""The whole job on a local Ray cluster with the real engine."""

import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from notecoder.commit import OutputLayout
from notecoder.config import load_config
from notecoder.errors import PlanError
from notecoder.runner import run_job
from notecoder.storage import Storage

from .conftest import REPO, SHARED, assert_no_fragments, note_fragments, python_bin

pytestmark = pytest.mark.engine
CODIESP_DEV = SHARED / "data" / "codiesp" / "dev.parquet"


def _cfg(archive, output, model, **overrides):
    base = {
        "input.uri": str(archive),
        "output.uri": str(output),
        "model.path": str(model),
        "input.passthrough_columns": ["claim_id", "facility"],
    }
    return load_config(REPO / "configs" / "local.yaml", {**base, **overrides})


def _input_ids(archive) -> list[str]:
    return sorted(pl.read_parquet(f"{archive}/**/*.parquet").get_column("note_id"))


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def coded(ray_local, sample_archive, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "coded"
    lines = []
    summary = run_job(_cfg(sample_archive, out, demo_model), echo=lines.append)
    return out, summary, "\n".join(lines)


def test_every_input_row_out_exactly_once(coded, sample_archive):
    out, summary, _ = coded
    parts = OutputLayout(Storage(), str(out)).committed_parts()
    table = pl.concat([pl.read_parquet(p) for p in parts])
    assert sorted(table.get_column("note_id")) == _input_ids(sample_archive)
    assert table.height == summary.rows == 300
    assert len(list(out.glob("part-*.parquet"))) == summary.shards_committed


def test_output_columns_and_edge_statuses(coded):
    from notecoder.demo import EDGE_EMPTY_IDS, LONG_NOTE_ID

    out, summary, _ = coded
    table = pl.read_parquet(f"{out}/part-*.parquet")
    expected = {
        "note_id",
        "claim_id",
        "facility",
        "codes",
        "primary_code",
        "primary_confidence",
        "status",
        "error",
        "note_truncated",
        "prompt_tokens",
        "completion_tokens",
        "model",
        "run_id",
        "shard_id",
    }
    assert set(table.columns) == expected
    rows = {r["note_id"]: r for r in table.iter_rows(named=True)}
    for note_id in EDGE_EMPTY_IDS:
        assert rows[note_id]["status"] == "empty_note"
    assert rows[LONG_NOTE_ID]["note_truncated"] is True
    assert table.get_column("run_id").unique().to_list() == [summary.run_id]
    assert summary.statuses["empty_note"] == 3
    assert summary.truncated_notes == 1


def test_summary_has_throughput_and_cost(coded):
    out, summary, printed = coded
    saved = json.loads((out / "_notecoder" / "summary.json").read_text())
    assert saved["rows"] == 300
    assert saved["tokens_per_second"] > 0
    assert saved["usd_per_1k_tokens"] > 0
    assert saved["baseline_usd_per_1k_tokens"] > saved["usd_per_1k_tokens"]
    assert saved["total_tokens"] == summary.prompt_tokens + summary.completion_tokens
    tallies = OutputLayout(Storage(), str(out)).committed()
    assert sum(t.rows for t in tallies.values()) == 300
    assert sum(t.prompt_tokens for t in tallies.values()) == saved["prompt_tokens"]
    assert "tokens/s" in printed and "per 1K tokens" in printed


def test_rerun_writes_nothing(coded, sample_archive, demo_model):
    out, summary, _ = coded
    before = _snapshot(out)
    lines = []
    again = run_job(_cfg(sample_archive, out, demo_model), echo=lines.append)
    assert _snapshot(out) == before
    assert "nothing to do" in lines[0]
    assert again.rows == summary.rows and again.run_id == summary.run_id


def test_plan_error_before_any_engine(sample_archive, demo_model, tmp_path):
    cfg = _cfg(
        sample_archive, tmp_path / "o", demo_model, **{"input.text_column": "body"}
    )
    with pytest.raises(PlanError, match="has no column 'body'"):
        run_job(cfg)
    assert not (tmp_path / "o").exists()


def test_job_entry_point_logs_carry_no_note_text(demo_model, tmp_path):
    """Through jobs/code_notes.py in its own process: nothing it prints holds a note."""
    from notecoder.demo import write_sample_archive

    archive = write_sample_archive(tmp_path / "archive", notes=40, files=2)
    out = tmp_path / "out"
    cmd = [
        python_bin(),
        str(REPO / "jobs" / "code_notes.py"),
        "--config",
        str(REPO / "configs" / "local.yaml"),
        "--input",
        str(archive),
        "--output",
        str(out),
        "--model",
        str(demo_model),
        "--set",
        "shard_rows=10",
        "--log-level",
        "DEBUG",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = pl.read_parquet(f"{archive}/**/*.parquet").get_column("text").to_list()
    fragments = note_fragments(texts)
    assert len(fragments) > 40
    assert_no_fragments(proc.stdout + proc.stderr, fragments, "the job's output")
    errors = " ".join(pl.read_parquet(f"{out}/part-*.parquet")["error"].drop_nulls())
    assert_no_fragments(errors, fragments, "the error column")
    assert "shard" in proc.stderr and "committed" in proc.stderr
    # The engine actors' own log files, which Ray keeps in its session folder.
    session = Path("/tmp/ray/session_latest/logs")
    if session.is_dir():
        logs = [p for p in session.rglob("*") if p.is_file()]
        blob = " ".join(p.read_text(errors="replace") for p in logs)
        assert_no_fragments(blob, fragments, f"{len(logs)} Ray log files")


@pytest.mark.skipif(not CODIESP_DEV.exists(), reason="shared CodiEsp data is absent")
def test_codiesp_dev_every_row_accounted(ray_local, demo_model, tmp_path):
    out = tmp_path / "codiesp"
    cfg = _cfg(CODIESP_DEV, out, demo_model, **{"input.passthrough_columns": []})
    assert cfg.input.passthrough_columns == []
    summary = run_job(cfg, echo=lambda _: None)
    ids = pq.read_table(CODIESP_DEV, columns=["note_id"]).column("note_id").to_pylist()
    table = pl.read_parquet(f"{out}/part-*.parquet")
    assert sorted(table.get_column("note_id")) == sorted(ids)
    assert summary.rows == len(ids) == 250
    assert sum(summary.statuses.values()) == 250
    assert summary.truncated_notes > 0  # real cases overflow the demo's 512 tokens


def test_local_cluster_listens_on_loopback_only(tmp_path):
    """A local run's Ray (GCS, raylet, workers, dashboard agent) binds 127.0.0.1 only.

    In a fresh process that imports Ray before notecoder, as a user's script might,
    and without the variable that keeps Ray on loopback in the environment.
    """
    script = tmp_path / "listen.py"
    script.write_text(
        "import os, subprocess, psutil, ray\n"
        "from notecoder.runner import ensure_ray\n"
        "ensure_ray()\n"
        "@ray.remote\n"
        "def f():\n"
        "    return 1\n"
        "ray.get(f.remote())\n"
        "pids = {p.pid for p in psutil.Process().children(recursive=True)}\n"
        "pids.add(os.getpid())\n"
        "ss = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True)\n"
        "out = ss.stdout\n"
        "mine = [l for l in out.splitlines() if any(f'pid={p},' in l for p in pids)]\n"
        "wide = [l.split()[3] for l in mine if '127.0.0.1' not in l.split()[3]]\n"
        "print('LISTEN', len(mine), 'WIDE', len(wide), *wide)\n"
        "ray.shutdown()\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [python_bin(), str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LISTEN"))
    fields = line.split()
    assert int(fields[1]) >= 3, line  # GCS, raylet, worker at least
    assert fields[3] == "0", line


def test_run_that_never_committed_does_not_block_a_corrected_rerun(
    sample_archive, demo_model, tmp_path
):
    """An output whose run committed nothing (engines failed to start) starts over."""
    from notecoder.runner import prepare

    out = tmp_path / "o"
    meta = out / "_notecoder"
    meta.mkdir(parents=True)
    (meta / "run.json").write_text(
        json.dumps({"run_id": "never-started", "settings": {"model.max_model_len": 1}})
    )
    prep = prepare(_cfg(sample_archive, out, demo_model))
    assert prep.manifest["run_id"] != "never-started"
    assert prep.manifest["replaces_run"] == "never-started"


def test_more_engines_than_the_machine_holds_fails_at_once(
    ray_local, sample_archive, demo_model, tmp_path
):
    from notecoder.errors import ConfigError

    cpus = int(ray_local.cluster_resources()["CPU"])
    cfg = _cfg(
        sample_archive,
        tmp_path / "o",
        demo_model,
        **{"engine.engines": cpus + 3, "engine.start_timeout_seconds": 60},
    )
    with pytest.raises(ConfigError, match=r"lower engine.engines"):
        run_job(cfg, echo=lambda _: None)


def test_demo_command_twice(tmp_path):
    """`make demo` runs `notecoder demo`; the second time resumes, writing nothing."""
    from .conftest import notecoder_bin

    cmd = [notecoder_bin(), "demo", "--dir", str(tmp_path / "demo")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tokens/s" in first.stdout and "per 1K tokens" in first.stdout
    parts = sorted((tmp_path / "demo" / "output").glob("part-*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in parts}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "nothing to do" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in parts} == before
