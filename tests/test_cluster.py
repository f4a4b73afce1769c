"""Cluster runs: `ray start --head` on 127.0.0.1, `ray job submit`, engine placement.

The `cluster` tests start a real Ray head the way the README does, submit
jobs/code_notes.py to it with `ray job submit --working-dir .`, and read what comes
back: the streamed logs, `ray job status`, the coded output. The head is this module's
own: its own ports and `--temp-dir`, and it is stopped by signalling the `ray start
--block` process, whose own shutdown stops every process it started. `ray stop` is
not used: it stops every Ray process on the machine by name, whatever its temp dir,
which would take down the suite's session cluster (conftest.ray_local) and anybody
else's Ray on the same machine.

The rest is the engine-placement logic (pure, with fakes where Ray would need GPUs)
and the runner's handling of engines lost mid-run, on the session's local Ray with a
stand-in coder so that an engine can die on cue.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import psutil
import pytest

from notecoder.config import load_config
from notecoder.engine import EnginePlacement, engine_placement, engines_that_fit
from notecoder.errors import ConfigError

from .conftest import REPO, assert_no_fragments, note_fragments

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 120  # seconds for the head to answer `ray job list`
JOB_TIMEOUT = 420  # seconds for one `ray job submit` of the demo job
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _cfg(**overrides):
    return load_config(REPO / "configs" / "local.yaml", overrides)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail the test (TimeoutError) if the block runs longer than ``seconds``.

    For calls into the runner, which wait on Ray without a timeout of their own; the
    runner's loop returns to Python every second, where the alarm is raised.
    """

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- a Ray head of this module's own ---------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    """A `ray start --head --block` process and how to talk to it."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    env: dict[str, str]
    gcs_port: int
    dashboard_port: int
    # Every process of its tree seen so far: pid -> start time (pids get reused).
    seen: dict[int, float] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this head (cwd: the repository, as in README)."""
        return subprocess.run(
            [RAY, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def job(self, verb: str, job_id: str, timeout: float = 60) -> str:
        out = self.ray("job", verb, "--address", self.address, job_id, timeout=timeout)
        return out.stdout + out.stderr

    def pids(self) -> set[int]:
        """The pids of the `ray start` process and all its descendants, now."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return set()
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault(proc.pid, proc.create_time())
        return {proc.pid for proc in tree}

    def alive(self) -> list[psutil.Process]:
        """Processes of its tree still running (same pid and start time: no reuse)."""
        found = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.create_time() != started:
                    continue
                if proc.status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
                    found.append(proc)
        return found

    def stop(self) -> None:
        """Stop this head and everything it started; idempotent."""
        self.pids()
        if self.proc.poll() is None:
            # `ray start --block` drains the node and stops its processes on SIGTERM.
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # Anything of its tree that outlived it (a worker orphaned mid-shutdown) is
        # ended by pid.
        left = self.alive()
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(base: Path) -> Head:
    """`ray start --head` as the README has it, on free ports and a temp dir of its own.

    Token authentication is on (Ray 2.60's default once a token exists) with a token
    of this head's own, so the test needs nothing from ~/.ray and proves the job
    submission works with it. PATH starts with the venv, as after `source
    .venv/bin/activate`: a job's `python` is whatever PATH finds on the head.
    """
    # Short and outside pytest's deep tmp folders: Ray puts Unix sockets under it.
    temp_dir = Path(tempfile.mkdtemp(prefix="ncray-", dir="/tmp"))
    token = base / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"],
        }
    )
    gcs, dashboard, client, agent = _free_ports(4)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        # Both default to fixed ports that another local Ray may hold.
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    log = base / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(proc, temp_dir, log, env, gcs, dashboard)
    try:
        _wait_until_up(head)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_until_up(head: Head) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(
                f"ray start exited with {head.proc.returncode}:\n"
                + head.log.read_text(errors="replace")[-3000:]
            )
        listed = head.ray("job", "list", "--address", head.address, timeout=30)
        if listed.returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"the Ray head did not answer within {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("head"))
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def job_inputs(demo_model, tmp_path_factory):
    """A small archive of 3 shards (3 files of 8 notes) and an output folder."""
    from notecoder.demo import write_sample_archive

    base = tmp_path_factory.mktemp("job")
    archive = write_sample_archive(base / "notes", notes=24, files=3, row_group_size=8)
    return archive, base / "coded", demo_model


