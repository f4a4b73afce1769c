"""A real S3 API on 127.0.0.1 for the tests: moto in server mode, one per session.

Importing this module, which happens while pytest collects the tests, points the AWS
credential chain of this process (and so of every process it starts: Ray workers,
``notecoder run`` subprocesses) at fake keys, and switches off the cloud metadata
lookup and any profile, before anything reads them. So no test can reach a real AWS
account or a metadata address, and notecoder reaches the server exactly as it reaches
AWS: endpoint from the config's ``s3.endpoint_url``, keys from the environment.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from notecoder.storage import S3Settings, Storage, join

REGION = "us-east-1"
# Distinctive, so that tests can search logs and outputs for a leaked secret.
FAKE_KEY_ID = "AKIANOTECODERTEST01"
FAKE_SECRET = "notecoder-fake-secret-7f3a9c1e5b"

_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
for _name in _UNSET:
    os.environ.pop(_name, None)
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
)


@dataclass
class S3Server:
    """A running moto server and helpers to fill it."""

    endpoint: str

    def settings(self) -> S3Settings:
        return S3Settings(self.endpoint, REGION, "path")

    def overrides(self) -> dict[str, str]:
        """Config overrides that aim notecoder at this server."""
        return {
            "s3.endpoint_url": self.endpoint,
            "s3.region": REGION,
            "s3.addressing_style": "path",
        }

    def set_args(self) -> list[str]:
        """The same, as `notecoder run --set` arguments."""
        args = []
        for key, value in self.overrides().items():
            args += ["--set", f"{key}={value}"]
        return args

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(region_name=REGION, s3={"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=self.endpoint, config=config)

    def new_bucket(self) -> str:
        """A fresh, empty bucket; its name."""
        name = f"nc-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: Path, uri: str) -> str:
        """Copy a local folder's files under an s3:// prefix; returns the prefix."""
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        client = self.client()
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
                client.upload_file(str(path), bucket, key.lstrip("/"))
        return uri

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


_LOCK = threading.Lock()
_SERVER: S3Server | None = None


def s3_server() -> S3Server:
    """The session's moto server, started on first use on 127.0.0.1.

    It runs as its own process (`moto_server`), not as a thread of the tests: moto
    imports flask, and vLLM 0.32 cannot start an engine in a process where flask is
    imported (its kernel scan trips over flask's context proxies).
    """
    global _SERVER
    with _LOCK:
        if _SERVER is None:
            port = _free_port()
            exe = str(Path(sys.executable).with_name("moto_server"))
            proc = subprocess.Popen(
                [exe, "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            atexit.register(_stop, proc)
            server = S3Server(f"http://127.0.0.1:{port}")
            _wait_until_up(server, proc)
            _SERVER = server
        return _SERVER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(server: S3Server, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            server.client().list_buckets()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not answer within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session", name="s3")
def s3_fixture() -> S3Server:
    """The moto server (import this fixture into a test module to use it)."""
    return s3_server()


@dataclass
class Place:
    """A Storage and a base URI under which a test may write anything."""

    storage: Storage
    base: str
    kind: str  # "local" or "s3"
    overrides: dict[str, str]  # config keys that aim notecoder at this place

    def uri(self, *parts: str) -> str:
        return join(self.base, *parts)


@pytest.fixture(
    params=["local", pytest.param("s3", marks=pytest.mark.s3)], name="place"
)
def place_fixture(request, tmp_path) -> Place:
    """Run the test twice: on a temporary folder, then on a fresh moto bucket."""
    if request.param == "local":
        return Place(Storage(), str(tmp_path / "root"), "local", {})
    s3 = s3_server()
    base = f"s3://{s3.new_bucket()}/root"
    return Place(Storage(s3.settings()), base, "s3", s3.overrides())
