"""Parsing, judging and tallying answers: pure logic, no engine."""

import json

import pyarrow as pa
import pytest

from notecoder.config import CostConfig
from notecoder.results import (
    STATUSES,
    ParseError,
    RowResult,
    build_table,
    json_schema,
    judge,
    parse_answer,
)
from notecoder.tally import ShardTally, format_summary, summarise


def test_single_shape_ok_and_normalised():
    row = judge('{"code": "e119", "confidence": 0.93}', "stop", "single", 5)
    assert row.status == "ok"
    assert row.codes == [
        {"code": "E11.9", "confidence": 0.93, "valid": True, "billable": True}
    ]
    assert row.primary["code"] == "E11.9"


def test_invalid_code():
    row = judge('{"code": "Q99.999", "confidence": 0.5}', "stop", "single", 5)
    assert row.status == "invalid_code"
    assert row.codes[0]["valid"] is False
    assert "1 of 1 codes" in row.error


def test_multi_shape_dedupes_and_keeps_order():
    answer = {
        "codes": [
            {"code": "I10", "confidence": 0.9},
            {"code": "i10", "confidence": 0.8},
            {"code": "E11.9", "confidence": 0.7},
        ]
    }
    row = judge(json.dumps(answer), "stop", "multi", 5)
    assert row.status == "ok"
    assert [c["code"] for c in row.codes] == ["I10", "E11.9"]


def test_multi_shape_max_codes():
    answer = {"codes": [{"code": "I10", "confidence": 1}] * 3}
    assert len(parse_answer(json.dumps(answer), "multi", 2)) == 2


def test_primary_prefers_first_valid():
    answer = {"codes": [{"code": "ZZZ", "confidence": 1}, {"code": "I10"}]}
    # the second lacks a confidence: parsed, with None
    row = judge(json.dumps(answer), "stop", "multi", 5)
    assert row.status == "invalid_code"
    assert row.primary["code"] == "I10"
    assert row.primary["confidence"] is None


def test_empty_code_list_is_invalid_code():
    row = judge('{"codes": []}', "stop", "multi", 5)
    assert row.status == "invalid_code"
    assert row.error == "no code returned"


@pytest.mark.parametrize(
    "answer",
    [
        "not json",
        '{"code": 5, "confidence": 1}',
        '{"codes": "I10"}',
        "[1, 2]",
        '{"confidence": 0.2}',
        "[" * 100000,
    ],
)
def test_unparseable(answer):
    shape = "multi" if "codes" in answer else "single"
    row = judge(answer, "stop", shape, 5)
    assert row.status == "unparseable"
    assert row.codes == []


def test_unparseable_error_does_not_echo_answer():
    secret = "Patient Zorblat Quillwick has a broken arm"
    row = judge(f'{{"code": "{secret}', "stop", "single", 5)
    assert row.status == "unparseable"
    assert "Zorblat" not in row.error


def test_length_finish_is_truncated_output():
    row = judge('{"code": "E1', "length", "single", 5)
    assert row.status == "truncated_output"


@pytest.mark.parametrize("value,expected", [(1.7, 1.0), (-2, 0.0), (True, None)])
def test_confidence_clamped_or_dropped(value, expected):
    [(code, conf)] = parse_answer(
        json.dumps({"code": "I10", "confidence": value}), "single", 1
    )
    assert conf == expected


def test_parse_error_type():
    with pytest.raises(ParseError):
        parse_answer("{}", "multi", 3)


def test_schema_shapes():
    assert json_schema("single", 3)["required"] == ["code", "confidence"]
    multi = json_schema("multi", 3)
    assert multi["properties"]["codes"]["maxItems"] == 3


def test_build_table_rows_in_equal_rows_out():
    inputs = pa.table({"note_id": [1, 2, 3], "claim": ["a", "b", "c"]})
    rows = [
        RowResult(
            "ok",
            [{"code": "I10", "confidence": 1.0, "valid": True, "billable": True}],
            prompt_tokens=5,
            completion_tokens=4,
        ),
        RowResult("empty_note", error="note has no text"),
        RowResult("unparseable", error="x"),
    ]
    table = build_table(inputs, ["note_id", "claim"], rows, "m@1", "run1", "s1")
    assert table.num_rows == 3
    assert table.column("note_id").to_pylist() == [1, 2, 3]
    assert table.schema.field("note_id").type == pa.int64()
    assert table.column("primary_code").to_pylist() == ["I10", None, None]
    assert table.column("status").to_pylist() == ["ok", "empty_note", "unparseable"]
    assert set(table.column("run_id").to_pylist()) == {"run1"}
    with pytest.raises(AssertionError):
        build_table(inputs, ["note_id"], rows[:2], "m", "r", "s")


def test_summary_prices_and_sums():
    cost = CostConfig(
        usd_per_accelerator_hour=2.0,
        baseline_usd_per_1k_input_tokens=0.01,
        baseline_usd_per_1k_output_tokens=0.02,
        baseline_few_shot_tokens=100,
    )
    tallies = [
        ShardTally(
            "a",
            "f",
            rows=10,
            statuses={"ok": 9, "empty_note": 1},
            prompt_tokens=1000,
            completion_tokens=100,
            engine_seconds=2.0,
        ),
        ShardTally(
            "b",
            "f",
            rows=5,
            statuses={"ok": 5},
            prompt_tokens=500,
            completion_tokens=50,
            engine_seconds=1.0,
        ),
    ]
    s = summarise(
        "r",
        tallies,
        shards_total=3,
        shards_failed=1,
        shards_retried=2,
        wall_seconds=10.0,
        accelerator_seconds=3600.0,
        engines=1,
        accelerators_per_engine=1,
        cost=cost,
    )
    assert s.rows == 15 and s.statuses["ok"] == 14 and s.statuses["empty_note"] == 1
    assert set(s.statuses) == set(STATUSES)
    assert s.total_tokens == 1650
    assert s.usd == pytest.approx(2.0)
    assert s.usd_per_1k_tokens == pytest.approx(2.0 / 1.65)
    assert s.tokens_per_second == pytest.approx(165.0)
    assert s.engine_tokens_per_second == pytest.approx(550.0)
    # 14 generated notes: (1500 + 14 * 100) * 0.01 / 1000 + 150 * 0.02 / 1000
    assert s.baseline_usd == pytest.approx(0.029 + 0.003)
    text = format_summary(s)
    assert "1 failed, 2 retried" in text and "per 1K tokens" in text
