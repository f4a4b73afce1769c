"""Resuming, replacing and extending runs, and the audit trail that ties rows to runs.

Without an engine (on disk and on S3 alike): what readers count as committed, stray
parts, refusing to mix runs, ``--new-run``, and the ``--skip-coded`` id set.

With the real engine on a real local Ray cluster: a driver SIGKILLed twice on an S3
to S3 run, an engine SIGKILLed mid-run, a shard that fails on every attempt, and an
incremental nightly run. Every one checks the output row by row against the input.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from notecoder import __version__, codes, runner
from notecoder.cli import main as cli_main
from notecoder.commit import OutputLayout
from notecoder.config import load_config
from notecoder.errors import ConfigError, OutputMismatchError, PlanError
from notecoder.housekeeping import remove_strays
from notecoder.incremental import drop_skipped, load_skip_set
from notecoder.modelref import content_hash
from notecoder.plan import plan_archive
from notecoder.storage import Storage, join
from notecoder.tally import ShardTally

from .conftest import REPO, assert_no_fragments, note_fragments, notecoder_bin
from .s3server import (  # noqa: F401
    FAKE_SECRET,
    Place,
    S3Server,
    place_fixture,
    s3_fixture,
)

LOCAL_YAML = REPO / "configs" / "local.yaml"


def _cfg(archive, output, model, **overrides):
    base = {"input.uri": str(archive), "output.uri": str(output), "model.path": model}
    return load_config(LOCAL_YAML, {**base, **overrides})


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"note_id": pa.array(ids, pa.string())})


def _read_ids(storage: Storage, uris: list[str], column: str = "note_id") -> list:
    ids = []
    for uri in uris:
        with storage.open_input(uri) as handle:
            ids += pq.read_table(handle, columns=[column]).column(column).to_pylist()
    return ids


def _input_ids(archive: Path) -> list[str]:
    files = sorted(archive.rglob("*.parquet"))
    return sorted(_read_ids(Storage(), [str(f) for f in files]))


def _commit(layout: OutputLayout, shard_id: str, ids: list[str], run_id: str):
    layout.write_part(_table(ids), shard_id)
    layout.write_marker(ShardTally(shard_id, "input", rows=len(ids)), run_id)


def _put_archive(place: Place, tmp_path: Path, **kwargs) -> str:
    """A sample archive written locally, then copied under the place."""
    from notecoder.demo import write_sample_archive

    local = write_sample_archive(tmp_path / "archive-src", **kwargs)
    for path in sorted(local.rglob("*.parquet")):
        rel = path.relative_to(local).as_posix()
        place.storage.write_bytes(place.uri("archive", rel), path.read_bytes())
    return place.uri("archive")


@pytest.fixture
def tiny_model(tmp_path) -> str:
    """Enough of a model folder for planning and hashing (no engine loads it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    return str(folder)


# -- what readers count ---------------------------------------------------------------


def test_readers_count_only_parts_with_a_marker(place):
    layout = OutputLayout(place.storage, place.uri("out"))
    _commit(layout, "aaaa", ["n1", "n2"], "run-1")
    layout.write_part(_table(["n3"]), "bbbb")  # stray: its attempt died
    _commit(layout, "cccc", ["n4"], "run-1")
    place.storage.delete(layout.part("cccc"))  # marker left without its part
    assert set(layout.committed()) == {"aaaa"}
    assert layout.committed_parts() == [layout.part("aaaa")]
    assert _read_ids(place.storage, layout.committed_parts()) == ["n1", "n2"]


def test_strays_are_removed_and_committed_parts_kept(place):
    layout = OutputLayout(place.storage, place.uri("out"))
    _commit(layout, "aaaa", ["n1"], "run-1")
    layout.write_part(_table(["n2"]), "bbbb")
    place.storage.write_bytes(place.uri("out", ".tmp-1234-part-cccc.parquet"), b"x")
    assert remove_strays(layout) == 2
    parts = place.storage.list_files(place.uri("out"), hidden=True)
    names = sorted(p.uri.rsplit("/", 1)[-1] for p in parts)
    assert names == ["aaaa.json", "part-aaaa.parquet"]


# -- refusing to mix, and --new-run ---------------------------------------------------


def test_other_settings_are_refused_and_new_run_replaces(place, tmp_path, tiny_model):
    archive = _put_archive(place, tmp_path, notes=40, files=2, row_group_size=10)
    out = place.uri("out")
    cfg = _cfg(archive, out, tiny_model, **place.overrides)
    first = runner.prepare(cfg)
    old_id = first.manifest["run_id"]
    first.layout.write_json(first.layout.run_file, first.manifest)
    shard = first.plan.shards[0]
    _commit(first.layout, shard.shard_id, ["demo-000000"], old_id)

    resumed = runner.prepare(cfg)
    assert resumed.manifest["run_id"] == old_id
    assert set(resumed.committed) == {shard.shard_id}
    assert len(resumed.pending) == len(first.plan.shards) - 1

    changed = _cfg(
        archive, out, tiny_model, **place.overrides, **{"sampling.max_tokens": 16}
    )
    with pytest.raises(OutputMismatchError) as refused:
        runner.prepare(changed)
    assert "sampling.max_tokens: 32 -> 16" in str(refused.value)
    assert "--new-run" in str(refused.value)
    assert first.layout.committed_parts() == [first.layout.part(shard.shard_id)]

    fresh = runner.prepare(changed, new_run=True)
    assert fresh.manifest["run_id"] != old_id
    assert fresh.manifest["replaces_run"] == old_id
    assert fresh.committed == {} and len(fresh.pending) == len(fresh.plan.shards)
    layout = fresh.layout
    assert layout.committed() == {} and layout.read_json(layout.run_file) is None
    assert place.storage.list_files(out, suffix=".parquet") == []
    old = join(out, "_notecoder", "previous", old_id)
    assert layout.read_json(join(old, "run.json"))["run_id"] == old_id
    assert place.storage.exists(join(old, "shards", f"{shard.shard_id}.json"))
    replaced = layout.read_json(join(old, "replaced.json"))
    assert replaced["parts_deleted"] == [f"part-{shard.shard_id}.parquet"]


def test_new_run_and_skip_coded_reach_the_runner(monkeypatch, tmp_path):
    """Both entry points pass --new-run and --skip-coded through to run_job."""
    seen = []
    monkeypatch.setattr(
        runner, "run_job", lambda cfg, **kw: seen.append((cfg, kw["new_run"]))
    )
    args = [
        "--config",
        str(LOCAL_YAML),
        "--input",
        "in",
        "--output",
        "out",
        "--model",
        "m",
        "--new-run",
        "--skip-coded",
        "s3://bucket/night-1",
        "--skip-coded",
        str(tmp_path / "ledger.parquet"),
    ]
    spec = importlib.util.spec_from_file_location(
        "code_notes_job", REPO / "jobs" / "code_notes.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    for command in (["run", *args], args):
        entry = cli_main if command[0] == "run" else job.main
        result = CliRunner().invoke(entry, command)
        assert result.exit_code == 0, result.output
    for cfg, new_run in seen:
        assert new_run is True
        assert cfg.input.skip_coded == [
            "s3://bucket/night-1",
            str(tmp_path / "ledger.parquet"),
        ]
    assert len(seen) == 2
    plain = CliRunner().invoke(cli_main, ["run", *args[:8]])
    assert plain.exit_code == 0 and seen[-1][1] is False


# -- the --skip-coded id set ----------------------------------------------------------


def test_skip_set_from_a_ledger_and_earlier_outputs(place):
    storage = place.storage
    ledger = place.uri("ledger")
    storage.write_bytes(join(ledger, "a.parquet"), _parquet(["n1", "n2", None]))
    storage.write_bytes(join(ledger, "b.parquet"), _parquet(["n2", "n3"]))
    nights = place.uri("coded")
    for night, ids in (("2026-12-03", ["n4", "n5"]), ("2026-12-04", ["n6"])):
        earlier = OutputLayout(storage, join(nights, night))
        settings = {"settings": {"input.id_column": "note_id"}}
        earlier.write_json(earlier.run_file, settings)
        _commit(earlier, f"s-{night}", ids, "run-1")
        earlier.write_part(_table(["n9"]), "stray")  # never counted as coded
    one_night = join(nights, "2026-12-03")
    skip = load_skip_set(
        storage, [ledger, one_night], "note_id", pa.string(), place.uri("out")
    )
    assert sorted(skip.ids.to_pylist()) == ["n1", "n2", "n3", "n4", "n5"]
    assert skip.record()["ids"] == 5
    again = load_skip_set(
        storage, [one_night, ledger], "note_id", pa.string(), place.uri("out")
    )
    assert again.fingerprint == skip.fingerprint
    every_night = load_skip_set(storage, [nights], "note_id", pa.string(), "out")
    assert sorted(every_night.ids.to_pylist()) == ["n4", "n5", "n6"]
    assert every_night.fingerprint != skip.fingerprint
    assert load_skip_set(storage, [], "note_id", pa.string(), "out") is None


def test_skip_set_errors_are_clear(place):
    storage = place.storage
    storage.write_bytes(place.uri("ints", "a.parquet"), _parquet(["x"], "other"))
    with pytest.raises(PlanError, match="has no column 'note_id'"):
        load_skip_set(storage, [place.uri("ints")], "note_id", pa.string(), "o")
    storage.write_bytes(place.uri("strs", "a.parquet"), _parquet(["abc"]))
    with pytest.raises(PlanError, match="do not convert to the input's int64"):
        load_skip_set(storage, [place.uri("strs")], "note_id", pa.int64(), "o")
    with pytest.raises(PlanError, match="no committed parts or Parquet files"):
        load_skip_set(storage, [place.uri("empty")], "note_id", pa.string(), "o")
    with pytest.raises(ConfigError, match="is the output itself"):
        load_skip_set(storage, [place.uri("o")], "note_id", pa.string(), place.uri("o"))


def test_drop_skipped_keeps_every_other_row_in_order():
    table = pa.table(
        {"note_id": ["a", "b", None, "c", "d"], "text": ["1", "2", "3", "4", "5"]}
    )
    kept, skipped = drop_skipped(table, "note_id", pa.array(["b", "d", "zz"]))
    assert kept.column("note_id").to_pylist() == ["a", None, "c"]
    assert kept.column("text").to_pylist() == ["1", "3", "4"]
    assert skipped == 2 and kept.num_rows + skipped == table.num_rows
    assert drop_skipped(table, "note_id", None) == (table, 0)


def _parquet(ids: list, column: str = "note_id") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({column: ids}), buf)
    return buf.getvalue()


# -- with the engine: a driver killed twice, S3 to S3 ---------------------------------


@dataclass
class Driver:
    """A `notecoder run` process, and every process it starts, for cleaning up."""

    args: list[str]
    log: Path
    env: dict[str, str]
    family: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        with open(self.log, "w") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.args,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
            )

    def watch(self) -> None:
        """Note the driver's descendants (Ray's processes, the engine actor)."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.family.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        self.watch()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def reap(self) -> None:
        """End what the driver left running: nothing while it joins the session's
        Ray, but a driver that started its own Ray leaves agents behind a SIGKILL."""
        for pid, created in self.family.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
                    proc.wait(10)
            except psutil.NoSuchProcess:
                pass


def _markers(s3: S3Server, bucket: str) -> dict[str, str]:
    """Commit markers in the output: key -> ETag."""
    pages = (
        s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix="out/_notecoder/shards/")
    )
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def _settled_markers(s3: S3Server, bucket: str) -> dict[str, str]:
    """The markers once the killed driver's engine, ended by Ray, adds no more."""
    before = _markers(s3, bucket)
    while True:
        time.sleep(1.0)
        now = _markers(s3, bucket)
        if now == before:
            return now
        before = now


