"""The driver: plan, check the output, start engines, hand out shards, tally.

The driver does no coding itself. It plans (footers only), refuses to mix runs in one
output, starts one Ray actor per engine, keeps each engine busy with one shard at a
time, retries shards whose engine died or failed, and writes the run summary. Every
shard is committed by its engine, so killing the driver loses only in-flight shards:
running the same command again codes just the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from notecoder import __version__, codes
from notecoder.coder import RunContext, coder_actor_class
from notecoder.commit import OutputLayout
from notecoder.config import JobConfig
from notecoder.engine import (
    EnginePlacement,
    common_engine_env,
    cpu_engine_env,
    engine_placement,
    engines_that_fit,
)
from notecoder.errors import (
    ConfigError,
    ModelError,
    OutputMismatchError,
    ShardsFailedError,
)
from notecoder.housekeeping import archive_run, remove_strays
from notecoder.incremental import SkipSet, input_id_type, load_skip_set
from notecoder.modelref import ModelRef, resolve_model
from notecoder.plan import Plan, Shard, plan_archive
from notecoder.storage import S3Settings, Storage
from notecoder.tally import RunSummary, ShardTally, format_summary, summarise

log = logging.getLogger(__name__)

# Seconds before a failed shard is tried again: 2, 4, 8 ... capped.
RETRY_BACKOFF_CAP = 30.0


def s3_settings(cfg: JobConfig) -> S3Settings:
    return S3Settings(cfg.s3.endpoint_url, cfg.s3.region, cfg.s3.addressing_style)


def settings_of(
    cfg: JobConfig, model: ModelRef, plan: Plan, skip: SkipSet | None = None
) -> dict[str, Any]:
    """What must be equal for two attempts to write into the same output."""
    return {
        "model.content_hash": model.content_hash,
        "model.lora_hash": model.adapter.content_hash if model.adapter else None,
        "model.system_prompt": cfg.model.system_prompt,
        "model.max_model_len": cfg.model.max_model_len,
        "output.shape": cfg.output.shape,
        "output.max_codes": cfg.output.max_codes,
        "sampling.temperature": cfg.sampling.temperature,
        "sampling.seed": cfg.sampling.seed,
        "sampling.max_tokens": cfg.sampling.max_tokens,
        "sampling.structured": cfg.sampling.structured,
        "input.id_column": cfg.input.id_column,
        "input.text_column": cfg.input.text_column,
        "input.passthrough_columns": list(cfg.input.passthrough_columns),
        "input.fingerprint": plan.fingerprint,
        "input.skip_coded": skip.fingerprint if skip else None,
        "shard_rows": cfg.shard_rows,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Prepared:
    """Everything known before an engine starts."""

    cfg: JobConfig
    storage: Storage
    layout: OutputLayout
    plan: Plan
    model: ModelRef
    manifest: dict[str, Any]
    committed: dict[str, ShardTally]
    skip: SkipSet | None = None

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.plan.shards if s.shard_id not in self.committed]


def prepare(cfg: JobConfig, *, new_run: bool = False) -> Prepared:
    """Plan the input and open (or start) the run in the output; no engine starts.

    With ``new_run``, a run already in the output is retired first (see
    housekeeping.archive_run). Raises PlanError, ModelError or OutputMismatchError
    with a message that says what to change.
    """
    cfg.require_paths()
    storage = Storage(s3_settings(cfg))
    plan = plan_archive(storage, cfg.input, cfg.shard_rows)
    model = resolve_model(
        storage, cfg.model.path, cfg.model.lora_path, cfg.model.max_lora_rank
    )
    layout = OutputLayout(storage, cfg.output.uri)
    skip = _skip_set(storage, cfg, plan)
    settings = settings_of(cfg, model, plan, skip)
    manifest = layout.read_json(layout.run_file)
    replaces = None
    if manifest is not None and new_run:
        archive_run(layout, manifest)
        replaces, manifest = manifest.get("run_id"), None
    # Listing the output and reading every marker is the slow part on S3: once.
    found = layout.committed()
    if manifest is not None and not found:
        # A run that never committed a shard (its engines failed to start, say) has
        # nothing to mix with: a corrected rerun simply starts over.
        log.info(
            "output %s holds run %s with no committed shard; starting a new run",
            cfg.output.uri,
            manifest.get("run_id"),
        )
        replaces, manifest = manifest.get("run_id"), None
    if manifest is not None:
        diffs = _differences(manifest.get("settings", {}), settings)
        if diffs:
            raise OutputMismatchError(
                f"output {cfg.output.uri} holds run {manifest.get('run_id')} made with "
                "other settings; refusing to mix them:\n  "
                + "\n  ".join(diffs)
                + "\nwrite to a new --output, pass --new-run to replace that run, or "
                "restore the settings to resume"
            )
    else:
        manifest = {
            "run_id": _new_run_id(),
            "created_at": _now(),
            "notecoder_version": __version__,
            "settings": settings,
            "model": {
                "path": cfg.model.path,
                "revision": cfg.model.revision,
                "content_hash": model.content_hash,
                "label": model.label,
                "lora": _adapter_record(model),
            },
            "code_set": codes.EDITION,
            "input": {
                "uri": cfg.input.uri,
                "fingerprint": plan.fingerprint,
                "files": len(plan.files),
                "rows": plan.total_rows,
                "shards": len(plan.shards),
                "skip_coded": skip.record() if skip else None,
            },
            "config": cfg.model_dump(mode="json"),
            "attempts": [],
            "replaces_run": replaces,
        }
    planned = {s.shard_id for s in plan.shards}
    committed = {k: v for k, v in found.items() if k in planned}
    return Prepared(cfg, storage, layout, plan, model, manifest, committed, skip)


def _adapter_record(model: ModelRef) -> dict[str, Any] | None:
    """The LoRA adapter's entry in run.json (None when the model runs as it is)."""
    if model.adapter is None:
        return None
    return {
        "path": model.adapter.source,
        "content_hash": model.adapter.content_hash,
        "rank": model.adapter.rank,
    }


