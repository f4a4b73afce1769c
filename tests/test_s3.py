"""S3 specifics against a real S3 API on 127.0.0.1 (moto's server mode).

Whole-or-nothing uploads (including a process killed mid-upload), credentials from
the AWS chain only, and models fetched from S3 into a per-node cache.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError

from notecoder import storage as storage_mod
from notecoder.errors import ModelError, StorageError
from notecoder.modelref import content_hash, resolve_model
from notecoder.s3model import (
    MANIFEST,
    cache_folder,
    download_model,
    ensure_local_model,
)
from notecoder.storage import (
    S3Settings,
    Storage,
    make_s3_client,
    pyarrow_s3_options,
)

from .s3server import (  # noqa: F401
    FAKE_KEY_ID,
    FAKE_SECRET,
    REGION,
    S3Server,
    s3_fixture,
)

pytestmark = pytest.mark.s3

SMALL_PART = 5 << 20  # the least S3 accepts for a part that is not the last


def _count_calls(storage: Storage, operation: str) -> list[int]:
    """A counter of one S3 operation made through this storage's boto3 client."""
    calls = [0]

    def count(**kwargs):
        calls[0] += 1

    storage.client.meta.events.register(f"before-call.s3.{operation}", count)
    return calls


def _model_folder(root: Path) -> Path:
    """A small folder in Hugging Face layout (not loadable; enough to fetch)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (root / "adapters").mkdir()
    (root / "adapters" / "adapter_config.json").write_text("{}")
    return root


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


@pytest.fixture
def storage(s3: S3Server) -> Storage:
    return Storage(s3.settings())


# -- whole-or-nothing uploads -----------------------------------------------------


def test_pyarrow_output_stream_publishes_half_written_objects(s3, bucket):
    """Why writes do not use pyarrow: an exception inside ``with`` still uploads."""
    fs = pafs.S3FileSystem(**pyarrow_s3_options(s3.settings()))
    with pytest.raises(RuntimeError), fs.open_output_stream(f"{bucket}/half") as f:
        f.write(b"first half")
        raise RuntimeError("the writer failed before the second half")
    assert s3.keys(bucket) == ["half"]


def test_multipart_upload_round_trip(s3, bucket, storage, monkeypatch):
    monkeypatch.setattr(storage_mod, "MULTIPART_THRESHOLD", SMALL_PART)
    monkeypatch.setattr(storage_mod, "MULTIPART_PART_SIZE", SMALL_PART)
    data = bytes(range(256)) * (11 * 4096)  # 11 MiB: three parts
    parts = _count_calls(storage, "UploadPart")
    storage.write_bytes(f"s3://{bucket}/big.bin", data)
    assert parts[0] == 3
    assert storage.read_bytes(f"s3://{bucket}/big.bin") == data


def test_multipart_failure_leaves_no_object_and_no_upload(
    s3, bucket, storage, monkeypatch
):
    monkeypatch.setattr(storage_mod, "MULTIPART_THRESHOLD", SMALL_PART)
    monkeypatch.setattr(storage_mod, "MULTIPART_PART_SIZE", SMALL_PART)

    def fail_second_part(params, **kwargs):
        if params.get("PartNumber") == 2:
            raise ConnectionResetError("connection reset during part 2")

    storage.client.meta.events.register(
        "provide-client-params.s3.UploadPart", fail_second_part
    )
    with pytest.raises(StorageError, match="cannot write"):
        storage.write_bytes(f"s3://{bucket}/big.bin", b"z" * (11 << 20))
    assert s3.keys(bucket) == []
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_process_killed_mid_upload_leaves_no_object(s3, bucket):
    """SIGKILL between parts: no object appears (only an invisible, pending upload)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from notecoder import storage as st
        st.MULTIPART_THRESHOLD = st.MULTIPART_PART_SIZE = {SMALL_PART}
        s = st.Storage(st.S3Settings({s3.endpoint!r}, {REGION!r}, "path"))
        def die(**kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        s.client.meta.events.register("after-call.s3.UploadPart", die)
        s.write_bytes("s3://{bucket}/killed.bin", b"k" * (11 << 20))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -9
    assert s3.keys(bucket) == []
    pending = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in pending] == ["killed.bin"]


# -- settings and credentials -------------------------------------------------------


def test_settings_reach_both_clients():
    settings = S3Settings("https://minio.internal:9000", "eu-west-2", "virtual")
    assert pyarrow_s3_options(settings) == {
        "region": "eu-west-2",
        "endpoint_override": "minio.internal:9000",
        "scheme": "https",
        "force_virtual_addressing": True,
    }
    client = make_s3_client(S3Settings("http://127.0.0.1:9", "eu-west-2", "path"))
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-2"
    assert client.meta.config.s3 == {"addressing_style": "path"}


def test_missing_credentials_say_where_they_come_from(s3, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="standard AWS chain") as err:
        Storage(s3.settings()).list_files(f"s3://{bucket}/x")
    assert "never reads them from its config" in str(err.value)


def test_missing_bucket_is_named(storage):
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.list_files("s3://nc-no-such-bucket-here/x")


# -- models from S3 -------------------------------------------------------------------


