"""``notecoder report``: where a run stands and what it cost, from its output alone.

Everything comes from the output folder: ``_notecoder/run.json`` (the plan's shard
count, the attempts and their times, the prices the run was configured with) and the
commit markers (one :class:`ShardTally` per committed shard). So a report works on a
finished run, on one still running (its current attempt is timed up to now), and on
one whose driver was killed. Figures are summed by :func:`notecoder.tally.summarise`,
as the runner sums them, so a finished run's report agrees with its summary.json,
except that the report also counts the time of attempts whose driver was killed,
which summary.json leaves out.

Time per attempt: an ended attempt's wall and accelerator seconds are as recorded; the
last attempt, while still ``running``, counts from its start to now; an attempt whose
driver was killed recorded no end, so its time is taken from its start to the last
shard it committed (a lower bound: what it spent on shards it never finished is lost).
A killed driver leaves its attempt marked ``running`` until the next run starts, so a
dead run reports as running, with a growing elapsed time, until then.

The picture shows cumulative notes and tokens over time, from the shards'
``finished_at``; with ``--history``, the run ledger's trend of cost, throughput and F1
(see :mod:`notecoder.ledger`). It is a PNG, or a self-contained HTML page with the PNG
inline, which needs nothing from the network to show.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from notecoder.commit import OutputLayout
from notecoder.config import CostConfig
from notecoder.errors import NotecoderError
from notecoder.storage import Storage
from notecoder.tally import RunSummary, ShardTally, format_summary, summarise

SLOWEST_SHOWN = 5
# Chart time in seconds up to this many seconds, then minutes, then hours.
SECONDS_AXIS_LIMIT = 180.0
MINUTES_AXIS_LIMIT = 3 * 3600.0


class ReportError(NotecoderError):
    """The output holds no notecoder run to report on."""


@dataclass
class AttemptView:
    """One attempt of the run (one `notecoder run` invocation) and its time."""

    number: int
    started_at: str
    status: str
    wall_seconds: float
    accelerator_seconds: float
    engines: int
    accelerators_per_engine: int
    timing: str  # "recorded", "elapsed so far" or "to its last shard"
    startup_seconds: float | None  # from its start to its first shard's start
    shards_coded: int | None
    shards_retried: int
    shards_failed: int


@dataclass
class ShardView:
    """One committed shard, for the slowest and retried lists."""

    shard_id: str
    file_uri: str
    rows: int
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    attempt: int
    worker: str

    @classmethod
    def of(cls, t: ShardTally) -> ShardView:
        tokens = t.prompt_tokens + t.completion_tokens
        rate = tokens / t.wall_seconds if t.wall_seconds else 0.0
        return cls(
            t.shard_id,
            t.file_uri,
            t.rows,
            tokens,
            t.wall_seconds,
            rate,
            t.attempt,
            t.worker,
        )


@dataclass
class TimePoint:
    """Totals committed by ``seconds`` after the run's first start."""

    seconds: float
    rows: int
    tokens: int


