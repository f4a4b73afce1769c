"""`notecoder eval` end to end: a real run over CodiEsp dev, scored against its gold.

The scoring itself is checked against scikit-learn in test_evaluate.py; here the
command is: it reads only committed parts, finds the gold, prints the table or JSON,
records F1 in the run ledger, and never shows note text. Skipped where the shared
CodiEsp data is absent (it is never copied into the project).
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from notecoder.cli import main
from notecoder.commit import OutputLayout
from notecoder.config import load_config
from notecoder.evaluate import evaluate
from notecoder.runner import run_job
from notecoder.storage import Storage

from .conftest import REPO, SHARED, assert_no_fragments, note_fragments

CODIESP_DEV = SHARED / "data" / "codiesp" / "dev.parquet"

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not CODIESP_DEV.exists(), reason="CodiEsp dev split absent"),
]


@pytest.fixture(scope="module")
def coded(ray_local, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("codiesp") / "coded"
    cfg = load_config(
        REPO / "configs" / "local.yaml",
        {
            "input.uri": str(CODIESP_DEV),
            "input.passthrough_columns": [],
            "output.uri": str(out),
            "model.path": str(demo_model),
        },
    )
    summary = run_job(cfg, echo=lambda _line: None)
    return out, summary


@pytest.fixture(scope="module")
def fragments():
    texts = pq.read_table(CODIESP_DEV, columns=["text"]).column("text").to_pylist()
    return note_fragments(texts)


def _eval(*args):
    base = ["eval", "--gold", str(CODIESP_DEV)]
    return CliRunner().invoke(main, base + [str(a) for a in args])


def test_json_matches_scoring_the_committed_rows(coded):
    out, summary = coded
    result = _eval("--predictions", out, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    parts = OutputLayout(Storage(), str(out)).committed_parts()
    predictions = pa.concat_tables([pq.read_table(p) for p in parts])
    gold = pq.read_table(CODIESP_DEV, columns=["note_id", "gold_icd10"])
    assert got == evaluate(predictions, gold).to_dict()
    assert got["gold_notes"] == got["matched_notes"] == summary.rows == 250


def test_table_and_no_note_text(coded, fragments):
    out, _ = coded
    result = _eval("--predictions", out)
    assert result.exit_code == 0, result.output
    assert "gold 250  predicted 250  matched 250" in result.output
    assert "micro" in result.output and "primary code exact match" in result.output
    assert_no_fragments(result.output, fragments, "the eval table")


def test_uncommitted_part_is_not_scored(coded, tmp_path):
    out, _ = coded
    copy = tmp_path / "coded"
    shutil.copytree(out, copy)
    # A part without a marker, as a shard killed before its commit leaves it: the
    # same notes again, which would double the predictions if it were read.
    part = next(copy.glob("part-*.parquet"))
    shutil.copy(part, copy / "part-0000deadbeef0000.parquet")
    result = _eval("--predictions", copy, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["predicted_notes"] == 250


def test_record_puts_f1_in_the_ledger_next_to_cost(coded):
    out, summary = coded
    scored = json.loads(_eval("--predictions", out, "--json", "--record").stdout)
    ledger_dir = out.parent / "_notecoder-ledger"
    history = CliRunner().invoke(
        main, ["report", "--history", str(ledger_dir), "--json"]
    )
    (entry,) = json.loads(history.stdout)["history"]
    assert entry["run_id"] == summary.run_id
    assert entry["code_micro_f1"] == pytest.approx(scored["code"]["micro"]["f1"])
    assert entry["usd_per_1k_tokens"] == pytest.approx(summary.usd_per_1k_tokens)
    assert entry["gold_uri"] == str(CODIESP_DEV)


def test_bad_gold_and_empty_output_fail_clearly(coded, tmp_path, fragments):
    out, _ = coded
    result = _eval("--predictions", out, "--gold-column", "codes_by_hand")
    assert result.exit_code == 1
    assert "gold table has no column 'codes_by_hand'" in result.output
    assert_no_fragments(result.output, fragments, "the error")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _eval("--predictions", empty)
    assert result.exit_code == 1 and "has no committed parts" in result.output
    # Asked for, a ledger that cannot be written is an error (a run only warns).
    below_a_file = out / "_notecoder" / "run.json"
    result = _eval("--predictions", out, "--record", "--ledger", below_a_file)
    assert result.exit_code == 1 and "StorageError: cannot write" in result.output


def test_gold_written_by_polars_scores_the_same(coded, tmp_path):
    out, _ = coded
    # polars writes large_list<large_string>; the codes are the same.
    gold = tmp_path / "gold.parquet"
    pl.read_parquet(CODIESP_DEV, columns=["note_id", "gold_icd10"]).write_parquet(gold)
    base = ["eval", "--predictions", str(out), "--json"]
    from_polars = CliRunner().invoke(main, base + ["--gold", str(gold)])
    assert from_polars.exit_code == 0, from_polars.output
    assert json.loads(from_polars.stdout) == json.loads(_eval(*base[1:]).stdout)
