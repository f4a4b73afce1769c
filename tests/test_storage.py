"""The storage layer: the same operations, and the same answers, on disk and on S3.

Every test here runs twice: against a temporary folder and against a fresh bucket on
the moto server (a real S3 API on 127.0.0.1), through the same Storage calls.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notecoder.config import InputConfig
from notecoder.errors import StorageError
from notecoder.plan import plan_archive, read_shard
from notecoder.storage import S3Settings, Storage, relative_to

from .s3server import place_fixture  # noqa: F401


def _parquet_bytes(n: int, start: int = 0) -> bytes:
    table = pa.table(
        {
            "note_id": [f"n{i:04d}" for i in range(start, start + n)],
            "text": [f"note {i}" for i in range(start, start + n)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=10)
    return buf.getvalue()


def test_write_read_info_delete(place):
    s, uri = place.storage, place.uri("a", "b.bin")
    assert s.info(uri) is None and not s.exists(uri)
    s.write_bytes(uri, b"hello")
    entry = s.info(uri)
    assert entry is not None and entry.size == 5 and entry.version
    assert s.read_bytes(uri) == b"hello"
    with s.open_input(uri) as f:
        assert f.read() == b"hello"
    s.delete(uri)
    assert not s.exists(uri)
    s.delete(uri)  # already gone: no error


def test_rewrite_changes_version(place):
    s, uri = place.storage, place.uri("v.bin")
    s.write_bytes(uri, b"first")
    before = s.info(uri).version
    s.write_bytes(uri, b"second!")
    assert s.info(uri).version != before
    assert s.read_bytes(uri) == b"second!"


def test_missing_file_is_a_clear_error(place):
    with pytest.raises(StorageError, match="does not exist"):
        place.storage.read_bytes(place.uri("nope.json"))
    with pytest.raises(StorageError, match="does not exist"):
        place.storage.open_input(place.uri("nope.parquet"))


def test_listing_is_recursive_sorted_and_hides_markers(place):
    s = place.storage
    for rel in ["x/2.parquet", "1.parquet", "x/y/3.parquet", "notes.txt"]:
        s.write_bytes(place.uri(rel), b"data")
    for rel in ["_notecoder/run.json", ".tmp-1-part.parquet", "_SUCCESS"]:
        s.write_bytes(place.uri(rel), b"{}")
    # A sibling whose name extends the folder's must not be listed under it.
    s.write_bytes(place.base + "side/4.parquet", b"data")
    listed = [relative_to(e.uri, place.base) for e in s.list_files(place.base)]
    assert listed == ["1.parquet", "notes.txt", "x/2.parquet", "x/y/3.parquet"]
    only = s.list_files(place.base, suffix=".parquet")
    assert len(only) == 3
    hidden = {
        relative_to(e.uri, place.base) for e in s.list_files(place.base, hidden=True)
    }
    assert {"_notecoder/run.json", ".tmp-1-part.parquet", "_SUCCESS"} <= hidden
    assert s.list_files(place.uri("absent")) == []
    assert s.is_dir(place.uri("x")) and not s.is_dir(place.uri("absent"))


def test_glob(place):
    s = place.storage
    for rel in ["y=1/a.parquet", "y=2/b.parquet", "y=2/c.csv"]:
        s.write_bytes(place.uri(rel), b"data")
    found = s.glob(place.uri("y=*", "*.parquet"))
    assert [relative_to(e.uri, place.base) for e in found] == [
        "y=1/a.parquet",
        "y=2/b.parquet",
    ]


def test_copy(place):
    s = place.storage
    s.write_bytes(place.uri("src.json"), b'{"a": 1}')
    s.copy(place.uri("src.json"), place.uri("deep", "dst.json"))
    assert s.read_bytes(place.uri("deep", "dst.json")) == b'{"a": 1}'
    assert s.exists(place.uri("src.json"))


def test_failed_write_leaves_no_file(place, monkeypatch):
    """Whole or nothing: a write that fails midway leaves neither file nor temp."""
    s, uri = place.storage, place.uri("part-x.parquet")
    if place.kind == "local":

        def broken_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", broken_fsync)
    else:

        def broken_put(**kwargs):
            raise ConnectionResetError("connection reset mid-upload")

        monkeypatch.setattr(s.client, "put_object", broken_put)
    with pytest.raises(StorageError, match="cannot write"):
        s.write_bytes(uri, b"x" * 1000)
    monkeypatch.undo()
    assert s.list_files(place.base, hidden=True) == []


def test_plan_and_read_shard_agree_across_backends(place, tmp_path):
    """Planning and reading go through the same code on disk and S3."""
    s = place.storage
    s.write_bytes(place.uri("archive", "year=2024", "a.parquet"), _parquet_bytes(35))
    s.write_bytes(
        place.uri("archive", "year=2025", "b.parquet"), _parquet_bytes(20, 100)
    )
    cfg = InputConfig(uri=place.uri("archive"))
    plan = plan_archive(s, cfg, shard_rows=20)
    assert [sh.num_rows for sh in plan.shards] == [20, 15, 20]
    assert [dict(sh.partitions) for sh in plan.shards] == [
        {"year": "2024"},
        {"year": "2024"},
        {"year": "2025"},
    ]
    table = read_shard(s, plan.shards[1], ["note_id", "year"])
    assert table.column("note_id").to_pylist() == [f"n{i:04d}" for i in range(20, 35)]
    assert set(table.column("year").to_pylist()) == {"2024"}
    again = plan_archive(s, cfg, shard_rows=20)
    assert [sh.shard_id for sh in again.shards] == [sh.shard_id for sh in plan.shards]
    s.write_bytes(
        place.uri("archive", "year=2025", "b.parquet"), _parquet_bytes(21, 100)
    )
    assert plan_archive(s, cfg, shard_rows=20).fingerprint != plan.fingerprint


def test_unsupported_scheme_and_bucketless_uri():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        Storage().info("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        Storage(S3Settings("http://127.0.0.1:9")).info("s3:///x")