@dataclass
class RunReport:
    """A run's progress, totals, cost, slow and retried shards, and timeline."""

    output_uri: str
    run_id: str
    model_label: str
    input_uri: str
    created_at: str
    ended_at: str | None
    state: str
    shards_planned: int
    shards_committed: int
    rows_planned: int
    rows_done: int
    eta_seconds: float | None
    summary: RunSummary
    attempts: list[AttemptView]
    slowest: list[ShardView]
    retried: list[ShardView]
    timeline: list[TimePoint]
    started_epoch: float
    generated_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and numbers, for ``--json``."""
        data = asdict(self)
        data["summary"] = self.summary.to_dict()
        return data


# -- building -------------------------------------------------------------------------


def build_report(
    storage: Storage, output_uri: str, *, now: float | None = None
) -> RunReport:
    """Read a run's output and report on it; raises ReportError when there is none."""
    layout = OutputLayout(storage, output_uri)
    manifest = layout.read_json(layout.run_file)
    if manifest is None:
        raise ReportError(
            f"{output_uri} holds no notecoder run (no _notecoder/run.json): give the "
            "--output of a run"
        )
    now = time.time() if now is None else now
    tallies = sorted(layout.committed().values(), key=lambda t: t.finished_at)
    attempts = _attempts(manifest, tallies, now)
    summary = _summarise(manifest, tallies, attempts)
    started = _epoch(manifest["attempts"][0]["started_at"]) if attempts else now
    return RunReport(
        output_uri=output_uri,
        run_id=manifest["run_id"],
        model_label=manifest.get("model", {}).get("label", ""),
        input_uri=manifest.get("input", {}).get("uri", ""),
        created_at=manifest.get("created_at", ""),
        ended_at=manifest.get("ended_at"),
        state=_state(manifest),
        shards_planned=summary.shards_total,
        shards_committed=summary.shards_committed,
        rows_planned=manifest.get("input", {}).get("rows", 0),
        rows_done=summary.rows + summary.rows_skipped,
        eta_seconds=_eta(manifest, tallies, attempts),
        summary=summary,
        attempts=attempts,
        slowest=[
            ShardView.of(t)
            for t in sorted(tallies, key=lambda t: -t.wall_seconds)[:SLOWEST_SHOWN]
        ],
        retried=[ShardView.of(t) for t in tallies if t.attempt > 1],
        timeline=_timeline(tallies, started, now if _running(attempts) else None),
        started_epoch=started,
    )


def _state(manifest: dict[str, Any]) -> str:
    if manifest.get("ended_at"):
        return "finished"
    attempts = manifest.get("attempts") or []
    return attempts[-1].get("status", "unknown") if attempts else "not started"


def _summarise(
    manifest: dict[str, Any], tallies: list[ShardTally], attempts: list[AttemptView]
) -> RunSummary:
    last_failed = attempts[-1].shards_failed if attempts else 0
    return summarise(
        manifest["run_id"],
        tallies,
        shards_total=manifest.get("input", {}).get("shards", len(tallies)),
        shards_failed=last_failed,
        shards_retried=sum(a.shards_retried for a in attempts),
        wall_seconds=sum(a.wall_seconds for a in attempts),
        accelerator_seconds=sum(a.accelerator_seconds for a in attempts),
        engines=max((a.engines for a in attempts), default=0),
        accelerators_per_engine=max(
            (a.accelerators_per_engine for a in attempts), default=1
        ),
        cost=_cost(manifest),
    )


def _cost(manifest: dict[str, Any]) -> CostConfig:
    # The prices the run was configured with; keys another notecoder version wrote
    # and this one does not know are left out rather than refused.
    recorded = manifest.get("config", {}).get("cost", {})
    known = {k: v for k, v in recorded.items() if k in CostConfig.model_fields}
    return CostConfig.model_validate(known)


def _attempts(
    manifest: dict[str, Any], tallies: list[ShardTally], now: float
) -> list[AttemptView]:
    raw = manifest.get("attempts") or []
    starts = [_epoch(a["started_at"]) for a in raw] + [float("inf")]
    per = _accelerators_per_engine(manifest)
    views = []
    for i, a in enumerate(raw):
        last = i == len(raw) - 1
        view = _attempt(i + 1, a, (starts[i], starts[i + 1]), last, tallies, now, per)
        views.append(view)
    return views


def _accelerators_per_engine(manifest: dict[str, Any]) -> int:
    """For attempts that recorded none: as an ended attempt recorded, else as set."""
    for a in reversed(manifest.get("attempts") or []):
        if "accelerators_per_engine" in a:
            return a["accelerators_per_engine"]
    engine = manifest.get("config", {}).get("engine", {})
    return 1 if engine.get("device") == "cpu" else engine.get("gpus_per_engine", 1)