def test_model_is_downloaded_once_and_reused(s3, bucket, storage, tmp_path):
    local = _model_folder(tmp_path / "model")
    source = s3.upload_folder(local, f"s3://{bucket}/models/coder")
    cache = tmp_path / "cache"
    gets = _count_calls(storage, "GetObject")
    path = download_model(storage, source, cache)
    assert path == cache / bucket / "models" / "coder"
    assert gets[0] == 4
    assert content_hash(path) == content_hash(local)
    assert (path / "adapters" / "adapter_config.json").read_text() == "{}"
    assert json.loads((path / MANIFEST).read_text())["source"] == source
    assert download_model(storage, source, cache) == path
    assert gets[0] == 4, "a current cached copy must not be fetched again"


def test_changed_or_damaged_model_is_fetched_again(s3, bucket, storage, tmp_path):
    local = _model_folder(tmp_path / "model")
    source = s3.upload_folder(local, f"s3://{bucket}/m")
    cache = tmp_path / "cache"
    path = download_model(storage, source, cache)
    s3.client().put_object(Bucket=bucket, Key="m/config.json", Body=b'{"v": 2}')
    download_model(storage, source, cache)
    assert (path / "config.json").read_text() == '{"v": 2}'
    (path / "model.safetensors").write_bytes(b"cut short")
    download_model(storage, source, cache)
    assert (path / "model.safetensors").read_bytes() == bytes(range(256)) * 4096
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_failed_download_leaves_no_model_folder(s3, bucket, storage, tmp_path):
    source = s3.upload_folder(_model_folder(tmp_path / "model"), f"s3://{bucket}/m")
    cache = tmp_path / "cache"
    seen = [0]

    def fail_third(**kwargs):
        # Not a network error: the managed download retries those by itself.
        seen[0] += 1
        if seen[0] == 3:
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")

    storage.client.meta.events.register("before-call.s3.GetObject", fail_third)
    with pytest.raises(StorageError, match="cannot download"):
        download_model(storage, source, cache)
    folder = cache_folder(cache, source)
    assert not folder.exists()
    assert [p.name for p in folder.parent.iterdir()] == ["m.lock"]
    assert download_model(Storage(s3.settings()), source, cache) == folder


def test_engines_asking_at_once_download_once(s3, bucket, tmp_path):
    """Three processes on one node ask together: one download, all get it whole."""
    source = s3.upload_folder(_model_folder(tmp_path / "model"), f"s3://{bucket}/m")
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import json, os, time
        from pathlib import Path
        from notecoder.s3model import download_model
        from notecoder.storage import S3Settings, Storage
        s = Storage(S3Settings({s3.endpoint!r}, {REGION!r}, "path"))
        gets = [0]
        def count(**kw):
            gets[0] += 1
        s.client.meta.events.register("before-call.s3.GetObject", count)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        path = download_model(s, {source!r}, Path({str(cache)!r}))
        print(json.dumps({{"gets": gets[0], "path": str(path)}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    time.sleep(1.0)  # let all three import and wait at the gate
    go.write_text("")
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(r["gets"] for r in results) == [0, 0, 4]
    assert {r["path"] for r in results} == {str(cache_folder(cache, source))}


def test_unsafe_or_empty_model_prefix(s3, bucket, storage, tmp_path):
    with pytest.raises(ModelError, match="path part"):
        cache_folder(tmp_path, f"s3://{bucket}/models/../../etc")
    with pytest.raises(ModelError, match="holds no files"):
        download_model(storage, f"s3://{bucket}/nothing-here", tmp_path)


def test_resolve_model_from_s3_matches_the_local_folder(s3, bucket, storage, tmp_path):
    local = _model_folder(tmp_path / "model")
    source = s3.upload_folder(local, f"s3://{bucket}/models/coder")
    ref = resolve_model(storage, source)
    assert ref.source == source
    assert ref.content_hash == content_hash(local)
    assert Path(ref.local_dir).is_dir()
    assert ref.label == f"coder@{ref.content_hash[:12]}"


def test_engine_on_another_node_fetches_and_checks_the_model(
    s3, bucket, storage, tmp_path
):
    """An engine whose node lacks the driver's folder fetches its own copy."""
    local = _model_folder(tmp_path / "model")
    source = s3.upload_folder(local, f"s3://{bucket}/m")
    expected = content_hash(local)
    elsewhere = str(tmp_path / "on-the-driver-node-only")
    folder = ensure_local_model(storage, source, elsewhere, expected)
    assert folder != elsewhere and content_hash(Path(folder)) == expected
    with pytest.raises(ModelError, match="changed since this run began"):
        ensure_local_model(storage, source, elsewhere, "0" * 64)
    with pytest.raises(ModelError, match="does not exist on this node"):
        ensure_local_model(storage, elsewhere, elsewhere, expected)


def test_debug_logging_shows_no_credentials(s3, bucket, caplog, tmp_path):
    """At DEBUG, botocore would print signed headers; notecoder keeps it quiet."""
    source = s3.upload_folder(_model_folder(tmp_path / "model"), f"s3://{bucket}/m")
    caplog.set_level(logging.DEBUG)
    storage = Storage(s3.settings())
    storage.write_bytes(f"s3://{bucket}/x.json", b"{}")
    download_model(storage, source, tmp_path / "cache")
    assert "downloading 4 files" in caplog.text
    assert FAKE_KEY_ID not in caplog.text and FAKE_SECRET not in caplog.text
