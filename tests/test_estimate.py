"""`notecoder plan`: the estimate before a run, checked against a real run.

The prompt-token estimate is checked against what the real engine counted on the same
notes; the throughput and completion figures taken from a run's output against that
run's own summary. The rest (pricing arithmetic, sampling spread, errors, help text)
needs no engine.
"""

from __future__ import annotations

import json
import logging
import time

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from notecoder.cli import main
from notecoder.config import load_config
from notecoder.demo import write_sample_archive
from notecoder.errors import ModelError, PlanError
from notecoder.estimate import estimate, format_plan
from notecoder.runner import run_job
from notecoder.storage import Storage

from .conftest import REPO, assert_no_fragments, note_fragments
from .s3server import s3_fixture  # noqa: F401

SMALL_NOTES = 40  # holds the sample archive's empty, blank, null and long notes


def _cfg(archive, model, output=None, **overrides):
    values = {"input.uri": str(archive), "model.path": str(model), **overrides}
    if output is not None:
        values["output.uri"] = str(output)
    return load_config(REPO / "configs" / "local.yaml", values)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "notes"
    return write_sample_archive(root, notes=SMALL_NOTES, files=1, row_group_size=10)


@pytest.fixture(scope="module")
def coded(ray_local, small_archive, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("coded") / "out"
    summary = run_job(_cfg(small_archive, demo_model, out), echo=lambda _l: None)
    return out, summary


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """A thousand small files of 2 row groups each."""
    root = tmp_path_factory.mktemp("many") / "notes"
    return write_sample_archive(root, notes=12_000, files=1000, row_group_size=6)


@pytest.mark.engine
def test_whole_sample_counts_what_the_engine_counted(coded, small_archive, demo_model):
    _, summary = coded
    plan = estimate(_cfg(small_archive, demo_model), sample_notes=1000)
    assert plan.sample.notes == plan.notes == SMALL_NOTES
    assert (plan.sample.empty_notes, plan.sample.truncated_notes) == (3, 1)
    assert plan.prompt_tokens == summary.prompt_tokens
    assert plan.sample.row_groups == 4


@pytest.mark.engine
def test_output_of_a_run_gives_measured_figures(coded, small_archive, demo_model):
    out, summary = coded
    saved = json.loads((out / "_notecoder" / "summary.json").read_text())
    plan = estimate(_cfg(small_archive, demo_model, out))
    assert (plan.notes_committed, plan.notes_to_code, plan.total_tokens) == (40, 0, 0)
    per_engine = saved["total_tokens"] / saved["wall_seconds"] / saved["engines"]
    assert plan.tokens_per_second == pytest.approx(per_engine)
    assert plan.throughput_source.startswith("measured")
    coded_notes = saved["rows"] - saved["statuses"]["empty_note"]
    assert plan.completion_tokens_per_note == pytest.approx(
        saved["completion_tokens"] / coded_notes
    )
    assert plan.completion_source.startswith("mean of the last run")
    given = estimate(_cfg(small_archive, demo_model, out), tokens_per_second=123.0)
    assert (given.tokens_per_second, given.throughput_source) == (
        123.0,
        "--tokens-per-second",
    )


@pytest.mark.engine
def test_other_input_priced_at_a_runs_pace(coded, sample_archive, demo_model):
    out, summary = coded
    plan = estimate(_cfg(sample_archive, demo_model, out), sample_notes=64)
    assert plan.notes_committed == 0 and plan.notes_to_code == 300
    assert plan.throughput_source.startswith("measured")
    generated = round(300 * (1 - plan.sample.empty_notes / plan.sample.notes))
    assert plan.completion_tokens == round(plan.completion_tokens_per_note * generated)
    # Priced like the run: the same dollars per engine-second.
    run_rate = summary.usd / (summary.wall_seconds * summary.engines)
    assert plan.usd / (plan.engine_hours * 3600) == pytest.approx(run_rate)


def test_defaults_and_pricing_without_a_run(sample_archive, demo_model):
    cfg = _cfg(sample_archive, demo_model, **{"engine.engines": 2})
    plan = estimate(cfg, sample_notes=100)
    assert (plan.files, plan.row_groups, plan.shards, plan.notes) == (3, 9, 6, 300)
    assert 100 <= plan.sample.notes <= 120 and plan.sample.files == 3
    assert plan.completion_tokens_per_note == cfg.sampling.max_tokens
    assert plan.tokens_per_second == cfg.cost.planning_tokens_per_second
    assert plan.total_tokens == plan.prompt_tokens + plan.completion_tokens
    assert plan.engine_hours == pytest.approx(
        plan.total_tokens / plan.tokens_per_second / 3600
    )
    assert plan.wall_hours == pytest.approx(plan.engine_hours / 2)
    cost = cfg.cost
    assert plan.usd == pytest.approx(
        plan.accelerator_hours * cost.usd_per_accelerator_hour
    )
    coded = round(300 * (1 - plan.sample.empty_notes / plan.sample.notes))
    baseline = (
        (plan.prompt_tokens + cost.baseline_few_shot_tokens * coded)
        * cost.baseline_usd_per_1k_input_tokens
        + plan.completion_tokens * cost.baseline_usd_per_1k_output_tokens
    ) / 1000
    assert plan.baseline_usd == pytest.approx(baseline)
    assert 0 < plan.prompt_tokens_margin < plan.prompt_tokens


def test_thousand_files_in_seconds_with_a_spread_sample(many_files, demo_model):
    started = time.perf_counter()
    plan = estimate(_cfg(many_files, demo_model), sample_notes=256)
    took = time.perf_counter() - started
    assert (plan.files, plan.row_groups, plan.notes) == (1000, 2000, 12_000)
    # Row groups of 6 notes: enough groups are read to reach the sample asked for.
    assert plan.sample.notes >= 256 and plan.sample.files >= 40
    assert took < 60, f"planning 1000 files took {took:.1f} s"


def test_cli_table_json_and_no_note_text(sample_archive, demo_model, caplog):
    texts = pq.read_table(sample_archive, columns=["text"]).column("text")
    fragments = note_fragments(texts.to_pylist())
    args = ["plan", "--config", REPO / "configs" / "local.yaml"]
    args += ["--input", sample_archive, "--model", demo_model, "--log-level", "DEBUG"]
    with caplog.at_level(logging.DEBUG):
        table = CliRunner().invoke(main, [str(a) for a in args])
        as_json = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert table.exit_code == 0, table.output
    assert "token sample" in table.output and "hosted API baseline" in table.output
    data = json.loads(as_json.stdout)
    assert data["notes"] == 300 and data["sample"]["notes"] > 0
    for where, text in (
        ("the table", table.output),
        ("the JSON", as_json.output),
        ("the log", caplog.text),
    ):
        assert_no_fragments(text, fragments, where)


def test_unusable_input_or_model_fails_clearly(sample_archive, demo_model, tmp_path):
    with pytest.raises(PlanError, match="has no column 'body'"):
        estimate(_cfg(sample_archive, demo_model, **{"input.text_column": "body"}))
    with pytest.raises(ModelError, match="has no config.json"):
        estimate(_cfg(sample_archive, tmp_path))
    result = CliRunner().invoke(
        main,
        ["plan", "--input", str(sample_archive), "--model", str(demo_model)]
        + ["--sample", "0"],
    )
    assert result.exit_code == 1 and "--sample must be at least 1" in result.output


def test_every_command_has_help_text():
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and command.help.strip(), f"{name} has no help text"
    for name in ("plan", "report", "eval"):
        undocumented = [
            p.name
            for p in main.commands[name].params
            if isinstance(p, click.Option) and not p.help
        ]
        assert undocumented == [], f"{name}: options without help: {undocumented}"


def test_format_plan_names_its_sources(sample_archive, demo_model):
    text = format_plan(estimate(_cfg(sample_archive, demo_model), sample_notes=20))
    assert "sampling.max_tokens (an upper bound)" in text
    assert "cost.planning_tokens_per_second" in text


@pytest.mark.s3
def test_archive_and_model_on_s3(s3, sample_archive, demo_model, monkeypatch):
    bucket = s3.new_bucket()
    archive = s3.upload_folder(sample_archive, f"s3://{bucket}/notes")
    model = s3.upload_folder(demo_model, f"s3://{bucket}/models/demo")
    fetched = []
    real_download = Storage.download

    def spy(self, uri, dest):
        fetched.append(uri.rsplit("/", 1)[-1])
        return real_download(self, uri, dest)

    monkeypatch.setattr(Storage, "download", spy)
    on_s3 = estimate(_cfg(archive, model, **s3.overrides()), sample_notes=100)
    local = estimate(_cfg(sample_archive, demo_model), sample_notes=100)
    assert (on_s3.notes, on_s3.files, on_s3.prompt_tokens) == (
        local.notes,
        local.files,
        local.prompt_tokens,
    )
    # The tokenizer and configs only: the weights stay where they are.
    assert "tokenizer.json" in fetched
    assert not [name for name in fetched if name.endswith(".safetensors")]