def _attempt(
    number: int,
    a: dict[str, Any],
    span: tuple[float, float],
    last: bool,
    tallies: list[ShardTally],
    now: float,
    per_engine: int,
) -> AttemptView:
    start, next_start = span
    own = [t for t in tallies if start <= t.finished_at < next_start]
    if "wall_seconds" in a:
        wall, timing = a["wall_seconds"], "recorded"
        engines, per = a.get("engines", 1), a.get("accelerators_per_engine", 1)
        accel = a.get("accelerator_seconds", wall * engines * per)
    else:
        if last and a.get("status") == "running":
            wall, timing = max(0.0, now - start), "elapsed so far"
        else:
            wall = max((t.finished_at for t in own), default=start) - start
            timing = "to its last shard"
        # Not recorded until the attempt ends: the engines seen at work are the best
        # count there is (at least one was held).
        engines, per = max(1, len({t.worker for t in own})), per_engine
        accel = wall * engines * per
    return AttemptView(
        number=number,
        started_at=a.get("started_at", ""),
        status=a.get("status", "unknown"),
        wall_seconds=wall,
        accelerator_seconds=accel,
        engines=engines,
        accelerators_per_engine=per,
        timing=timing,
        startup_seconds=_startup(own, start),
        shards_coded=a.get("shards_coded", len(own)),
        shards_retried=a.get("shards_retried", 0),
        shards_failed=len(a.get("shards_failed", [])),
    )


def _startup(own: list[ShardTally], start: float) -> float | None:
    """Seconds from an attempt's start to its first shard's (engines starting)."""
    if not own:
        return None
    return max(0.0, min(t.started_at for t in own) - start)


def _eta(
    manifest: dict[str, Any], tallies: list[ShardTally], attempts: list[AttemptView]
) -> float | None:
    """Seconds left at the current attempt's pace, while it is running."""
    if not _running(attempts):
        return None
    current = attempts[-1]
    start = _epoch(current.started_at)
    done_now = sum(t.rows + t.skipped for t in tallies if t.finished_at >= start)
    done = sum(t.rows + t.skipped for t in tallies)
    left = manifest.get("input", {}).get("rows", 0) - done
    if done_now <= 0 or current.wall_seconds <= 0:
        return None
    return max(0.0, left) * current.wall_seconds / done_now


def _timeline(
    tallies: list[ShardTally], started: float, now: float | None
) -> list[TimePoint]:
    """Totals after each commit; with ``now`` (a run going on), the totals so far."""
    points = [TimePoint(0.0, 0, 0)]
    rows = tokens = 0
    for t in tallies:
        rows += t.rows
        tokens += t.prompt_tokens + t.completion_tokens
        points.append(TimePoint(max(0.0, t.finished_at - started), rows, tokens))
    if now is not None:
        points.append(TimePoint(max(points[-1].seconds, now - started), rows, tokens))
    return points


def _running(attempts: list[AttemptView]) -> bool:
    return bool(attempts) and attempts[-1].timing == "elapsed so far"


def _epoch(iso: str) -> float:
    stamp = datetime.fromisoformat(iso)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


# -- terminal and JSON ----------------------------------------------------------------


def format_run_report(r: RunReport) -> str:
    """The report as terminal text: state and progress, the summary, shards."""
    share = r.shards_committed / r.shards_planned if r.shards_planned else 0.0
    head = [
        (
            "state",
            r.state
            + (
                f", about {_duration(r.eta_seconds)} left"
                if r.eta_seconds is not None
                else ""
            ),
        ),
        ("output", r.output_uri),
        ("model", r.model_label),
        (
            "progress",
            f"{r.shards_committed:,} of {r.shards_planned:,} shards ({share:.0%}), "
            f"{r.rows_done:,} of {r.rows_planned:,} notes",
        ),
    ]
    width = max(len("hosted API baseline"), *(len(k) for k, _ in head))
    lines = [f"{k.ljust(width)}  {v}" for k, v in head]
    lines.append(format_summary(r.summary))
    lines += ["", *_attempt_lines(r.attempts), "", *_shard_lines(r)]
    return "\n".join(lines)


def _attempt_lines(attempts: list[AttemptView]) -> list[str]:
    lines = [
        "attempts",
        f"  {'#':>2}  {'started (UTC)':<25}  {'status':<11}  {'wall s':>8}  "
        f"{'start-up s':>10}  {'coded':>5}  {'retried':>7}  {'failed':>6}  time",
    ]
    for a in attempts:
        coded = "-" if a.shards_coded is None else f"{a.shards_coded:,}"
        startup = "-" if a.startup_seconds is None else f"{a.startup_seconds:,.1f}"
        lines.append(
            f"  {a.number:>2}  {a.started_at:<25}  {a.status:<11}  "
            f"{a.wall_seconds:>8,.1f}  {startup:>10}  {coded:>5}  "
            f"{a.shards_retried:>7,}  {a.shards_failed:>6,}  {a.timing}"
        )
    return lines


