"""``notecoder plan``: what a run will cost, known before any engine starts.

The estimate has three parts, each said with where it came from:

- **Notes and files** come from the plan (:func:`notecoder.plan.plan_archive`, Parquet
  footers only). With ``--output`` pointing at a run of the same input, shards already
  committed there are left out: the plan prices what a rerun would still code.
- **Prompt tokens** come from a sample of notes rendered exactly as the engines render
  them (:class:`notecoder.prompts.PromptBuilder`: the model's own tokenizer and chat
  template, cut to ``max_model_len - max_tokens``). The sample is whole row groups
  spread evenly over the archive in file order, of which only the text column is read,
  and a few notes evenly spaced inside each. Its mean per note, times the notes to
  code, is the projection; the margin is 1.96 standard errors of that mean. Notes in
  one row group tend to resemble each other, so the true uncertainty is somewhat
  larger than that margin says.
- **Completion tokens and throughput** come from the last run in ``--output`` when it
  has a ``summary.json`` (its mean completion per coded note, and its tokens per second
  per engine, engine start-up included because a night pays for it too); otherwise
  completion is ``sampling.max_tokens`` per note (an upper bound: the model stops
  earlier) and throughput ``--tokens-per-second`` or
  ``cost.planning_tokens_per_second``.
  A ``--tokens-per-second`` given on the command line wins over a measured figure:
  someone who types a number means it.

Dollars come from :func:`notecoder.tally.summarise`, the same function that prices a
finished run, so a plan and the run that follows it are priced alike, hosted-API
baseline included. The plan counts every note of the input: ``--skip-coded`` sets are
not read, so an incremental night is overestimated by the notes they would leave out.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.commit import OutputLayout
from notecoder.config import JobConfig
from notecoder.errors import ConfigError, ModelError, PlanError
from notecoder.plan import FOOTER_THREADS, Plan, plan_archive
from notecoder.prompts import PromptBuilder
from notecoder.storage import S3Settings, Storage, is_s3, relative_to
from notecoder.tally import (
    RunSummary,
    ShardTally,
    cost_lines,
    key_value_table,
    summarise,
)

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_NOTES = 256
# Notes taken from each sampled row group: few enough that the sample spans many
# groups (and so many files and dates), enough that reading a group is not wasted.
NOTES_PER_GROUP = 32
# 95% normal interval for the sample mean.
Z_95 = 1.96
# Far above any note, so the tokenizer never warns that one is long.
LONGEST_NOTE_TOKENS = 1 << 40
# What an S3 model prefix holds besides its tokenizer; none of it is fetched to plan.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".onnx")


@dataclass
class SampleStats:
    """What the tokenized sample was and what it measured."""

    notes: int
    row_groups: int
    files: int
    empty_notes: int
    truncated_notes: int
    failed_notes: int
    prompt_tokens_mean: float
    prompt_tokens_margin: float
    seconds: float


@dataclass
class CostPlan:
    """A run's projected size, time and cost; see the module docstring."""

    input_uri: str
    model_path: str
    files: int
    row_groups: int
    shards: int
    notes: int
    notes_committed: int
    notes_to_code: int
    sample: SampleStats
    prompt_tokens: int
    prompt_tokens_margin: int
    completion_tokens_per_note: float
    completion_source: str
    completion_tokens: int
    total_tokens: int
    tokens_per_second: float
    throughput_source: str
    engines: int | None
    accelerators_per_engine: int
    engine_hours: float
    accelerator_hours: float
    wall_hours: float | None
    usd: float
    usd_per_1k_tokens: float
    usd_per_1k_notes: float
    baseline_usd: float
    baseline_usd_per_1k_tokens: float
    baseline_usd_per_1k_notes: float
    footer_seconds: float
    tokenizer_seconds: float  # loading it, overlapped with reading footers
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and numbers, for ``--json``."""
        return asdict(self)


@dataclass
class _LastRun:
    """What an earlier run in the output measured."""

    completion_per_note: float | None
    tokens_per_second: float | None
    committed: set[str]


def estimate(
    cfg: JobConfig,
    *,
    sample_notes: int = DEFAULT_SAMPLE_NOTES,
    tokens_per_second: float | None = None,
) -> CostPlan:
    """Plan ``cfg``'s input and price it; no engine starts and no weights are read.

    Raises ConfigError when the input or model is missing, PlanError for an unusable
    input, ModelError when the tokenizer cannot be loaded.
    """
    if not cfg.input.uri or not cfg.model.path:
        raise ConfigError("notecoder plan needs --input and --model (or the config's)")
    if sample_notes < 1:
        raise ConfigError(f"--sample must be at least 1, got {sample_notes}")
    started = time.perf_counter()
    storage = Storage(
        S3Settings(cfg.s3.endpoint_url, cfg.s3.region, cfg.s3.addressing_style)
    )
    with ThreadPoolExecutor(1) as loader:
        # Importing transformers is most of a plan's time on local disk, reading
        # footers most of it on S3: the tokenizer loads while the footers are read.
        builder = loader.submit(_prompt_builder, storage, cfg)
        plan = plan_archive(storage, cfg.input, cfg.shard_rows)
        footer_seconds = time.perf_counter() - started
        last = _last_run(storage, cfg.output.uri)
        reading = time.perf_counter()
        picks, notes = _sample_notes(storage, cfg, plan, sample_notes)
        read_seconds = time.perf_counter() - reading
        prompts, tokenizer_seconds = builder.result()
        measuring = time.perf_counter()
        sample = _measure(prompts, picks, notes)
    # Reading and tokenizing the sample, not the wait for the tokenizer to load.
    sample.seconds = read_seconds + time.perf_counter() - measuring
    result = _project(cfg, plan, sample, last, tokens_per_second)
    result.footer_seconds = footer_seconds
    result.tokenizer_seconds = tokenizer_seconds
    result.seconds = time.perf_counter() - started
    log.info(
        "plan: %d notes in %d files, sample of %d notes, %.1f s",
        result.notes,
        result.files,
        sample.notes,
        result.seconds,
    )
    return result


# -- the last run ---------------------------------------------------------------------


def _last_run(storage: Storage, output_uri: str | None) -> _LastRun:
    if not output_uri:
        return _LastRun(None, None, set())
    layout = OutputLayout(storage, output_uri)
    committed = set(layout.committed()) if storage.exists(layout.run_file) else set()
    summary = layout.read_json(layout.summary_file)
    if not summary:
        return _LastRun(None, None, committed)
    statuses = summary.get("statuses", {})
    generated = summary.get("rows", 0) - statuses.get("empty_note", 0)
    tokens = summary.get("prompt_tokens", 0) + summary.get("completion_tokens", 0)
    # Engine-seconds held, start-up and idle included: what the night paid for.
    held = summary.get("wall_seconds", 0.0) * max(1, summary.get("engines", 1))
    return _LastRun(
        summary["completion_tokens"] / generated if generated > 0 else None,
        tokens / held if tokens and held else None,
        committed,
    )


# -- the sample -----------------------------------------------------------------------


_Pick = tuple[str, int, int]  # file, row group, notes to take from it


def _sample_notes(
    storage: Storage, cfg: JobConfig, plan: Plan, wanted: int
) -> tuple[list[_Pick], list[str | None]]:
    picks = _pick_groups(plan, wanted)
    column = cfg.input.text_column
    with ThreadPoolExecutor(max(1, min(FOOTER_THREADS, len(picks)))) as pool:
        texts = list(pool.map(lambda p: _read_texts(storage, *p, column), picks))
    return picks, [t for chunk in texts for t in chunk]


def _measure(
    builder: PromptBuilder, picks: list[_Pick], notes: list[str | None]
) -> SampleStats:
    counts, empty, cut, failed = [], 0, 0, 0
    for text in notes:
        if text is None or not str(text).strip():
            empty += 1
            counts.append(0)
            continue
        try:
            prompt = builder.build(str(text))
        except Exception:  # as in the coder, one bad note must not stop the rest
            # Counted, never shown: the note is PHI. The engines would mark it error.
            failed += 1
            counts.append(0)
            continue
        cut += prompt.truncated
        counts.append(len(prompt.token_ids))
    return SampleStats(
        notes=len(notes),
        row_groups=len(picks),
        files=len({p[0] for p in picks}),
        empty_notes=empty,
        truncated_notes=cut,
        failed_notes=failed,
        prompt_tokens_mean=statistics.fmean(counts) if counts else 0.0,
        prompt_tokens_margin=_margin(counts),
        seconds=0.0,
    )


def _pick_groups(plan: Plan, wanted: int) -> list[_Pick]:
    """Row groups spread evenly over the input, and how many notes to take from each."""
    groups = [
        (f.entry.uri, i, rows)
        for f in plan.files
        for i, rows in enumerate(f.row_group_rows)
        if rows > 0
    ]
    if not groups:
        return []
    # Small row groups give fewer notes each, so more of them are read, one more at
    # a time until the picks hold the sample asked for (or the groups run out).
    per_group = min(NOTES_PER_GROUP, sum(g[2] for g in groups) / len(groups))
    count = min(len(groups), math.ceil(wanted / per_group))
    while True:
        picks = _spread(groups, count, math.ceil(wanted / count))
        if count == len(groups) or sum(p[2] for p in picks) >= wanted:
            return picks
        count += 1


def _spread(groups: list[_Pick], count: int, take: int) -> list[_Pick]:
    chosen = sorted({int((k + 0.5) * len(groups) / count) for k in range(count)})
    return [(uri, i, min(take, rows)) for uri, i, rows in (groups[k] for k in chosen)]


def _read_texts(
    storage: Storage, uri: str, group: int, take: int, column: str
) -> list[str | None]:
    try:
        with storage.open_input(uri) as handle:
            table = pq.ParquetFile(handle).read_row_group(group, columns=[column])
    except (OSError, pa.ArrowException) as exc:
        raise PlanError(
            f"cannot read row group {group} of {uri} for the token sample "
            f"({type(exc).__name__})"
        ) from None
    rows = table.num_rows
    # Evenly spaced rows: a group is often written in time order, so the first rows
    # alone would sample one hour of one day.
    picked = sorted({int((k + 0.5) * rows / take) for k in range(take)})
    return table.column(column).take(picked).to_pylist()


def _margin(counts: list[int]) -> float:
    if len(counts) < 2:
        return 0.0
    return Z_95 * statistics.stdev(counts) / math.sqrt(len(counts))


def _prompt_builder(storage: Storage, cfg: JobConfig) -> tuple[PromptBuilder, float]:
    """The engines' prompt builder, and the seconds it took to load."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(storage, cfg.model.path or "")
    budget = cfg.model.max_model_len - cfg.sampling.max_tokens
    try:
        builder = PromptBuilder(tokenizer, cfg.model.system_prompt, budget)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    return builder, time.perf_counter() - started


