"""``notecoder eval`` figures, checked by hand and against scikit-learn.

scikit-learn is the independent reference: its MultiLabelBinarizer and
precision_recall_fscore_support (micro and macro, zero_division=0) score the same
gold and predicted sets, built here with plain dicts rather than evaluate's code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from notecoder import codes
from notecoder.errors import NotecoderError
from notecoder.evaluate import (
    Confusion,
    EvalReport,
    EvaluationInputError,
    Scores,
    evaluate,
    format_report,
)

# shared/ sits beside the checkout, on a developer's machine and in CI alike.
CODIESP_DEV = Path(__file__).resolve().parents[2] / "shared/data/codiesp/dev.parquet"
CODE = pa.struct(
    [
        ("code", pa.string()),
        ("confidence", pa.float64()),
        ("valid", pa.bool_()),
        ("billable", pa.bool_()),
    ]
)
# A stand-in for note text: it must never show up in an error message.
SECRET = "Patient SECRET-TEXT-4711 was seen"

# One prediction row: (id, [(code, valid), ...], primary code, status).
Row = tuple[object, list[tuple[str, bool]], "str | None", str]


def predictions_table(rows: list[Row], id_column: str = "note_id") -> pa.Table:
    id_type = pa.int64() if rows and isinstance(rows[0][0], int) else pa.string()
    return pa.table(
        {
            id_column: pa.array([r[0] for r in rows], id_type),
            "codes": pa.array(
                [
                    [
                        {"code": c, "confidence": 0.5, "valid": v, "billable": v}
                        for c, v in r[1]
                    ]
                    for r in rows
                ],
                pa.list_(CODE),
            ),
            "primary_code": pa.array([r[2] for r in rows], pa.string()),
            "status": pa.array([r[3] for r in rows], pa.string()),
        }
    )


def gold_table(
    rows: list[tuple[object, list[str] | None]],
    id_column: str = "note_id",
    gold_column: str = "gold_icd10",
) -> pa.Table:
    id_type = pa.int64() if rows and isinstance(rows[0][0], int) else pa.string()
    return pa.table(
        {
            id_column: pa.array([r[0] for r in rows], id_type),
            "text": [SECRET] * len(rows),
            gold_column: pa.array([r[1] for r in rows], pa.list_(pa.string())),
        }
    )


def reference_sets(
    gold: list[tuple[object, list[str] | None]],
    predicted: list[Row],
    *,
    only_valid: bool = False,
    category: bool = False,
) -> tuple[list[set[str]], list[set[str]]]:
    """Gold and predicted label sets per gold note, the plain way."""

    def label(code: str) -> str:
        normal = codes.normalise(code)
        return normal[:3] if category else normal

    by_id = {
        note: {label(c) for c, valid in pairs if valid or not only_valid}
        for note, pairs, _, _ in predicted
    }
    gold_sets = [{label(c) for c in (codes_ or [])} for _, codes_ in gold]
    predicted_sets = [by_id.get(note, set()) for note, _ in gold]
    return gold_sets, predicted_sets


def sklearn_scores(
    gold_sets: list[set[str]], predicted_sets: list[set[str]], average: str
) -> Scores:
    binarizer = MultiLabelBinarizer().fit(gold_sets + predicted_sets)
    precision, recall, f1, _ = precision_recall_fscore_support(
        binarizer.transform(gold_sets),
        binarizer.transform(predicted_sets),
        average=average,
        zero_division=0,
    )
    return Scores(float(precision), float(recall), float(f1))


def assert_scores(actual: Scores, expected: Scores) -> None:
    assert actual.precision == pytest.approx(expected.precision, abs=1e-12)
    assert actual.recall == pytest.approx(expected.recall, abs=1e-12)
    assert actual.f1 == pytest.approx(expected.f1, abs=1e-12)


def assert_matches_sklearn(
    report: EvalReport,
    gold: list[tuple[object, list[str] | None]],
    predicted: list[Row],
    only_valid: bool = False,
) -> None:
    for category, level in ((False, report.code), (True, report.category)):
        sets = reference_sets(gold, predicted, only_valid=only_valid, category=category)
        assert_scores(level.micro, sklearn_scores(*sets, "micro"))
        assert_scores(level.macro, sklearn_scores(*sets, "macro"))
        assert level.labels == len(set().union(*sets[0], *sets[1]))


# A small case worked by hand. Notes a-d have gold and a prediction, e has gold only,
# f a prediction only. d's gold set is empty and its one code is flagged invalid.
GOLD = [
    ("a", ["E11.9", "I10"]),
    ("b", ["J45.909"]),
    ("c", ["E11.65", "K21.9"]),
    ("d", []),
    ("e", ["R51.9"]),
]
PREDICTED: list[Row] = [
    ("a", [("E11.9", True), ("i10", True)], "E11.9", "ok"),
    ("b", [("J45.901", True), ("XXX", False)], "J45.901", "invalid_code"),
    ("c", [("e1165", True), ("E11.65", True)], "e11.65", "ok"),
    ("d", [("ZZZ", False)], "ZZZ", "invalid_code"),
    ("f", [("A09", True)], "A09", "ok"),
]


def test_hand_worked_counts_and_shares() -> None:
    report = evaluate(predictions_table(PREDICTED), gold_table(GOLD))
    assert (report.gold_notes, report.predicted_notes, report.matched_notes) == (
        5,
        5,
        4,
    )
    assert (report.gold_without_prediction, report.predictions_without_gold) == (1, 1)
    # a and c name a gold code first; b names a wrong one, d has no gold to match.
    assert (report.primary_matches, report.primary_exact_match) == (2, 0.5)
    assert (report.coverage, report.no_valid_code) == (0.75, 0.25)
    assert report.status_counts == {"invalid_code": 2, "ok": 2}
    assert report.confusions == [Confusion("J45.901", "J45.909", 1)]


def test_hand_worked_scores_all_codes() -> None:
    report = evaluate(predictions_table(PREDICTED), gold_table(GOLD))
    # TP E11.9 I10 E11.65; FP J45.901 XXX ZZZ; FN J45.909 K21.9 R51.9.
    code = report.code
    assert (code.true_positives, code.false_positives, code.false_negatives) == (
        3,
        3,
        3,
    )
    assert_scores(code.micro, Scores(0.5, 0.5, 0.5))
    assert code.labels == 9
    assert_scores(code.macro, Scores(3 / 9, 3 / 9, 3 / 9))
    # Categories: TP E11 (twice) I10 J45; FP XXX ZZZ; FN K21 R51.
    assert_scores(report.category.micro, Scores(4 / 6, 4 / 6, 4 / 6))
    assert report.category.labels == 7
    assert_scores(report.category.macro, Scores(3 / 7, 3 / 7, 3 / 7))
    assert_matches_sklearn(report, GOLD, PREDICTED)


def test_hand_worked_scores_valid_codes_only() -> None:
    report = evaluate(
        predictions_table(PREDICTED), gold_table(GOLD), predicted_codes="valid"
    )
    # XXX and ZZZ are dropped: one FP left (J45.901).
    assert_scores(report.code.micro, Scores(3 / 4, 3 / 6, 6 / 10))
    assert report.code.labels == 7
    assert_scores(report.code.macro, Scores(3 / 7, 3 / 7, 3 / 7))
    # Primary code and coverage do not depend on which codes are scored.
    assert (report.primary_matches, report.coverage) == (2, 0.75)
    assert_matches_sklearn(report, GOLD, PREDICTED, only_valid=True)


def test_macro_f1_is_the_mean_of_per_label_f1() -> None:
    # Label X: P 1/2, R 1 -> F1 2/3; label Y: P 1, R 1/2 -> F1 2/3. The mean of P and
    # R (3/4 each) would give F1 3/4: the report must say 2/3.
    gold = [("1", ["X11"]), ("2", ["Y11"]), ("3", ["Y11"])]
    predicted: list[Row] = [
        ("1", [("X11", True)], "X11", "ok"),
        ("2", [("X11", True), ("Y11", True)], "X11", "ok"),
        ("3", [], None, "unparseable"),
    ]
    report = evaluate(predictions_table(predicted), gold_table(gold))
    assert_scores(report.code.macro, Scores(0.75, 0.75, 2 / 3))
    assert_matches_sklearn(report, gold, predicted)


def test_no_predictions_at_all() -> None:
    report = evaluate(predictions_table([]), gold_table(GOLD))
    assert (report.predicted_notes, report.matched_notes) == (0, 0)
    assert report.gold_without_prediction == 5
    assert_scores(report.code.micro, Scores(0.0, 0.0, 0.0))
    assert_scores(report.code.macro, Scores(0.0, 0.0, 0.0))
    assert report.code.false_negatives == 6
    # Nothing matched, so every share of matched notes has nothing to divide by.
    assert (report.primary_exact_match, report.coverage, report.no_valid_code) == (
        0.0,
        0.0,
        0.0,
    )
    assert report.confusions == [] and report.status_counts == {}
    assert_matches_sklearn(report, GOLD, [])


def test_empty_gold_lists() -> None:
    gold = [("a", []), ("b", None), ("c", [])]
    predicted: list[Row] = [
        ("a", [("E11.9", True)], "E11.9", "ok"),
        ("b", [], None, "invalid_code"),
        ("c", [("I10", True), ("E11.9", True)], "I10", "ok"),
    ]
    report = evaluate(predictions_table(predicted), gold_table(gold))
    assert report.code.false_positives == 3 and report.code.true_positives == 0
    assert_scores(report.code.micro, Scores(0.0, 0.0, 0.0))
    assert report.primary_exact_match == 0.0
    assert report.coverage == pytest.approx(2 / 3)
    assert report.confusions == []  # no gold code to have meant
    assert_matches_sklearn(report, gold, predicted)


def test_no_labels_anywhere_scores_zero() -> None:
    # scikit-learn refuses a matrix with no label columns, so this is by hand.
    report = evaluate(
        predictions_table([("a", [], None, "empty_note")]), gold_table([("a", [])])
    )
    assert report.code.labels == 0 and report.category.labels == 0
    assert_scores(report.code.micro, Scores(0.0, 0.0, 0.0))
    assert_scores(report.code.macro, Scores(0.0, 0.0, 0.0))
    assert report.no_valid_code == 1.0


def test_ids_missing_on_either_side() -> None:
    gold = [("a", ["I10"]), ("b", ["E11.9"])]
    predicted: list[Row] = [
        ("b", [("E11.9", True)], "E11.9", "ok"),
        ("x", [("I10", True)], "I10", "ok"),
        ("y", [("Z00.00", True)], "Z00.00", "ok"),
    ]
    report = evaluate(predictions_table(predicted), gold_table(gold))
    assert (report.matched_notes, report.gold_without_prediction) == (1, 1)
    assert report.predictions_without_gold == 2
    # x and y are ignored: their codes are neither FP nor macro labels.
    assert (report.code.false_positives, report.code.labels) == (0, 2)
    assert_scores(report.code.micro, Scores(1.0, 0.5, 2 / 3))
    assert report.primary_exact_match == 1.0
    assert_matches_sklearn(report, gold, predicted)


def test_codes_are_normalised_and_deduplicated_on_both_sides() -> None:
    gold = [("a", ["e11.9", "E119", " I10 "])]
    predicted: list[Row] = [("a", [("E11.9", True), ("e119", True)], " e119", "ok")]
    report = evaluate(predictions_table(predicted), gold_table(gold))
    assert (report.code.true_positives, report.code.false_positives) == (1, 0)
    assert report.code.false_negatives == 1
    assert report.primary_exact_match == 1.0


def test_custom_columns_and_integer_ids() -> None:
    gold = gold_table([(1, ["I10"]), (2, ["E11.9"])], "visit", "truth")
    predicted = predictions_table(
        [(2, [("E11.9", True)], "E11.9", "ok"), (1, [("I10", True)], "I10", "ok")],
        "visit",
    )
    report = evaluate(predicted, gold, id_column="visit", gold_column="truth")
    assert report.matched_notes == 2
    assert_scores(report.code.micro, Scores(1.0, 1.0, 1.0))
    assert (report.id_column, report.gold_column) == ("visit", "truth")


def test_chunked_tables_score_like_one_chunk() -> None:
    whole = predictions_table(PREDICTED)
    chunked = pa.concat_tables(
        [predictions_table(PREDICTED[:2]), predictions_table(PREDICTED[2:])]
    )
    assert chunked.column("codes").num_chunks == 2
    gold = gold_table(GOLD)
    assert evaluate(chunked, gold) == evaluate(whole, gold)


def test_confusions_pair_with_the_longest_shared_prefix() -> None:
    gold = [
        ("1", ["E10.9", "E11.9", "I10"]),
        ("2", ["E11.9", "I10"]),
        ("3", ["K25.9", "K29.70"]),
        ("4", ["I10"]),
        ("5", ["I10"]),
    ]
    predicted: list[Row] = [
        ("1", [], "E11.65", "ok"),  # shares "E11." with E11.9
        ("2", [], "E11.65", "ok"),
        ("3", [], "K21.0", "ok"),  # "K2" with both: the first alphabetically
        ("4", [], "I10", "ok"),  # right: no confusion
        ("5", [], None, "unparseable"),  # no primary code: no confusion
    ]
    report = evaluate(predictions_table(predicted), gold_table(gold))
    assert report.confusions == [
        Confusion("E11.65", "E11.9", 2),
        Confusion("K21.0", "K25.9", 1),
    ]
    short = evaluate(predictions_table(predicted), gold_table(gold), top_confusions=1)
    assert short.confusions == [Confusion("E11.65", "E11.9", 2)]


@pytest.mark.parametrize("side", ["gold", "predictions"])
def test_duplicate_ids_are_refused(side: str) -> None:
    gold = gold_table(GOLD + [("a", ["I10"]), ("b", ["I10"]), ("b", ["I10"])])
    predicted = predictions_table(PREDICTED + [("c", [("I10", True)], "I10", "ok")] * 2)
    if side == "gold":
        predicted = predictions_table(PREDICTED)
    else:
        gold = gold_table(GOLD)
    with pytest.raises(ValueError) as caught:
        evaluate(predicted, gold)
    message = str(caught.value)
    assert side in message and "'note_id'" in message
    count = "2 duplicated" if side == "gold" else "1 duplicated"
    assert count in message
    assert SECRET not in message


def test_null_ids_are_refused() -> None:
    gold = gold_table([("a", ["I10"]), (None, ["I10"])])
    with pytest.raises(EvaluationInputError, match=r"gold has 1 row.*'note_id'"):
        evaluate(predictions_table(PREDICTED), gold)


def test_null_codes_lists_and_entries_predict_nothing() -> None:
    predicted = pa.table(
        {
            "note_id": ["a", "b", "c"],
            "codes": pa.array(
                [
                    None,
                    [None, {"code": None, "valid": None}, {"code": " ", "valid": True}],
                    [{"code": "i10", "valid": None}],
                ],
                pa.list_(CODE),
            ),
            "primary_code": pa.array([None, "", "I10"], pa.string()),
            "status": ["error", "invalid_code", None],
        }
    )
    gold = gold_table([("a", ["I10"]), ("b", ["I10"]), ("c", ["I10"])])
    report = evaluate(predicted, gold)
    counts = report.code
    assert (counts.true_positives, counts.false_positives) == (1, 0)
    assert counts.false_negatives == 2
    assert report.primary_matches == 1 and report.confusions == []
    # A null valid flag is not a valid code; the blank code in b was flagged valid.
    assert report.coverage == pytest.approx(1 / 3)
    assert report.status_counts == {"(null)": 1, "error": 1, "invalid_code": 1}
    only_valid = evaluate(predicted, gold, predicted_codes="valid")
    assert only_valid.code.true_positives == 0


def test_missing_and_mistyped_columns_are_named() -> None:
    gold = gold_table(GOLD)
    with pytest.raises(EvaluationInputError, match="gold table has no column 'codes'"):
        evaluate(predictions_table(PREDICTED), gold, gold_column="codes")
    predicted = predictions_table(PREDICTED).drop_columns(["status"])
    with pytest.raises(EvaluationInputError, match="no column 'status'"):
        evaluate(predicted, gold)
    flat_codes = predictions_table(PREDICTED).set_column(
        1, "codes", pa.array(["E11.9"] * len(PREDICTED))
    )
    with pytest.raises(EvaluationInputError, match="'codes' has type string"):
        evaluate(flat_codes, gold)
    numeric_primary = predictions_table(PREDICTED).set_column(
        2, "primary_code", pa.array([1] * len(PREDICTED))
    )
    with pytest.raises(EvaluationInputError, match="'primary_code' has type int64"):
        evaluate(numeric_primary, gold)
    integer_ids = gold_table([(1, ["I10"])])
    with pytest.raises(EvaluationInputError, match="integers in gold but strings"):
        evaluate(predictions_table(PREDICTED), integer_ids)
    with pytest.raises(EvaluationInputError, match="predicted_codes"):
        evaluate(predictions_table(PREDICTED), gold, predicted_codes="billable")


def test_input_errors_are_notecoder_errors_without_note_text() -> None:
    with pytest.raises(NotecoderError) as caught:
        evaluate(predictions_table(PREDICTED), gold_table(GOLD), id_column="text")
    assert SECRET not in str(caught.value)


def test_report_to_dict_is_json() -> None:
    report = evaluate(predictions_table(PREDICTED), gold_table(GOLD))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["code"]["micro"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert data["confusions"] == [
        {"predicted": "J45.901", "gold": "J45.909", "count": 1}
    ]
    assert data["matched_notes"] == 4 and data["predicted_codes"] == "all"


def test_format_report() -> None:
    report = evaluate(predictions_table(PREDICTED), gold_table(GOLD))
    text = format_report(report)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert any(
        line.split()[:5] == ["code", "micro", "0.500", "0.500", "0.500"]
        for line in lines
    )
    assert any(line.split()[:2] == ["category", "macro"] for line in lines)
    assert "0.500  (2/4 matched notes)" in text
    assert "J45.901" in text and "J45.909" in text
    assert "invalid_code 2  ok 2" in text


@pytest.mark.parametrize("seed", range(25))
def test_random_tables_agree_with_sklearn(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"{c}{n:02d}.{d}" for c in "EIJ" for n in range(3) for d in range(3)]
    gold = [
        (f"n{i}", rng.sample(pool, rng.randint(0, 4)))
        for i in range(rng.randint(1, 30))
    ]
    ids = [note for note, _ in gold if rng.random() < 0.8] + ["extra1", "extra2"]
    predicted: list[Row] = []
    for note in ids:
        pairs = [(c, rng.random() < 0.8) for c in rng.sample(pool, rng.randint(0, 4))]
        primary = pairs[0][0] if pairs else None
        predicted.append((note, pairs, primary, "ok"))
    for only_valid in (False, True):
        report = evaluate(
            predictions_table(predicted),
            gold_table(gold),
            predicted_codes="valid" if only_valid else "all",
        )
        assert_matches_sklearn(report, gold, predicted, only_valid=only_valid)


def _synthetic_predictions(gold: list[tuple[str, list[str]]], seed: int) -> list[Row]:
    """Predictions made from gold: drop, perturb and add codes; skip some notes."""
    rng = random.Random(seed)
    every_code = sorted({c for _, codes_ in gold for c in codes_})
    rows: list[Row] = []
    for note, wanted in gold:
        if rng.random() < 0.05:
            continue  # no prediction row for this note
        said = [c for c in wanted if rng.random() > 0.3]
        said = [c[:-1] + "9" if rng.random() < 0.2 else c for c in said]
        said += rng.sample(every_code, rng.randint(0, 3))
        rng.shuffle(said)
        pairs = [
            (c.lower() if rng.random() < 0.1 else c, codes.check(c)[0]) for c in said
        ]
        rows.append((note, pairs, said[0] if said else None, "ok"))
    rows.append(("not-in-gold", [("I10", True)], "I10", "ok"))
    return rows


@pytest.mark.skipif(not CODIESP_DEV.exists(), reason="CodiEsp dev split not present")
def test_codiesp_dev_with_synthetic_predictions() -> None:
    table = pq.read_table(CODIESP_DEV, columns=["note_id", "gold_icd10"])
    ids, gold_lists = table["note_id"].to_pylist(), table["gold_icd10"].to_pylist()
    gold = list(zip(ids, gold_lists, strict=True))
    predicted = _synthetic_predictions(gold, seed=2020)
    for only_valid in (False, True):
        report = evaluate(
            predictions_table(predicted),
            table,
            predicted_codes="valid" if only_valid else "all",
        )
        assert_matches_sklearn(report, gold, predicted, only_valid=only_valid)
    assert report.gold_notes == 250 and report.predictions_without_gold == 1
    assert report.matched_notes == len(predicted) - 1
    wanted = dict(gold)
    hits = sum(
        p is not None and codes.normalise(p) in wanted.get(note, ())
        for note, _, p, _ in predicted
    )
    assert report.primary_matches == hits
    # Dropping 30% and perturbing 20% of the codes leaves a middling, non-trivial score.
    assert 0.3 < report.code.micro.f1 < 0.9
