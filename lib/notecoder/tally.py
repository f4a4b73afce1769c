"""Counters with units: per shard, summed per run, priced in dollars.

A :class:`ShardTally` travels inside each shard's commit marker, so a run's totals can
always be rebuilt from the output alone (after a crash, or by ``notecoder report``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from notecoder.config import CostConfig
from notecoder.results import STATUSES


@dataclass
class ShardTally:
    """What coding one shard took and produced."""

    shard_id: str
    file_uri: str
    rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_notes: int = 0
    skipped: int = 0  # rows left out because an earlier run coded them
    read_seconds: float = 0.0
    engine_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    attempt: int = 1
    worker: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardTally:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class RunSummary:
    """A run's totals and what they cost."""

    run_id: str
    shards_total: int
    shards_committed: int
    shards_failed: int
    shards_retried: int
    rows: int
    statuses: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    truncated_notes: int
    wall_seconds: float
    engine_seconds: float
    engines: int
    accelerators_per_engine: int
    accelerator_hours: float
    notes_per_second: float
    tokens_per_second: float
    engine_tokens_per_second: float
    usd: float
    usd_per_1k_tokens: float
    usd_per_1k_notes: float
    baseline_usd: float
    baseline_usd_per_1k_tokens: float
    baseline_usd_per_1k_notes: float
    rows_skipped: int = 0  # coded by earlier runs (--skip-coded), so not in parts

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_tokens"] = self.total_tokens
        return data


def summarise(
    run_id: str,
    tallies: list[ShardTally],
    *,
    shards_total: int,
    shards_failed: int,
    shards_retried: int,
    wall_seconds: float,
    accelerator_seconds: float,
    engines: int,
    accelerators_per_engine: int,
    cost: CostConfig,
) -> RunSummary:
    """Sum shard tallies and price them.

    ``wall_seconds`` is the time the engines were held (summed over resumed attempts)
    and ``accelerator_seconds`` that time multiplied by the accelerators held: what a
    team pays for, whether the engines were busy or waiting.
    """
    statuses = {s: 0 for s in STATUSES}
    for t in tallies:
        for status, n in t.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    rows = sum(t.rows for t in tallies)
    prompt = sum(t.prompt_tokens for t in tallies)
    completion = sum(t.completion_tokens for t in tallies)
    tokens = prompt + completion
    engine_seconds = sum(t.engine_seconds for t in tallies)
    hours = accelerator_seconds / 3600.0
    usd = hours * cost.usd_per_accelerator_hour
    generated = rows - statuses.get("empty_note", 0)
    baseline = (
        (prompt + cost.baseline_few_shot_tokens * generated)
        * cost.baseline_usd_per_1k_input_tokens
        + completion * cost.baseline_usd_per_1k_output_tokens
    ) / 1000.0
    return RunSummary(
        run_id=run_id,
        shards_total=shards_total,
        shards_committed=len(tallies),
        shards_failed=shards_failed,
        shards_retried=shards_retried,
        rows=rows,
        statuses=statuses,
        prompt_tokens=prompt,
        completion_tokens=completion,
        truncated_notes=sum(t.truncated_notes for t in tallies),
        wall_seconds=wall_seconds,
        engine_seconds=engine_seconds,
        engines=engines,
        accelerators_per_engine=accelerators_per_engine,
        accelerator_hours=hours,
        notes_per_second=_per(rows, wall_seconds),
        tokens_per_second=_per(tokens, wall_seconds),
        engine_tokens_per_second=_per(tokens, engine_seconds),
        usd=usd,
        usd_per_1k_tokens=_per(usd * 1000, tokens),
        usd_per_1k_notes=_per(usd * 1000, rows),
        baseline_usd=baseline,
        baseline_usd_per_1k_tokens=_per(baseline * 1000, tokens),
        baseline_usd_per_1k_notes=_per(baseline * 1000, rows),
        rows_skipped=sum(t.skipped for t in tallies),
    )


def _per(amount: float, base: float) -> float:
    return amount / base if base else 0.0


def format_summary(s: RunSummary) -> str:
    """The run summary as a terminal table."""
    status_text = ", ".join(f"{k} {v:,}" for k, v in s.statuses.items() if v)
    lines = [
        ("run", s.run_id),
        (
            "shards",
            f"{s.shards_committed:,} of {s.shards_total:,} committed, "
            f"{s.shards_failed:,} failed, {s.shards_retried:,} retried",
        ),
        ("notes", f"{s.rows:,} ({status_text or 'none'})"),
        ("notes cut to fit", f"{s.truncated_notes:,}"),
        ("notes coded before", f"{s.rows_skipped:,} skipped"),
        (
            "tokens",
            f"{s.total_tokens:,} ({s.prompt_tokens:,} prompt + "
            f"{s.completion_tokens:,} completion)",
        ),
        ("wall time", f"{s.wall_seconds:,.1f} s on {s.engines} engine(s)"),
        ("engine time", f"{s.engine_seconds:,.1f} s generating"),
        (
            "throughput",
            f"{s.notes_per_second:,.2f} notes/s, {s.tokens_per_second:,.1f} tokens/s "
            f"({s.engine_tokens_per_second:,.1f} tokens/s while generating)",
        ),
        ("accelerator-hours", f"{s.accelerator_hours:,.4f}"),
        *cost_lines(s, total_digits=4),
    ]
    return key_value_table(lines)


def cost_lines(priced: Any, total_digits: int) -> list[tuple[str, str]]:
    """The "cost" and "hosted API baseline" rows of anything priced like a run (a
    RunSummary, or a plan's estimate), from its usd and baseline_usd fields."""
    p, d = priced, total_digits
    return [
        (
            "cost",
            f"${p.usd:,.{d}f}: ${p.usd_per_1k_tokens:,.6f} per 1K tokens, "
            f"${p.usd_per_1k_notes:,.4f} per 1K notes",
        ),
        (
            "hosted API baseline",
            f"${p.baseline_usd:,.{d}f}: ${p.baseline_usd_per_1k_tokens:,.6f} per 1K "
            f"tokens, ${p.baseline_usd_per_1k_notes:,.4f} per 1K notes",
        ),
    ]


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """Rows of (label, text), the labels padded to one width."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