def _run_until(driver: Driver, s3, bucket, new: int | None, timeout=300.0):
    """SIGKILL the driver once ``new`` more markers exist, or wait for it to end."""
    deadline = time.monotonic() + timeout
    start = len(_markers(s3, bucket))
    kill_at = None if new is None else start + new
    coding = False
    try:
        while time.monotonic() < deadline:
            if driver.proc.poll() is not None:
                return
            # Slow while Ray and the engine start (the two cores are theirs), quick
            # once shards are being committed and a kill is due.
            fast = kill_at is not None and coding
            if not fast:
                driver.watch()
            if kill_at is not None:
                count = len(_markers(s3, bucket))
                if count >= kill_at:
                    driver.kill()
                    return
                coding = count > start
            time.sleep(0.03 if fast else 0.5)
        driver.kill()
        raise AssertionError(f"the driver did not finish in {timeout:.0f} s")
    finally:
        driver.reap()


@pytest.fixture(scope="module")
def killed_twice(s3, demo_model, ray_local, tmp_path_factory):
    """Code an S3 archive into S3, SIGKILLing the driver twice at random points.

    The drivers join the session's Ray cluster, as a submitted job joins a cluster
    that outlives it: Ray ends a dead driver's engines, and the cluster starts once.
    """
    from notecoder.demo import write_sample_archive

    seed = int(os.environ.get("NOTECODER_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("killed")
    # 60 shards of 5 rows, so that a kill lands while shards remain.
    archive = write_sample_archive(tmp / "archive", row_group_size=5)
    bucket = s3.new_bucket()
    s3.upload_folder(archive, f"s3://{bucket}/archive")
    s3.upload_folder(demo_model, f"s3://{bucket}/models/demo")
    args = [
        notecoder_bin(),
        "run",
        "--config",
        str(LOCAL_YAML),
        "--input",
        f"s3://{bucket}/archive",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        f"s3://{bucket}/models/demo",
        "--shard-rows",
        "5",
        "--set",
        "model.revision=r42",
        *s3.set_args(),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    logs, after_kill, total = [], [], 60
    for attempt in range(3):
        new = rng.randint(1, 12) if attempt < 2 else None
        driver = Driver(args, tmp / f"driver-{attempt}.log", env)
        _run_until(driver, s3, bucket, new)
        logs.append(driver.log.read_text())
        if attempt < 2:
            assert driver.proc.returncode == -signal.SIGKILL, (seed, logs[-1][-3000:])
            after_kill.append(_settled_markers(s3, bucket))
            assert 0 < len(after_kill[-1]) < total, f"seed {seed}: no shard left"
    final = driver.proc.returncode
    assert final == 0, f"seed {seed}: {logs[-1][-3000:]}"
    return {
        "seed": seed,
        "bucket": bucket,
        "archive": archive,
        "logs": logs,
        "after_kill": after_kill,
        "storage": Storage(s3.settings()),
        "out": f"s3://{bucket}/out",
        "total": total,
    }


@pytest.mark.engine
@pytest.mark.s3
def test_every_id_exactly_once_after_two_kills(killed_twice):
    k = killed_twice
    layout = OutputLayout(k["storage"], k["out"])
    out_ids = _read_ids(k["storage"], layout.committed_parts())
    assert sorted(out_ids) == _input_ids(k["archive"]), f"seed {k['seed']}"
    every_part = k["storage"].list_files(k["out"], suffix=".parquet")
    assert len(every_part) == len(layout.committed_parts()) == k["total"]
    assert sorted(_read_ids(k["storage"], [p.uri for p in every_part])) == sorted(
        out_ids
    )


@pytest.mark.engine
@pytest.mark.s3
def test_resumed_runs_code_only_the_remaining_shards(killed_twice, s3):
    k = killed_twice
    final_markers = _markers(s3, k["bucket"])
    for before in k["after_kill"]:
        # Markers committed before a kill were never written again.
        assert {key: final_markers[key] for key in before} == before
    manifest = OutputLayout(k["storage"], k["out"]).read_json(
        join(k["out"], "_notecoder", "run.json")
    )
    attempts = manifest["attempts"]
    assert [a["status"] for a in attempts] == [
        "interrupted",
        "interrupted",
        "succeeded",
    ]
    # The engine of a killed driver may commit the shard it was coding before Ray
    # ends it, so what was left is read from what the last run found.
    found = re.search(r"(\d+) already committed, (\d+) to code", k["logs"][-1])
    done, left = int(found.group(1)), int(found.group(2))
    assert done >= len(k["after_kill"][-1]) and done + left == k["total"]
    assert attempts[-1]["shards_coded"] == left


@pytest.mark.engine
@pytest.mark.s3
def test_summary_after_two_kills_is_correct(killed_twice):
    k = killed_twice
    layout = OutputLayout(k["storage"], k["out"])
    summary = layout.read_json(layout.summary_file)
    assert summary["rows"] == 300 and summary["rows_skipped"] == 0
    assert summary["shards_committed"] == summary["shards_total"] == k["total"]
    assert summary["shards_failed"] == 0
    assert sum(summary["statuses"].values()) == 300
    assert summary["statuses"]["empty_note"] == 3
    tallies = layout.committed().values()
    assert summary["prompt_tokens"] == sum(t.prompt_tokens for t in tallies)
    assert f"{k['total']} of {k['total']} committed" in k["logs"][-1]


@pytest.mark.engine
@pytest.mark.s3
def test_audit_trail_leads_from_a_row_to_its_run(killed_twice, demo_model, s3):
    k = killed_twice
    storage, out = k["storage"], k["out"]
    layout = OutputLayout(storage, out)
    run = layout.read_json(layout.run_file)
    model_hash = content_hash(Path(demo_model))
    assert run["notecoder_version"] == __version__
    assert run["code_set"] == codes.EDITION
    assert run["model"]["path"] == f"s3://{k['bucket']}/models/demo"
    assert run["model"]["revision"] == "r42"
    assert run["model"]["content_hash"] == model_hash
    assert run["settings"]["model.content_hash"] == model_hash
    cfg = load_config(LOCAL_YAML, {"input.uri": f"s3://{k['bucket']}/archive"})
    plan = plan_archive(storage, cfg.input, 5)
    assert run["input"]["fingerprint"] == plan.fingerprint
    assert run["input"]["rows"] == 300 and run["input"]["shards"] == k["total"]
    assert run["config"]["s3"]["endpoint_url"] == s3.endpoint
    assert run["config"]["model"]["max_model_len"] == 512
    assert run["created_at"] <= run["attempts"][0]["started_at"]
    assert run["ended_at"] == run["attempts"][-1]["ended_at"] >= run["created_at"]
    with storage.open_input(layout.committed_parts()[0]) as handle:
        row = pq.read_table(handle).slice(0, 1).to_pylist()[0]
    assert row["run_id"] == run["run_id"]
    assert row["model"] == run["model"]["label"] == f"demo@{model_hash[:12]}"


@pytest.mark.engine
@pytest.mark.s3
def test_no_secret_or_note_text_leaks(killed_twice):
    k = killed_twice
    everything = "\n".join(k["logs"])
    assert FAKE_SECRET not in everything
    meta = k["storage"].list_files(join(k["out"], "_notecoder"), hidden=True)
    for entry in meta:
        assert FAKE_SECRET not in k["storage"].read_bytes(entry.uri).decode()
    texts = [r for f in sorted(k["archive"].rglob("*.parquet")) for r in _texts(f)]
    assert_no_fragments(everything, note_fragments(texts), "the driver's logs")


def _texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


# -- with the engine, in this process: engines dying, shards failing, nightly runs ----


@pytest.mark.engine
def test_engine_killed_mid_run_is_replaced(ray_local, demo_model, tmp_path):
    from notecoder.demo import write_sample_archive

    archive = write_sample_archive(tmp_path / "a", notes=120, files=2, row_group_size=5)
    out = tmp_path / "out"
    cfg = _cfg(archive, out, str(demo_model), shard_rows=5)
    killed: list[int] = []
    stop = threading.Event()

    def kill_first_engine():
        # The first marker names the engine that wrote it (host:pid).
        while not killed and not stop.is_set():
            markers = sorted((out / "_notecoder" / "shards").glob("*.json"))
            if markers:
                worker = json.loads(markers[0].read_text())["tally"]["worker"]
                killed.append(int(worker.rsplit(":", 1)[1]))
                os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_engine)
    killer.start()
    printed: list[str] = []
    try:
        summary = runner.run_job(cfg, echo=printed.append)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run ended before an engine could be killed"
    assert summary.shards_committed == summary.shards_total == 24, printed
    assert summary.shards_retried >= 1 and summary.shards_failed == 0, printed
    layout = OutputLayout(Storage(), str(out))
    workers = {int(t.worker.rsplit(":", 1)[1]) for t in layout.committed().values()}
    # A replacement engine committed shards. (The killed one may own no marker any
    # more: killed after its marker but before its answer reached the driver, its
    # shard is coded again and the marker rewritten, which is correct.)
    assert workers - set(killed), (killed, workers)
    assert sorted(_read_ids(Storage(), layout.committed_parts())) == _input_ids(archive)
    assert len(list(out.glob("part-*.parquet"))) == 24


@pytest.mark.engine
def test_shard_failing_every_attempt_is_reported(
    ray_local, demo_model, tmp_path, monkeypatch
):
    from notecoder.demo import write_sample_archive

    archive = write_sample_archive(tmp_path / "a", notes=60, files=3, row_group_size=20)
    broken = archive / "year=2025" / "part-000.parquet"
    out = tmp_path / "out"
    cfg = _cfg(archive, out, str(demo_model))
    plan = plan_archive(Storage(), cfg.input, cfg.shard_rows)
    bad = [s.shard_id for s in plan.shards if s.file_uri == str(broken)]
    assert len(bad) == 1 and len(plan.shards) == 3
    # A part left by an earlier attempt at that shard: it must not survive the run.
    OutputLayout(Storage(), str(out)).write_part(_table(["demo-000099"]), bad[0])
    expected = sorted(i for i in _input_ids(archive) if i not in _ids_of(broken))
    real_prepare = runner.prepare

    def prepare_then_break_a_file(cfg, **kwargs):
        prep = real_prepare(cfg, **kwargs)
        broken.write_bytes(b"PAR1 no longer a Parquet file PAR1")
        return prep

    monkeypatch.setattr(runner, "prepare", prepare_then_break_a_file)
    args = ["run", "--config", str(LOCAL_YAML), "--input", str(archive)]
    args += ["--output", str(out), "--model", str(demo_model)]
    result = CliRunner().invoke(cli_main, [*args, "--set", "max_shard_attempts=2"])
    assert result.exit_code == 1, result.output
    assert f"failed after 2 attempts each: {bad[0]}" in result.output
    layout = OutputLayout(Storage(), str(out))
    assert bad[0] not in layout.committed() and len(layout.committed()) == 2
    assert sorted(_read_ids(Storage(), layout.committed_parts())) == expected
    assert not Path(layout.part(bad[0])).exists()
    run = layout.read_json(layout.run_file)
    assert run["attempts"][-1]["shards_failed"] == bad and "ended_at" not in run


def _ids_of(path: Path) -> set[str]:
    return set(_read_ids(Storage(), [str(path)]))


@pytest.mark.engine
@pytest.mark.s3
def test_nightly_run_codes_only_new_notes(
    ray_local, demo_model, tmp_path, s3, monkeypatch
):
    """An incremental run; its model is on S3 and the engine fetches its own copy.

    The engine's node cache is the one Ray's workers inherited; the driver is given
    another, as if the engine ran on a node where the driver's folder is absent.
    """
    from notecoder.demo import write_sample_archive
    from notecoder.modelref import cache_root
    from notecoder.s3model import cache_folder

    archive = write_sample_archive(
        tmp_path / "a", notes=120, files=2, row_group_size=20
    )
    everything = _input_ids(archive)
    ledger = tmp_path / "coded-before.parquet"
    pq.write_table(_table(everything[:70]), ledger)
    model = s3.upload_folder(demo_model, f"s3://{s3.new_bucket()}/models/demo")
    engine_cache = cache_root() / "models"
    monkeypatch.setenv("NOTECODER_CACHE", str(tmp_path / "driver-cache"))
    out = tmp_path / "night-2"
    skip = {"input.skip_coded": [str(ledger)]}
    cfg = _cfg(archive, out, model, shard_rows=20, **skip, **s3.overrides())
    printed: list[str] = []
    summary = runner.run_job(cfg, echo=printed.append)
    fetched = cache_folder(engine_cache, model)
    assert content_hash(fetched) == content_hash(Path(demo_model))
    layout = OutputLayout(Storage(), str(out))
    assert sorted(_read_ids(Storage(), layout.committed_parts())) == everything[70:]
    assert summary.rows == 50 and summary.rows_skipped == 70
    assert summary.shards_committed == summary.shards_total == 6
    plan = plan_archive(Storage(), cfg.input, 20)
    rows_in = {s.shard_id: s.num_rows for s in plan.shards}
    for tally in layout.committed().values():
        assert tally.rows + tally.skipped == rows_in[tally.shard_id]
        assert sum(tally.statuses.values()) == tally.rows
    run = layout.read_json(layout.run_file)
    recorded = run["input"]["skip_coded"]
    assert recorded["ids"] == 70 and recorded["uris"] == [str(ledger)]
    assert run["settings"]["input.skip_coded"] == recorded["fingerprint"]
    assert "70 skipped" in printed[-1]