def _shard_lines(r: RunReport) -> list[str]:
    lines = [f"slowest shards (of {r.shards_committed:,} committed)"]
    lines += _shard_table(r.slowest)
    if r.retried:
        lines += ["", f"shards committed after a retry: {len(r.retried):,}"]
        lines += _shard_table(r.retried)
    else:
        lines += ["", "shards committed after a retry: none"]
    return lines


def _shard_table(shards: list[ShardView]) -> list[str]:
    lines = [
        f"  {'shard':<16}  {'notes':>6}  {'tokens':>8}  {'wall s':>8}  "
        f"{'tokens/s':>9}  {'try':>3}  worker"
    ]
    lines += [
        f"  {s.shard_id:<16}  {s.rows:>6,}  {s.tokens:>8,}  {s.wall_seconds:>8,.1f}  "
        f"{s.tokens_per_second:>9,.1f}  {s.attempt:>3}  {s.worker}"
        for s in shards
    ]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def report_json(report: RunReport | None, history: list[dict[str, Any]] | None) -> str:
    """``{"run": ..., "history": [...]}`` as indented JSON (times as ISO text)."""
    data = {
        "run": report.to_dict() if report else None,
        "history": history,
    }
    return json.dumps(data, indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# -- the picture ----------------------------------------------------------------------


def render_png(report: RunReport | None, history: list[dict[str, Any]] | None) -> bytes:
    """The run's timeline and/or the ledger's trend, as PNG bytes."""
    from matplotlib.figure import Figure

    rows = int(report is not None) + int(bool(history))
    fig = Figure(figsize=(12, 4.2 * rows), dpi=100, layout="constrained")
    grid = fig.add_gridspec(rows, 6)
    row = 0
    if report is not None:
        _draw_run(fig, grid, row, report)
        row += 1
    if history:
        _draw_history(fig, grid, row, history)
    buf = io.BytesIO()
    # No "Software" text chunk: the page and file carry nothing but the picture.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _draw_run(fig: Any, grid: Any, row: int, r: RunReport) -> None:
    scale, unit = _time_scale(r.timeline[-1].seconds if r.timeline else 0.0)
    xs = [p.seconds / scale for p in r.timeline]
    notes_ax = fig.add_subplot(grid[row, :3])
    notes_ax.step(xs, [p.rows for p in r.timeline], where="post", marker="o", ms=3)
    notes_ax.set_ylabel("notes committed")
    notes_ax.axhline(r.rows_planned, color="grey", ls="--", lw=1)
    notes_ax.annotate(
        f"planned {r.rows_planned:,}",
        (1, r.rows_planned),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 3),
        textcoords="offset points",
        ha="right",
        va="bottom",
        color="grey",
        fontsize=9,
    )
    notes_ax.set_title(
        f"notes coded: run {r.run_id} ({r.state}, "
        f"{r.shards_committed}/{r.shards_planned} shards)",
        fontsize=10,
    )
    tokens_ax = fig.add_subplot(grid[row, 3:])
    tokens_ax.step(
        xs, [p.tokens for p in r.timeline], where="post", marker="o", ms=3, color="C1"
    )
    tokens_ax.set_ylabel("tokens committed")
    tokens_ax.set_title(
        f"tokens (prompt + completion): {r.summary.total_tokens:,}, "
        f"${r.summary.usd_per_1k_tokens:.6f} per 1K",
        fontsize=10,
    )
    # Head room above the planned line, for the legend.
    top = max(r.rows_planned, r.timeline[-1].rows if r.timeline else 0, 1)
    notes_ax.set_ylim(0, top * 1.15)
    tokens_ax.set_ylim(bottom=0)
    for ax in (notes_ax, tokens_ax):
        _mark_attempts(ax, r, scale)
        ax.set_xlabel(f"{unit} since the run started")
        ax.set_xlim(left=0)
        ax.yaxis.set_major_formatter(_thousands())
        ax.grid(alpha=0.3)