def _submit(head: Head, archive, out, model, *extra: str):
    """`ray job submit --working-dir . -- python jobs/code_notes.py ...`."""
    job_id = f"notecoder-test-{uuid.uuid4().hex[:8]}"
    args = [
        "job",
        "submit",
        "--address",
        head.address,
        "--working-dir",
        ".",
        "--submission-id",
        job_id,
        "--",
        "python",
        "jobs/code_notes.py",
        "--config",
        "configs/local.yaml",
        "--input",
        str(archive),
        "--output",
        str(out),
        "--model",
        str(model),
        "--set",
        "shard_rows=8",
        *extra,
    ]
    started = time.monotonic()
    done = head.ray(*args, timeout=JOB_TIMEOUT)
    return job_id, done, time.monotonic() - started


def _tail(text: str, fragments: set[str], chars: int = 3000) -> str:
    """The end of a log for a failure message, unless it would show note text."""
    if any(f in text for f in fragments):
        return "[log withheld: it holds note text]"
    return text[-chars:]


@pytest.fixture(scope="module")
def good_job(head, job_inputs):
    archive, out, model = job_inputs
    job_id, done, seconds = _submit(head, archive, out, model)
    texts = pl.read_parquet(f"{archive}/**/*.parquet").get_column("text").to_list()
    return job_id, done, seconds, note_fragments(texts)


@pytest.mark.cluster
def test_submitted_job_succeeds_and_streams_its_logs(head, good_job):
    job_id, done, seconds, fragments = good_job
    streamed = done.stdout + done.stderr
    assert done.returncode == 0, _tail(streamed, fragments)
    assert f"Job '{job_id}' succeeded" in streamed
    # The driver's own lines came back through the stream: shard commits, summary.
    assert re.search(r"shard \S+ committed: 8 rows", streamed), _tail(
        streamed, fragments
    )
    assert re.search(r"shards\s+3 of 3 committed, 0 failed, 0 retried", streamed)
    status = head.job("status", job_id)
    assert f"Job '{job_id}' succeeded" in status, _tail(status, fragments)
    logs = head.job("logs", job_id)
    assert "committed" in logs and re.search(r"notes\s+24 ", logs)
    print(f"demo job took {seconds:.1f} s from submit to exit")


@pytest.mark.cluster
def test_submitted_job_codes_every_note_exactly_once(good_job, job_inputs):
    archive, out, _ = job_inputs
    ids = pl.read_parquet(f"{archive}/**/*.parquet").get_column("note_id")
    coded = pl.read_parquet(f"{out}/part-*.parquet")
    assert sorted(coded.get_column("note_id")) == sorted(ids)
    assert coded.get_column("note_id").n_unique() == coded.height == 24
    assert (out / "_notecoder" / "summary.json").is_file()


@pytest.mark.cluster
def test_no_note_text_in_job_or_ray_logs(head, good_job):
    job_id, done, _, fragments = good_job
    assert len(fragments) > 20
    assert_no_fragments(done.stdout + done.stderr, fragments, "the streamed job logs")
    # Everything the head wrote, less the uploaded repository: lib/notecoder/demo.py
    # holds the phrases the synthetic notes are made of.
    files = [
        p
        for p in head.temp_dir.rglob("*")
        if p.is_file() and not p.is_socket() and "working_dir_files" not in p.parts
    ]
    leaking = [
        str(p.relative_to(head.temp_dir))
        for p in files
        if any(f in p.read_text(errors="replace") for f in fragments)
    ]
    # File names only: they say where to look without showing the text.
    assert leaking == [], f"note text in {len(leaking)} of {len(files)} files"


@pytest.mark.cluster
@pytest.mark.parametrize(
    "setting, error, message",
    [
        ("input.text_column=body", "PlanError", "has no column 'body'"),
        ("sampling.max_tokenz=5", "ConfigError", "unknown key 'sampling.max_tokenz'"),
    ],
    ids=["missing-column", "bad-config"],
)
def test_failing_job_ends_failed_with_the_clear_message(
    head, job_inputs, tmp_path, setting, error, message
):
    archive, _, model = job_inputs
    job_id, done, _ = _submit(
        head, archive, tmp_path / "never", model, "--set", setting
    )
    streamed = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"{error}: " in streamed and message in streamed
    assert f"Job '{job_id}' failed" in streamed
    assert f"Job '{job_id}' failed" in head.job("status", job_id)
    assert not (tmp_path / "never").exists()