def load_tokenizer(storage: Storage, source: str) -> Any:
    """The model's tokenizer, from a folder or an S3 prefix (tokenizer files only)."""
    from transformers import AutoTokenizer

    if not is_s3(source):
        if not Path(source, "config.json").is_file():
            raise ModelError(
                f"model {source} has no config.json: point --model at a folder in "
                "Hugging Face layout"
            )
        return _from_pretrained(AutoTokenizer, source, source)
    with tempfile.TemporaryDirectory(prefix="notecoder-tok-") as tmp:
        _fetch_tokenizer_files(storage, source, Path(tmp))
        return _from_pretrained(AutoTokenizer, tmp, source)


def _from_pretrained(auto: Any, folder: str, source: str) -> Any:
    try:
        tokenizer = auto.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer of model {source} ({type(exc).__name__}): "
            "check that --model holds the tokenizer files"
        ) from None
    # Long notes are measured whole before PromptBuilder cuts them; without this
    # transformers warns about every one that is longer than the model's context.
    tokenizer.model_max_length = LONGEST_NOTE_TOKENS
    return tokenizer


def _fetch_tokenizer_files(storage: Storage, source: str, dest: Path) -> None:
    # Weights can be tens of GB; the tokenizer and configs are a few MB at most.
    entries = [
        e for e in storage.list_files(source) if not e.uri.endswith(WEIGHT_SUFFIXES)
    ]
    if not entries:
        raise ModelError(f"model {source} holds no files: check --model")
    for entry in entries:
        rel = relative_to(entry.uri, source)
        target = dest.joinpath(*rel.split("/"))
        if dest not in target.resolve().parents:
            raise ModelError(f"model {source} names an unsafe path: {rel}")
        storage.download(entry.uri, target)


