"""Shared fixtures: the demo model, a sample archive, a local Ray, a real engine.

Everything real: the vLLM CPU build on the tiny demo model, a local Ray cluster bound
to 127.0.0.1, files on disk. Expensive things are built once per session.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The engine settings the machine notes call for, before anything imports vllm.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The in-test engine takes the last core; engine actors bind from core 0 upwards.
if (os.cpu_count() or 1) >= 2:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str((os.cpu_count() or 2) - 1))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the model-hash cache and downloads out of the user's home."""
    os.environ["NOTECODER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    from notecoder.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("model") / "demo")


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory) -> Path:
    from notecoder.demo import write_sample_archive

    return write_sample_archive(tmp_path_factory.mktemp("archive") / "notes")


@pytest.fixture(scope="session")
def local_config():
    from notecoder.config import load_config

    return load_config(REPO / "configs" / "local.yaml")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster on loopback for the whole session."""
    import ray

    from notecoder.runner import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_llm(demo_model, local_config):
    """One real vLLM engine in the test process, shared by the coder-level tests."""
    from notecoder.engine import make_llm

    return make_llm(local_config, str(demo_model), "cpu")


def note_fragments(texts, words: int = 6) -> set[str]:
    """Distinctive runs of words from each note, to search logs for leaks."""
    found = set()
    for text in texts:
        if not text or not text.strip():
            continue
        tokens = re.findall(r"\S+", text)
        for start in range(0, max(1, len(tokens) - words + 1), max(1, words)):
            chunk = " ".join(tokens[start : start + words])
            if len(chunk) >= 24:
                found.add(chunk)
    return found


def assert_no_fragments(haystack: str, fragments: set[str], where: str) -> None:
    """Fail naming only how many fragments leaked, never the text itself."""
    leaked = sum(1 for f in fragments if f in haystack)
    assert leaked == 0, f"{leaked} note-text fragments appear in {where}"


def python_bin() -> str:
    return sys.executable


def notecoder_bin() -> str:
    return str(Path(sys.executable).with_name("notecoder"))