def _skip_set(storage: Storage, cfg: JobConfig, plan: Plan) -> SkipSet | None:
    if not cfg.input.skip_coded:
        return None
    first = plan.files[0].entry.uri
    id_type = input_id_type(storage, first, cfg.input.id_column)
    return load_skip_set(
        storage, cfg.input.skip_coded, cfg.input.id_column, id_type, cfg.output.uri
    )


def _new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


@dataclass
class _Attempt:
    started: float = field(default_factory=time.time)
    retried: int = 0
    failed: list[str] = field(default_factory=list)
    coded: int = 0
    engines: int = 0
    accelerators_per_engine: int = 1


def run_job(cfg: JobConfig, *, echo: Any = print, new_run: bool = False) -> RunSummary:
    """Run (or resume) a job end to end and return its summary.

    ``new_run`` replaces a run already in the output instead of refusing to mix.
    Raises ShardsFailedError, after committing every shard that could be, when some
    shard failed on all its attempts.
    """
    prep = prepare(cfg, new_run=new_run)
    run_id = prep.manifest["run_id"]
    pending = prep.pending
    log.info(
        "run %s: %d shards, %d already committed, %d to code",
        run_id,
        len(prep.plan.shards),
        len(prep.committed),
        len(pending),
    )
    if not pending:
        echo(
            f"run {run_id}: all {len(prep.plan.shards)} shards already committed; "
            "nothing to do"
        )
        summary = _summary(prep, prep.committed, _Attempt(), write=False)
        echo(format_summary(summary))
        return summary
    attempt = _Attempt()
    for earlier in prep.manifest["attempts"]:
        # A driver that was killed never wrote how its attempt ended.
        if earlier.get("status") == "running":
            earlier["status"] = "interrupted"
    prep.manifest["attempts"].append({"started_at": _now(), "status": "running"})
    prep.layout.write_json(prep.layout.run_file, prep.manifest)
    try:
        tallies = _code_shards(prep, pending, attempt)
    finally:
        _shutdown_engines()
    committed = dict(prep.committed)
    committed.update({t.shard_id: t for t in tallies})
    remove_strays(prep.layout)
    summary = _summary(prep, committed, attempt, write=True)
    echo(format_summary(summary))
    if attempt.failed:
        raise ShardsFailedError(
            f"{len(attempt.failed)} shards failed after {cfg.max_shard_attempts} "
            f"attempts each: {', '.join(attempt.failed)}; the other shards are "
            "committed, and running the same command again retries only these",
            attempt.failed,
        )
    return summary