# -- projection -----------------------------------------------------------------------


@dataclass
class _Tokens:
    """The projected token counts of the notes still to code."""

    committed: int
    to_code: int
    generated: int
    prompt: int
    per_note: float
    completion_source: str
    completion: int


def _project(
    cfg: JobConfig,
    plan: Plan,
    sample: SampleStats,
    last: _LastRun,
    tokens_per_second: float | None,
) -> CostPlan:
    tokens = _tokens(cfg, plan, sample, last)
    tps, tps_source = _throughput(cfg, last, tokens_per_second)
    engine_seconds = (tokens.prompt + tokens.completion) / tps
    priced = _price(cfg, plan, tokens, engine_seconds)
    return CostPlan(
        input_uri=plan.input_uri,
        model_path=cfg.model.path or "",
        files=len(plan.files),
        row_groups=sum(len(f.row_group_rows) for f in plan.files),
        shards=len(plan.shards),
        notes=plan.total_rows,
        notes_committed=tokens.committed,
        notes_to_code=tokens.to_code,
        sample=sample,
        prompt_tokens=tokens.prompt,
        prompt_tokens_margin=round(sample.prompt_tokens_margin * tokens.to_code),
        completion_tokens_per_note=tokens.per_note,
        completion_source=tokens.completion_source,
        completion_tokens=tokens.completion,
        total_tokens=priced.total_tokens,
        tokens_per_second=tps,
        throughput_source=tps_source,
        engines=cfg.engine.engines,
        accelerators_per_engine=priced.accelerators_per_engine,
        engine_hours=engine_seconds / 3600.0,
        accelerator_hours=priced.accelerator_hours,
        wall_hours=priced.wall_seconds / 3600.0 if cfg.engine.engines else None,
        usd=priced.usd,
        usd_per_1k_tokens=priced.usd_per_1k_tokens,
        usd_per_1k_notes=priced.usd_per_1k_notes,
        baseline_usd=priced.baseline_usd,
        baseline_usd_per_1k_tokens=priced.baseline_usd_per_1k_tokens,
        baseline_usd_per_1k_notes=priced.baseline_usd_per_1k_notes,
        footer_seconds=0.0,
        tokenizer_seconds=0.0,
        seconds=0.0,
    )


