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
from notecoder.engine import common_engine_env, cpu_engine_env
from notecoder.errors import ModelError, OutputMismatchError, ShardsFailedError
from notecoder.modelref import ModelRef, resolve_model
from notecoder.plan import Plan, Shard, plan_archive
from notecoder.storage import S3Settings, Storage
from notecoder.tally import RunSummary, ShardTally, format_summary, summarise

log = logging.getLogger(__name__)

# Seconds before a failed shard is tried again: 2, 4, 8 ... capped.
RETRY_BACKOFF_CAP = 30.0


def s3_settings(cfg: JobConfig) -> S3Settings:
    return S3Settings(cfg.s3.endpoint_url, cfg.s3.region, cfg.s3.addressing_style)


def settings_of(cfg: JobConfig, model: ModelRef, plan: Plan) -> dict[str, Any]:
    """What must be equal for two attempts to write into the same output."""
    return {
        "model.content_hash": model.content_hash,
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

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.plan.shards if s.shard_id not in self.committed]


def prepare(cfg: JobConfig) -> Prepared:
    """Plan the input and open (or start) the run in the output; no engine starts.

    Raises PlanError, ModelError or OutputMismatchError with a message that says what
    to change.
    """
    cfg.require_paths()
    storage = Storage(s3_settings(cfg))
    plan = plan_archive(storage, cfg.input, cfg.shard_rows)
    model = resolve_model(storage, cfg.model.path)
    layout = OutputLayout(storage, cfg.output.uri)
    settings = settings_of(cfg, model, plan)
    manifest = layout.read_json(layout.run_file)
    if manifest is not None:
        diffs = _differences(manifest.get("settings", {}), settings)
        if diffs:
            raise OutputMismatchError(
                f"output {cfg.output.uri} holds run {manifest.get('run_id')} made with "
                "other settings; refusing to mix them:\n  "
                + "\n  ".join(diffs)
                + "\nwrite to a new --output, or restore the settings to resume"
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
            },
            "code_set": codes.EDITION,
            "input": {
                "uri": cfg.input.uri,
                "fingerprint": plan.fingerprint,
                "files": len(plan.files),
                "rows": plan.total_rows,
                "shards": len(plan.shards),
            },
            "config": cfg.model_dump(mode="json"),
            "attempts": [],
        }
    committed = {
        k: v
        for k, v in layout.committed().items()
        if k in {s.shard_id for s in plan.shards}
    }
    return Prepared(cfg, storage, layout, plan, model, manifest, committed)


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


def run_job(cfg: JobConfig, *, echo: Any = print) -> RunSummary:
    """Run (or resume) a job end to end and return its summary.

    Raises ShardsFailedError, after committing every shard that could be, when some
    shard failed on all its attempts.
    """
    prep = prepare(cfg)
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
    prep.manifest["attempts"].append({"started_at": _now(), "status": "running"})
    prep.layout.write_json(prep.layout.run_file, prep.manifest)
    try:
        tallies = _code_shards(prep, pending, attempt)
    finally:
        _shutdown_engines()
    committed = dict(prep.committed)
    committed.update({t.shard_id: t for t in tallies})
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
        prep.layout.write_json(prep.layout.run_file, prep.manifest)
        prep.layout.write_json(prep.layout.summary_file, summary.to_dict())
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
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=True,
    )


def _shutdown_engines() -> None:
    import ray

    for actor in _ENGINES:
        # An actor that already died needs no killing.
        with contextlib.suppress(Exception):
            ray.kill(actor)
    _ENGINES.clear()


_ENGINES: list[Any] = []


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
        return max(1, int(res.get("GPU", 0)) // cfg.engine.gpus_per_engine)
    return max(1, int(res.get("CPU", 1)) // cfg.engine.cpus_per_engine)


def _start_engine(prep: Prepared, ctx: RunContext, index: int) -> Any:
    cfg = prep.cfg
    env = common_engine_env()
    if ctx.device == "cpu":
        env.update(cpu_engine_env(cfg, index, None))
        options = {"num_cpus": cfg.engine.cpus_per_engine}
    else:
        options = {"num_gpus": cfg.engine.gpus_per_engine, "num_cpus": 1}
    actor_cls = coder_actor_class()
    actor = actor_cls.options(
        runtime_env={"env_vars": env}, max_restarts=0, max_concurrency=1, **options
    ).remote(cfg, ctx)
    _ENGINES.append(actor)
    return actor


def _code_shards(
    prep: Prepared, shards: list[Shard], attempt: _Attempt
) -> list[ShardTally]:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    ensure_ray()
    cfg = prep.cfg
    device = _device(cfg)
    n = min(_engine_count(cfg, device), len(shards))
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
    )
    log.info("starting %d %s engine(s)", n, device)
    actors = [_start_engine(prep, ctx, i) for i in range(n)]
    _wait_ready(actors)
    progress = _Progress(len(shards), sum(s.num_rows for s in shards))
    queue: deque[tuple[Shard, int, float]] = deque((s, 1, 0.0) for s in shards)
    inflight: dict[Any, tuple[int, Shard, int]] = {}
    idle = list(range(n))
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
        if not inflight:
            time.sleep(0.2)
            continue
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in done:
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
                actors[idx] = _start_engine(prep, ctx, idx)
                _retry(queue, attempt, shard, tries, cfg.max_shard_attempts)
                idle.append(idx)
                continue
            except (RayTaskError, GetTimeoutError) as exc:
                log.warning(
                    "shard %s failed on attempt %d: %s",
                    shard.shard_id,
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


def _wait_ready(actors: list[Any]) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    for i, actor in enumerate(actors):
        try:
            ray.get(actor.ready.remote())
        except (RayActorError, RayTaskError) as exc:
            raise ModelError(
                f"engine {i} failed to start ({_cause(exc)}): check --model, "
                "model.max_model_len and engine.extra_args; the engine's log above "
                "says more"
            ) from None


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