def _summary(
    prep: Prepared, committed: dict[str, ShardTally], attempt: _Attempt, write: bool
) -> RunSummary:
    attempts = prep.manifest["attempts"]
    if write:
        wall = time.time() - attempt.started
        attempts[-1].update(
            {
                "ended_at": _now(),
                "status": "failed" if attempt.failed else "succeeded",
                "wall_seconds": wall,
                "engines": attempt.engines,
                "accelerators_per_engine": attempt.accelerators_per_engine,
                "accelerator_seconds": wall
                * attempt.engines
                * attempt.accelerators_per_engine,
                "shards_coded": attempt.coded,
                "shards_retried": attempt.retried,
                "shards_failed": attempt.failed,
            }
        )
    done = [a for a in attempts if "wall_seconds" in a]
    summary = summarise(
        prep.manifest["run_id"],
        list(committed.values()),
        shards_total=len(prep.plan.shards),
        shards_failed=len(attempt.failed),
        shards_retried=sum(a.get("shards_retried", 0) for a in done),
        wall_seconds=sum(a["wall_seconds"] for a in done),
        accelerator_seconds=sum(a["accelerator_seconds"] for a in done),
        engines=max((a["engines"] for a in done), default=0),
        accelerators_per_engine=max(
            (a["accelerators_per_engine"] for a in done), default=1
        ),
        cost=prep.cfg.cost,
    )
    if write:
        if len(committed) == len(prep.plan.shards):
            prep.manifest["ended_at"] = attempts[-1]["ended_at"]
        prep.layout.write_json(prep.layout.run_file, prep.manifest)
        prep.layout.write_json(prep.layout.summary_file, summary.to_dict())
        from notecoder.ledger import record_run  # never raises: see notecoder.ledger

        record_run(prep.cfg, prep.manifest, summary, prep.storage)
    return summary


# -- Ray ----------------------------------------------------------------------------


def ensure_ray() -> None:
    """Join the cluster the job was submitted to, or start a local one on loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    _keep_on_loopback()
    # address="local": always a new cluster of our own, never one that some other
    # `ray start` on this machine left recorded in /tmp/ray.
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
    )


def _keep_on_loopback() -> None:
    """Make a local Ray cluster listen on 127.0.0.1 only.

    Ray's servers bind every interface unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0,
    and Ray reads that variable once, when it is first imported; vLLM or a caller may
    have imported Ray before us, so the value it derived is set here as well. A local
    run has no business being reachable from the network.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _shutdown_engines() -> None:
    import ray

    for actor in _ENGINES:
        # An actor that already died needs no killing.
        with contextlib.suppress(Exception):
            ray.kill(actor)
    _ENGINES.clear()
    for index in list(_GROUPS):
        _remove_group(index)


_ENGINES: list[Any] = []
# Engine index -> the placement group its actor runs in (tensor parallel engines).
_GROUPS: dict[int, Any] = {}