def _tokens(cfg: JobConfig, plan: Plan, sample: SampleStats, last: _LastRun) -> _Tokens:
    committed = sum(s.num_rows for s in plan.shards if s.shard_id in last.committed)
    to_code = plan.total_rows - committed
    share_empty = sample.empty_notes / sample.notes if sample.notes else 0.0
    generated = round(to_code * (1 - share_empty))
    per_note, source = _completion(cfg, last)
    return _Tokens(
        committed=committed,
        to_code=to_code,
        generated=generated,
        prompt=round(sample.prompt_tokens_mean * to_code),
        per_note=per_note,
        completion_source=source,
        completion=round(per_note * generated),
    )


def _price(
    cfg: JobConfig, plan: Plan, tokens: _Tokens, engine_seconds: float
) -> RunSummary:
    """Price the projection with the function that prices a finished run."""
    per_engine = _accelerators_per_engine(cfg)
    engines = cfg.engine.engines
    tally = ShardTally(
        shard_id="plan",
        file_uri=plan.input_uri,
        rows=tokens.to_code,
        statuses={
            "ok": tokens.generated,
            "empty_note": tokens.to_code - tokens.generated,
        },
        prompt_tokens=tokens.prompt,
        completion_tokens=tokens.completion,
    )
    return summarise(
        "plan",
        [tally],
        shards_total=len(plan.shards),
        shards_failed=0,
        shards_retried=0,
        wall_seconds=engine_seconds / engines if engines else engine_seconds,
        accelerator_seconds=engine_seconds * per_engine,
        engines=engines or 0,
        accelerators_per_engine=per_engine,
        cost=cfg.cost,
    )