@pytest.mark.cluster
def test_head_listens_on_loopback_only(head, good_job):
    pids = head.pids()
    listening = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    ours = []
    for line in listening.splitlines():
        found = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if found & pids:
            local = line.split()[3]
            host, _, port = local.rpartition(":")
            ours.append((host.strip("[]"), int(port)))
    ports = {port for _, port in ours}
    # Not vacuous: the GCS and the dashboard must be among what was found.
    assert {head.gcs_port, head.dashboard_port} <= ports, ours
    beyond = [(h, p) for h, p in ours if h not in LOOPBACK]
    assert beyond == [], f"Ray listens beyond loopback: {beyond}"


@pytest.mark.cluster
def test_stopping_the_head_leaves_the_session_ray_alone(ray_local, head, good_job):
    """Last of the head's tests: it stops the head itself, then checks both sides."""
    import ray

    assert ray.get_runtime_context().gcs_address != f"127.0.0.1:{head.gcs_port}"
    assert len(head.pids()) > 5  # GCS, raylet, dashboard, agents, workers
    head.stop()
    assert head.alive() == []
    assert not head.temp_dir.exists()

    @ray.remote
    def still_there() -> int:
        return 42

    assert ray.get(still_there.remote(), timeout=60) == 42


# -- the working-dir upload -----------------------------------------------------------