def _device(cfg: JobConfig) -> str:
    import ray

    if cfg.engine.device != "auto":
        return cfg.engine.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def _engine_count(cfg: JobConfig, device: str) -> int:
    import ray

    if cfg.engine.engines is not None:
        return cfg.engine.engines
    res = ray.cluster_resources()
    if device == "cuda":
        per_node = [
            node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]
        ]
        fit = engines_that_fit(per_node, cfg.engine.gpus_per_engine)
        if fit == 0:
            # Counted once, at the start: one engine that can never be placed
            # would hold the run forever, waiting for GPUs.
            raise ConfigError(
                f"no node of the Ray cluster has {cfg.engine.gpus_per_engine} GPUs "
                f"for one engine (the most on one node is {max(per_node, default=0):g})"
                ": lower engine.gpus_per_engine, or add nodes with more GPUs"
            )
        return fit
    return max(1, int(res.get("CPU", 1)) // cfg.engine.cpus_per_engine)


def _start_engine(
    prep: Prepared, ctx: RunContext, index: int, skip_ref: Any = None
) -> Any:
    cfg = prep.cfg
    env = common_engine_env()
    if ctx.device == "cpu":
        env.update(cpu_engine_env(cfg, index, None))
    placement = engine_placement(cfg, ctx.device)
    actor_cls = coder_actor_class()
    actor = actor_cls.options(
        runtime_env={"env_vars": env},
        max_restarts=0,
        max_concurrency=1,
        **placement.actor_options(),
        **_group_strategy(placement, index),
    ).remote(cfg, ctx, None, skip_ref)
    _ENGINES.append(actor)
    return actor


def _group_strategy(placement: EnginePlacement, index: int) -> dict[str, Any]:
    """Scheduling options putting engine ``index`` in a new placement group, if any.

    The group of the engine it replaces is removed first: it would otherwise keep
    its GPUs reserved for an actor that is gone. Child tasks are captured so that
    whatever vLLM starts from inside the actor stays in the group too.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    _remove_group(index)
    if placement.bundles is None:
        return {}
    group = ray.util.placement_group(
        [dict(b) for b in placement.bundles], strategy=placement.strategy
    )
    _GROUPS[index] = group
    strategy = PlacementGroupSchedulingStrategy(
        group, placement_group_capture_child_tasks=True
    )
    return {"scheduling_strategy": strategy}


def _remove_group(index: int) -> None:
    import ray

    group = _GROUPS.pop(index, None)
    if group is not None:
        # Already gone with its job or node: nothing left to free.
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(group)


def _code_shards(
    prep: Prepared, shards: list[Shard], attempt: _Attempt
) -> list[ShardTally]:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    ensure_ray()
    cfg = prep.cfg
    device = _device(cfg)
    n = min(_engine_count(cfg, device), len(shards))
    _check_room(cfg, device, n)
    attempt.engines = n
    attempt.accelerators_per_engine = (
        cfg.engine.gpus_per_engine if device == "cuda" else 1
    )
    ctx = RunContext(
        run_id=prep.manifest["run_id"],
        model_label=prep.model.label,
        model_dir=prep.model.local_dir,
        output_uri=cfg.output.uri,
        device=device,
        s3=s3_settings(cfg),
        model_source=prep.model.source,
        model_hash=prep.model.content_hash,
        lora_source=prep.model.adapter.source if prep.model.adapter else "",
        lora_dir=prep.model.adapter.local_dir if prep.model.adapter else "",
        lora_hash=prep.model.adapter.content_hash if prep.model.adapter else "",
    )
    # Put once, shared by every engine on a node (Ray resolves it for each actor).
    skip_ref = ray.put(prep.skip.ids) if prep.skip is not None else None
    log.info("starting %d %s engine(s)", n, device)
    actors = [_start_engine(prep, ctx, i, skip_ref) for i in range(n)]
    _wait_ready(actors, cfg.engine.start_timeout_seconds)
    progress = _Progress(len(shards), sum(s.num_rows for s in shards))
    queue: deque[tuple[Shard, int, float]] = deque((s, 1, 0.0) for s in shards)
    inflight: dict[Any, tuple[int, Shard, int]] = {}
    idle = list(range(n))
    starting: dict[Any, int] = {}  # ready() of a replacement engine -> its index
    tallies: list[ShardTally] = []
    while queue or inflight:
        now = time.time()
        for _ in range(len(queue)):
            if not idle:
                break
            shard, tries, not_before = queue.popleft()
            if not_before > now:
                queue.append((shard, tries, not_before))
                continue
            idx = idle.pop()
            inflight[actors[idx].code_shard.remote(shard, tries)] = (idx, shard, tries)
        if not inflight and not starting:
            if not idle:
                _no_engine_left(queue, attempt)
                break
            time.sleep(0.2)
            continue
        done, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=1.0)
        for ref in done:
            if ref in starting:
                _replacement_started(ref, starting.pop(ref), idle)
                continue
            idx, shard, tries = inflight.pop(ref)
            try:
                tally = ray.get(ref)
            except RayActorError as exc:
                log.warning(
                    "engine %d died while coding shard %s (%s); starting a new one",
                    idx,
                    shard.shard_id,
                    type(exc).__name__,
                )
                # The new engine takes shards only once it has loaded; meanwhile the
                # lost shard goes to an engine still alive. So an engine that cannot
                # come back (its node gone for good) costs no shard an attempt, and
                # shards_retried counts exactly the shards lost in flight.
                actors[idx] = _start_engine(prep, ctx, idx, skip_ref)
                starting[actors[idx].ready.remote()] = idx
                _retry(queue, attempt, shard, tries, cfg.max_shard_attempts)
                continue
            except (RayTaskError, GetTimeoutError) as exc:
                log.warning(
                    "shard %s (%s, row groups %d-%d) failed on attempt %d: %s",
                    shard.shard_id,
                    shard.file_uri,
                    shard.row_groups[0],
                    shard.row_groups[-1],
                    tries,
                    _cause(exc),
                )
                _retry(queue, attempt, shard, tries, cfg.max_shard_attempts)
                idle.append(idx)
                continue
            idle.append(idx)
            tallies.append(tally)
            attempt.coded += 1
            progress.shard_done(tally)
    progress.close()
    return tallies


def _replacement_started(ref: Any, idx: int, idle: list[int]) -> None:
    """Put a replacement engine to work once it has loaded, or leave its slot empty."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        ray.get(ref)
    except (RayActorError, RayTaskError) as exc:
        log.error(
            "replacement engine %d failed to start (%s); coding on without it",
            idx,
            _cause(exc),
        )
        return
    log.info("replacement engine %d is ready", idx)
    idle.append(idx)


def _no_engine_left(queue: deque, attempt: _Attempt) -> None:
    """Every engine died and none came back: what is left cannot be coded now."""
    left = [shard.shard_id for shard, _, _ in queue]
    log.error("no engine left to code %d shards; giving up on them", len(left))
    attempt.failed.extend(left)
    queue.clear()


def _retry(
    queue: deque, attempt: _Attempt, shard: Shard, tries: int, limit: int
) -> None:
    if tries >= limit:
        log.error("shard %s failed %d times; giving up on it", shard.shard_id, tries)
        attempt.failed.append(shard.shard_id)
        return
    attempt.retried += 1
    delay = min(RETRY_BACKOFF_CAP, 2.0**tries)
    queue.append((shard, tries + 1, time.time() + delay))


def _cause(exc: Exception) -> str:
    # RayTaskError wraps the remote exception; its type and our own messages are
    # PHI-free, but a third-party message might quote input, so only notecoder's
    # errors are shown in full.
    cause = getattr(exc, "cause", None) or exc
    from notecoder.errors import NotecoderError

    if isinstance(cause, NotecoderError):
        return str(cause)
    return type(cause).__name__


def _wait_ready(actors: list[Any], timeout: float) -> None:
    """Wait until every engine has loaded; fail clearly if one cannot.

    An engine that cannot be placed (more engines than the cluster has CPUs or GPUs
    for) never fails by itself: it waits for resources. The wait is bounded, and said
    out loud every minute, so a misconfigured night pages someone instead of idling.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = {actor.ready.remote(): i for i, actor in enumerate(actors)}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = sorted(pending.values())
            raise ModelError(
                f"{len(waiting)} of {len(actors)} engines did not start within "
                f"{timeout:.0f} s (engines {waiting}): the cluster may lack the CPUs "
                f"or GPUs for them (it has {_resources_text()}); lower "
                "engine.engines or raise engine.start_timeout_seconds"
            )
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(60.0, left))
        if not done:
            log.info(
                "waiting for %d of %d engines to start (%.0f s left)",
                len(pending),
                len(actors),
                left,
            )
            continue
        i = pending.pop(done[0])
        try:
            ray.get(done[0])
        except (RayActorError, RayTaskError) as exc:
            raise ModelError(
                f"engine {i} failed to start ({_cause(exc)}): check --model, "
                "model.max_model_len and engine.extra_args; the engine's log above "
                "says more"
            ) from None


def _check_room(cfg: JobConfig, device: str, engines: int) -> None:
    """Fail at once when a machine's own cluster cannot hold the engines asked for.

    Only for a local cluster that this process started: there is no autoscaler to add
    room, so engines that do not fit would wait for ever. On a real cluster, nodes may
    still join; _wait_ready's time limit covers that case.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    kind, per = ("GPU", cfg.engine.gpus_per_engine)
    if device == "cpu":
        kind, per = ("CPU", cfg.engine.cpus_per_engine)
    have = ray.cluster_resources().get(kind, 0)
    if engines * per > have:
        raise ConfigError(
            f"{engines} engines x {per} {kind} need {engines * per:g} {kind}s, and "
            f"this machine's Ray has {have:g}: lower engine.engines (--engines) or "
            f"engine.{'cpus' if kind == 'CPU' else 'gpus'}_per_engine"
        )


def _resources_text() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs"


class _Progress:
    """A bar on a terminal, a log line per shard otherwise."""

    def __init__(self, shards: int, rows: int):
        self.shards = shards
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=rows, unit="note", desc="coding", file=sys.stderr)

    def shard_done(self, t: ShardTally) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(t.rows)
        log.info(
            "shard %s committed: %d rows, %d tokens, %.1f s (%d/%d)",
            t.shard_id,
            t.rows,
            t.prompt_tokens + t.completion_tokens,
            t.wall_seconds,
            self.done,
            self.shards,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