def _completion(cfg: JobConfig, last: _LastRun) -> tuple[float, str]:
    if last.completion_per_note is not None:
        return last.completion_per_note, "mean of the last run in --output"
    return float(cfg.sampling.max_tokens), "sampling.max_tokens (an upper bound)"


def _throughput(
    cfg: JobConfig, last: _LastRun, given: float | None
) -> tuple[float, str]:
    if given is not None:
        if given <= 0:
            raise ConfigError(f"--tokens-per-second must be above 0, got {given}")
        return given, "--tokens-per-second"
    if last.tokens_per_second is not None:
        return last.tokens_per_second, "measured by the last run in --output"
    return cfg.cost.planning_tokens_per_second, "cost.planning_tokens_per_second"


def _accelerators_per_engine(cfg: JobConfig) -> int:
    # A CPU engine is priced as one accelerator, as the runner prices it.
    return 1 if cfg.engine.device == "cpu" else cfg.engine.gpus_per_engine


# -- output ---------------------------------------------------------------------------


def format_plan(p: CostPlan) -> str:
    """The plan as a terminal table."""
    s = p.sample
    rows = [
        ("input", p.input_uri),
        ("files", f"{p.files:,} ({p.row_groups:,} row groups, {p.shards:,} shards)"),
        (
            "notes",
            f"{p.notes:,} ({p.notes_committed:,} already committed, "
            f"{p.notes_to_code:,} to code)",
        ),
        (
            "token sample",
            f"{s.notes:,} notes from {s.row_groups:,} row groups in {s.files:,} "
            f"files: {s.empty_notes:,} empty, {s.truncated_notes:,} cut to fit, "
            f"{s.seconds:.1f} s",
        ),
        (
            "prompt tokens",
            f"{p.prompt_tokens:,} ± {p.prompt_tokens_margin:,} "
            f"({s.prompt_tokens_mean:,.1f} per note)",
        ),
        (
            "completion tokens",
            f"{p.completion_tokens:,} ({p.completion_tokens_per_note:,.1f} per coded "
            f"note: {p.completion_source})",
        ),
        ("total tokens", f"{p.total_tokens:,}"),
        (
            "throughput",
            f"{p.tokens_per_second:,.1f} tokens/s per engine ({p.throughput_source})",
        ),
        ("engine-hours", _hours(p)),
        ("accelerator-hours", f"{p.accelerator_hours:,.3f}"),
        *cost_lines(p, total_digits=2),
        (
            "planned in",
            f"{p.seconds:.1f} s: footers {p.footer_seconds:.1f} s, tokenizer load "
            f"{p.tokenizer_seconds:.1f} s (the two in parallel)",
        ),
    ]
    return key_value_table(rows)


def _hours(p: CostPlan) -> str:
    text = f"{p.engine_hours:,.3f}"
    if p.wall_hours is not None:
        text += f" ({p.wall_hours:,.3f} h of wall time on {p.engines} engine(s))"
    return text


def plan_json(p: CostPlan) -> str:
    """The plan as indented JSON."""
    return json.dumps(p.to_dict(), indent=2)