def _mark_attempts(ax: Any, r: RunReport, scale: float) -> None:
    # Shaded: engines starting, before an attempt's first shard (paid for, no
    # notes). Dotted: where a later attempt resumed the run.
    labels = {"engines starting", "resumed"}
    for i, a in enumerate(r.attempts):
        x = (_epoch(a.started_at) - r.started_epoch) / scale
        if i:
            label = "resumed" if "resumed" in labels else None
            labels.discard("resumed")
            ax.axvline(x, color="grey", ls=":", lw=1, label=label)
        if a.startup_seconds:
            label = "engines starting" if "engines starting" in labels else None
            labels.discard("engines starting")
            width = a.startup_seconds / scale
            ax.axvspan(x, x + width, color="grey", alpha=0.15, lw=0, label=label)
    if len(labels) < 2:
        ax.legend(loc="upper left", fontsize=9, frameon=False)


HISTORY_PANELS = (
    ("usd_per_1k_tokens", "$ per 1K tokens", "C0"),
    ("tokens_per_second", "tokens/s (wall)", "C1"),
    ("code_micro_f1", "F1 (code, micro)", "C2"),
)


def _draw_history(fig: Any, grid: Any, row: int, history: list[dict]) -> None:
    dates = [e["created_at"] for e in history if e.get("created_at")]
    first = None
    for i, (key, title, color) in enumerate(HISTORY_PANELS):
        # One date axis for the three, so a night lines up across them.
        ax = fig.add_subplot(grid[row, 2 * i : 2 * i + 2], sharex=first)
        first = first or ax
        ax.set_title(f"{title}, by run", fontsize=10)
        ax.grid(alpha=0.3)
        points = [
            (e["created_at"], e[key])
            for e in history
            if e.get("created_at") and e.get(key) is not None
        ]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color)
            ax.set_ylim(bottom=0)
            _value_axis(ax, key)
        else:
            _no_data(ax, key)
        if dates:
            _date_axis(ax)
    if dates and first is not None:
        # A lone night, or runs started together, still needs a span of dates.
        pad = max((max(dates) - min(dates)) * 0.05, timedelta(hours=12))
        first.set_xlim(min(dates) - pad, max(dates) + pad)


def _no_data(ax: Any, key: str) -> None:
    hint = "no evaluation recorded:\nnotecoder eval --record"
    text = hint if key == "code_micro_f1" else "no data"
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _date_axis(ax: Any) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _value_axis(ax: Any, key: str) -> None:
    from matplotlib.ticker import ScalarFormatter

    if key == "tokens_per_second":
        ax.yaxis.set_major_formatter(_thousands())
    elif key == "usd_per_1k_tokens":
        # Cents per 1K tokens or far less: a x10^n label reads better than 0.000002.
        dollars = ScalarFormatter(useMathText=True)
        dollars.set_powerlimits((-3, 4))
        ax.yaxis.set_major_formatter(dollars)


def _time_scale(span: float) -> tuple[float, str]:
    if span <= SECONDS_AXIS_LIMIT:
        return 1.0, "seconds"
    if span <= MINUTES_AXIS_LIMIT:
        return 60.0, "minutes"
    return 3600.0, "hours"


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def render_html(report: RunReport | None, history: list[dict[str, Any]] | None) -> str:
    """A self-contained page: the tables and the picture inline (no external URLs)."""
    png = base64.b64encode(render_png(report, history)).decode("ascii")
    title = f"notecoder report: {report.run_id}" if report else "notecoder run ledger"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<img alt="notes and tokens over time" src="data:image/png;base64,{png}">',
    ]
    if report is not None:
        parts.append(f"<pre>{html.escape(format_run_report(report))}</pre>")
    if history:
        from notecoder.ledger import format_history

        parts.append(f"<pre>{html.escape(format_history(history))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "img{max-width:100%;border:1px solid #ddd}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:13px}"
)