def _package(folder: Path, target: Path) -> list[str]:
    """Names in the zip `ray job submit --working-dir` would upload from folder."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(folder), target, include_gitignore=True)
    with zipfile.ZipFile(target) as package:
        return package.namelist()


def test_upload_leaves_out_environments_caches_and_data(tmp_path):
    work = tmp_path / "work"
    keep = ["lib/notecoder/runner.py", "jobs/code_notes.py", "configs/cluster.yaml"]
    drop = [
        ".venv/bin/python",
        ".git/HEAD",
        ".demo/model/config.json",
        "lib/notecoder/__pycache__/runner.cpython-311.pyc",
        ".pytest_cache/v/cache",
        "notes/year=2024/part-000.parquet",
        "adapters/coder/adapter_model.safetensors",
        "model/pytorch_model.bin",
    ]
    for rel in keep + drop:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("x")
    for name in (".gitignore", ".rayignore"):
        shutil.copy(REPO / name, work / name)
    names = {n for n in _package(work, tmp_path / "pkg.zip") if not n.endswith("/")}
    assert names == {*keep, ".gitignore", ".rayignore"}


def test_repository_upload_is_small_and_has_the_job(tmp_path):
    from ray._private import ray_constants

    names = _package(REPO, tmp_path / "repo.zip")
    size = (tmp_path / "repo.zip").stat().st_size
    assert {"jobs/code_notes.py", "lib/notecoder/runner.py", "configs/local.yaml"} <= (
        set(names)
    )
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".git", ".demo", ".pytest_cache", ".ruff_cache"}
    assert not [n for n in names if n.endswith((".parquet", ".safetensors"))]
    # The dashboard refuses a working-dir upload of 100 MiB or more; a tenth of that
    # would already mean something large slipped past .rayignore.
    assert size < ray_constants.DASHBOARD_CLIENT_MAX_SIZE / 10


# -- engine placement (pure logic; no GPU here) ---------------------------------------


def test_cpu_engine_asks_for_its_cores_only():
    placement = engine_placement(_cfg(**{"engine.cpus_per_engine": 2}), "cpu")
    assert placement == EnginePlacement(num_cpus=2, num_gpus=0)
    assert placement.actor_options() == {"num_cpus": 2, "num_gpus": 0}


def test_one_gpu_engine_holds_its_gpu_without_a_group():
    from notecoder.engine import llm_kwargs

    cfg = _cfg(**{"engine.device": "cuda", "engine.gpus_per_engine": 1})
    assert engine_placement(cfg, "cuda") == EnginePlacement(num_cpus=1, num_gpus=1)
    kwargs = llm_kwargs(cfg, "/m", "cuda")
    assert kwargs["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in kwargs


def test_tensor_parallel_engine_gets_a_strict_pack_group_and_ray_workers():
    from notecoder.engine import llm_kwargs

    cfg = _cfg(**{"engine.device": "cuda", "engine.gpus_per_engine": 4})
    placement = engine_placement(cfg, "cuda")
    assert placement.num_gpus == 0 and placement.num_cpus == 1
    assert placement.strategy == "STRICT_PACK"
    assert placement.bundles == (
        {"GPU": 1.0, "CPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
    )
    kwargs = llm_kwargs(cfg, "/m", "cuda")
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["distributed_executor_backend"] == "ray"
    # extra_args still have the last word, for a site that wants "mp".
    cfg = _cfg(
        **{
            "engine.gpus_per_engine": 2,
            "engine.extra_args": {"distributed_executor_backend": "mp"},
        }
    )
    assert llm_kwargs(cfg, "/m", "cuda")["distributed_executor_backend"] == "mp"


@pytest.mark.parametrize(
    "node_gpus, per_engine, engines",
    [([8], 1, 8), ([8], 2, 4), ([8], 3, 2), ([1, 1, 1, 1], 2, 0), ([4, 2, 1], 2, 3)],
)
def test_engines_are_counted_node_by_node(node_gpus, per_engine, engines):
    assert engines_that_fit(node_gpus, per_engine) == engines


def _fake_nodes(monkeypatch, gpus: list[float]) -> None:
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": g}} for g in gpus]
    nodes.append({"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(
        ray, "cluster_resources", lambda: {"CPU": 8.0 * len(gpus), "GPU": sum(gpus)}
    )


def _auto_engines(cfg):
    # engines: null (as many as the GPUs hold). Set after loading: an override of
    # None means "not given" and would keep local.yaml's 1.
    cfg.engine.engines = None
    return cfg


def test_engine_count_comes_from_the_gpus_of_live_nodes(monkeypatch):
    from notecoder.runner import _engine_count

    _fake_nodes(monkeypatch, [4, 4, 1])
    cfg = _auto_engines(_cfg(**{"engine.gpus_per_engine": 2}))
    assert _engine_count(cfg, "cuda") == 4
    assert _engine_count(_cfg(**{"engine.engines": 3}), "cuda") == 3


def test_engine_that_fits_no_node_is_refused(monkeypatch):
    from notecoder.runner import _engine_count

    _fake_nodes(monkeypatch, [1, 1, 1, 1])
    cfg = _auto_engines(_cfg(**{"engine.gpus_per_engine": 2}))
    with pytest.raises(ConfigError, match="no node of the Ray cluster has 2 GPUs"):
        _engine_count(cfg, "cuda")


class _Recorder:
    """Stands in for the Ray actor class: records the options of each start."""

    def __init__(self):
        self.options_seen: list[dict] = []

    def options(self, **options):
        self.options_seen.append(options)
        return self

    def remote(self, *args):
        return object()


def test_start_engine_places_tensor_parallel_engines_in_their_group(monkeypatch):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from notecoder import runner

    made, removed = [], []

    def fake_group(bundles, strategy):
        made.append((bundles, strategy))
        return f"group-{len(made)}"

    recorder = _Recorder()
    monkeypatch.setattr(runner, "coder_actor_class", lambda: recorder)
    monkeypatch.setattr(ray.util, "placement_group", fake_group)
    monkeypatch.setattr(ray.util, "remove_placement_group", removed.append)
    monkeypatch.setattr(runner, "_ENGINES", [])
    monkeypatch.setattr(runner, "_GROUPS", {})
    cfg = _cfg(**{"engine.device": "cuda", "engine.gpus_per_engine": 2})
    prep = type("Prep", (), {"cfg": cfg})()
    ctx = type("Ctx", (), {"device": "cuda"})()
    runner._start_engine(prep, ctx, 0)
    runner._start_engine(prep, ctx, 1)
    runner._start_engine(prep, ctx, 0)  # engine 0 replaced after a loss
    assert made == [([{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}], "STRICT_PACK")] * 3
    assert removed == ["group-1"]  # the lost engine's GPUs are given back
    first = recorder.options_seen[0]
    assert first["num_gpus"] == 0 and first["num_cpus"] == 1
    assert first["max_restarts"] == 0
    strategy = first["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy)
    assert strategy.placement_group == "group-1"
    assert strategy.placement_group_capture_child_tasks is True
    runner._shutdown_engines()
    assert sorted(removed) == ["group-1", "group-2", "group-3"]


def test_start_engine_on_cpu_binds_cores_and_needs_no_group(monkeypatch):
    from notecoder import runner

    recorder = _Recorder()
    monkeypatch.setattr(runner, "coder_actor_class", lambda: recorder)
    monkeypatch.setattr(runner, "_ENGINES", [])
    monkeypatch.setattr(runner, "_GROUPS", {})
    prep = type("Prep", (), {"cfg": _cfg()})()
    runner._start_engine(prep, type("Ctx", (), {"device": "cpu"})(), 1)
    options = recorder.options_seen[0]
    assert "scheduling_strategy" not in options
    assert options["num_cpus"] == 1 and options["num_gpus"] == 0
    env = options["runtime_env"]["env_vars"]
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" in env


def test_engine_actor_finds_its_group_from_inside(ray_local):
    """What vLLM's Ray executor relies on: get_current_placement_group() in the actor.

    CPU bundles stand in for GPU ones (there is no GPU here); the group, the strategy
    and the lookup from inside the actor are Ray's real ones.
    """
    import ray
    from ray.util.placement_group import placement_group_table

    from notecoder import runner

    placement = EnginePlacement(
        num_cpus=0.1, num_gpus=0, bundles=({"CPU": 0.2}, {"CPU": 0.1})
    )
    options = runner._group_strategy(placement, index=97)
    group = runner._GROUPS[97]
    try:

        @ray.remote
        class Probe:
            def group_id(self):
                found = ray.util.get_current_placement_group()
                return found.id.hex() if found else None

        probe = Probe.options(num_cpus=0.1, **options).remote()
        assert ray.get(probe.group_id.remote(), timeout=60) == group.id.hex()
        table = placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK"
        assert len(table["bundles"]) == 2
        ray.kill(probe)
    finally:
        runner._remove_group(97)
    assert placement_group_table(group)["state"] == "REMOVED"


# -- engines lost mid-run --------------------------------------------------------------


def _dying_coder_class(flags: Path, comes_back: bool):
    """A stand-in engine: the first shard handed to any engine kills its process.

    Built in a function so that Ray ships the class by value to its workers. The
    replacement engine starts normally, or (``comes_back`` False) fails as if its
    node were gone for good.
    """
    from notecoder.tally import ShardTally

    class DyingCoder:
        def __init__(self, cfg, ctx, llm=None, skip_ids=None):
            if (flags / "died").exists() and not comes_back:
                raise RuntimeError("node gone")
            self.pid = os.getpid()

        def ready(self):
            return self.pid

        def code_shard(self, shard, attempt=1):
            try:
                os.close(os.open(flags / "died", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # the engine, or its node, is lost mid-shard
            (flags / f"coded-{shard.shard_id}-{attempt}").touch()
            return ShardTally(
                shard.shard_id,
                shard.file_uri,
                rows=shard.num_rows,
                statuses={"ok": shard.num_rows},
                attempt=attempt,
                worker=str(self.pid),
            )

    return DyingCoder


@pytest.mark.parametrize("comes_back", [True, False], ids=["returns", "gone"])
def test_lost_engine_costs_only_its_shard(ray_local, tmp_path, monkeypatch, comes_back):
    import ray

    from notecoder import runner
    from notecoder.demo import write_sample_archive

    archive = write_sample_archive(
        tmp_path / "notes", notes=48, files=4, row_group_size=12
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    flags = tmp_path / "flags"
    flags.mkdir()
    coder = ray.remote(_dying_coder_class(flags, comes_back))
    monkeypatch.setattr(runner, "coder_actor_class", lambda: coder)
    cfg = _cfg(
        **{
            "input.uri": str(archive),
            "output.uri": str(tmp_path / "out"),
            "model.path": str(model),
            "engine.engines": 2,
            "shard_rows": 12,
        }
    )
    with deadline(120):
        summary = runner.run_job(cfg, echo=lambda _: None)
    assert (flags / "died").exists()
    assert summary.shards_total == summary.shards_committed == 4
    assert summary.shards_failed == 0
    assert summary.shards_retried == 1  # the one shard in flight on the lost engine
    assert summary.rows == 48
    # Which attempt coded each shard: the lost one on its second, the rest first.
    coded = sorted(int(f.name.rsplit("-", 1)[1]) for f in flags.glob("coded-*"))
    assert coded == [1, 1, 1, 2]
    run = json.loads((tmp_path / "out" / "_notecoder" / "run.json").read_text())
    assert run["attempts"][-1]["shards_retried"] == 1
