"""Planning: file discovery, footer-only shards, stable ids, clear errors."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notecoder.config import InputConfig
from notecoder.errors import PlanError
from notecoder.plan import plan_archive, read_shard
from notecoder.storage import Storage


def _write(path, n, start=0, row_group_size=10, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "note_id": [f"n{i:04d}" for i in range(start, start + n)],
        "text": [f"note number {i}" for i in range(start, start + n)],
    }
    data.update(extra)
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "notes"
    _write(root / "year=2024" / "a.parquet", 35)
    _write(root / "year=2025" / "b.parquet", 20, start=100)
    (root / "_SUCCESS").write_text("")
    return root


def _plan(uri, shard_rows=20, **cfg):
    return plan_archive(Storage(), InputConfig(uri=str(uri), **cfg), shard_rows)


def test_folder_with_hive_partitions(archive):
    plan = _plan(archive)
    assert [f.entry.uri.rsplit("/", 2)[-2] for f in plan.files] == [
        "year=2024",
        "year=2025",
    ]
    assert plan.total_rows == 55
    # 35 rows in groups of 10 -> shards of >= 20 rows on group boundaries: 20 + 15.
    assert [s.num_rows for s in plan.shards] == [20, 15, 20]
    assert plan.shards[0].row_groups == (0, 1)
    assert dict(plan.shards[0].partitions) == {"year": "2024"}


def test_shard_ids_are_stable_and_unique(archive):
    first, second = _plan(archive), _plan(archive)
    ids = [s.shard_id for s in first.shards]
    assert ids == [s.shard_id for s in second.shards]
    assert len(set(ids)) == len(ids)
    assert first.fingerprint == second.fingerprint


def test_rewritten_file_changes_ids_and_fingerprint(archive):
    before = _plan(archive)
    _write(archive / "year=2025" / "b.parquet", 25, start=100)
    after = _plan(archive)
    assert before.fingerprint != after.fingerprint
    assert before.shards[-1].shard_id != after.shards[-1].shard_id
    assert before.shards[0].shard_id == after.shards[0].shard_id


def test_glob_and_single_file(archive):
    assert _plan(f"{archive}/year=2024/*.parquet").total_rows == 35
    assert _plan(archive / "year=2025" / "b.parquet").total_rows == 20


def test_no_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no Parquet files found"):
        _plan(tmp_path / "empty")


def test_missing_path(tmp_path):
    with pytest.raises(PlanError, match="no Parquet files found"):
        _plan(tmp_path / "nowhere")


def test_missing_column_names_file_and_columns(archive):
    with pytest.raises(PlanError) as err:
        _plan(archive, text_column="body")
    msg = str(err.value)
    assert "a.parquet" in msg and "b.parquet" in msg
    assert "'body'" in msg
    assert "it has: note_id, text" in msg


def test_unreadable_file_is_named(archive):
    (archive / "year=2025" / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PlanError, match=r"broken\.parquet is not readable Parquet"):
        _plan(archive)


def test_partition_key_can_pass_through(archive):
    plan = _plan(archive, passthrough_columns=["year"])
    table = read_shard(Storage(), plan.shards[-1], ["note_id", "year", "text"])
    assert table.column("year").to_pylist() == ["2025"] * 20


def test_read_shard_rows_in_equal_rows_out(archive):
    plan = _plan(archive)
    ids = []
    for shard in plan.shards:
        table = read_shard(Storage(), shard, ["note_id", "text"])
        assert table.num_rows == shard.num_rows
        ids += table.column("note_id").to_pylist()
    expected = [f"n{i:04d}" for i in range(35)] + [f"n{i:04d}" for i in range(100, 120)]
    assert ids == expected


def test_messages_carry_no_note_text(archive):
    with pytest.raises(PlanError) as err:
        _plan(archive, text_column="body")
    assert "note number" not in str(err.value)
