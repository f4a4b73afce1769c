"""``notecoder eval``: how well coded rows match gold codes.

Predictions are notecoder's output rows; gold is a table of note ids, each with
a list of codes. Both sides go through :func:`notecoder.codes.normalise`, notes
are matched by id, and :func:`evaluate` returns an :class:`EvalReport` (JSON
through ``to_dict()``, a terminal table through :func:`format_report`).

Every figure is over the *gold notes*: a gold note without a prediction row
predicts nothing; a prediction row without a gold note is counted, then ignored.

- Which predicted codes count: ``predicted_codes="all"`` (the default) takes
  every code in a row's ``codes`` list, ``"valid"`` only those flagged valid.
  "all" scores what the model said, and gold sets hold codes missing from the
  current edition (CodiEsp's ``S02.0XX``) that "valid" would drop even when
  the model got them right. Codes are de-duplicated per note.
- Micro precision, recall and F1 pool every note's code decisions: with TP, FP
  and FN summed over notes and codes, P = TP / (TP + FP), R = TP / (TP + FN),
  F1 = 2 TP / (2 TP + FP + FN).
- Macro precision, recall and F1 are unweighted means of each label's own P, R
  and F1, over every label in the gold or predicted set of at least one gold
  note. A ratio with a zero denominator counts as 0 (a label never predicted
  has precision 0). This is scikit-learn's ``average="macro"`` with
  ``zero_division=0`` on a MultiLabelBinarizer matrix fitted on both sides.
- The category level does the same after cutting every code to its first 3
  characters (E11.9 -> E11).
- Primary exact match: the share of matched notes (gold notes that have a
  prediction row) whose normalised ``primary_code`` is in the note's gold set.
  A null primary code, or an empty gold set, is a miss.
- Coverage: the share of matched notes with at least one code flagged valid in
  ``codes``, whatever ``predicted_codes`` says; ``no_valid_code`` is the rest.
- Confusions: for each matched note whose primary code is set but not in its
  non-empty gold set, the pair (primary code, the gold code sharing the longest
  prefix with it, ties to the alphabetically first). The top N pairs by count
  are kept; equal counts are ordered by the pair.

Every prediction row counts whatever its status: an ``unparseable`` or
``error`` row has no codes, so it predicts nothing. A share with nothing to
divide by is 0 (so with no matched notes coverage and ``no_valid_code`` are
both 0).

Scoring walks per-note Python sets, about 4 s per 100,000 notes of a dozen
codes each on a 2-core machine: fine for a dev or test split, slow for a whole
nightly archive, which would want a columnar rewrite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from notecoder.codes import normalise
from notecoder.errors import NotecoderError

PREDICTED_CODES = ("all", "valid")
_PREDICTION_COLUMNS = ("codes", "primary_code", "status")

# A split repeats a few thousand distinct spellings over and over; caching them
# cuts about a quarter of an evaluation's time.
_normalise = functools.lru_cache(maxsize=1 << 16)(normalise)


class EvaluationInputError(NotecoderError, ValueError):
    """A predictions or gold table cannot be evaluated (missing column, bad ids)."""


@dataclass(frozen=True)
class Scores:
    """Precision, recall and F1, each in [0, 1]."""

    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class LevelScores:
    """Micro and macro scores at one level (full code or 3-character category)."""

    micro: Scores
    macro: Scores
    labels: int
    """Distinct labels the macro average runs over."""
    true_positives: int
    false_positives: int
    false_negatives: int


@dataclass(frozen=True)
class Confusion:
    """A wrong primary code and the gold code it most likely stood for."""

    predicted: str
    gold: str
    count: int


@dataclass(frozen=True)
class EvalReport:
    """What ``notecoder eval`` measured; the module docstring defines it all."""

    id_column: str
    gold_column: str
    predicted_codes: str
    gold_notes: int
    predicted_notes: int
    matched_notes: int
    gold_without_prediction: int
    predictions_without_gold: int
    code: LevelScores
    category: LevelScores
    primary_exact_match: float
    primary_matches: int
    coverage: float
    no_valid_code: float
    status_counts: dict[str, int]
    confusions: list[Confusion]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain dicts, lists and numbers for json.dumps."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Row:
    """One prediction row, reduced to what scoring needs."""

    codes: frozenset[str]
    any_valid: bool
    primary: str | None
    status: str


def evaluate(
    predictions: pa.Table,
    gold: pa.Table,
    id_column: str = "note_id",
    gold_column: str = "gold_icd10",
    *,
    predicted_codes: str = "all",
    top_confusions: int = 10,
) -> EvalReport:
    """Score ``predictions`` (notecoder output rows) against ``gold``.

    ``predictions`` needs ``id_column``, ``codes``, ``primary_code`` and ``status``;
    ``gold`` needs ``id_column`` and ``gold_column`` (a list of code strings). Ids
    must be unique and non-null on each side. ``predicted_codes`` is "all" or
    "valid"; ``top_confusions`` caps the confusion list. Raises
    :class:`EvaluationInputError` (a ValueError) naming the table and column at
    fault, with counts only. The module docstring defines every figure.
    """
    if predicted_codes not in PREDICTED_CODES:
        raise EvaluationInputError(
            f"predicted_codes must be one of {PREDICTED_CODES}, not {predicted_codes!r}"
        )
    _check_inputs(predictions, gold, id_column, gold_column)
    gold_ids = _unique_ids(gold, id_column, "gold")
    predicted_ids = _unique_ids(predictions, id_column, "predictions")
    rows = _prediction_rows(predictions, only_valid=predicted_codes == "valid")
    by_id = dict(zip(predicted_ids, rows, strict=True))
    gold_sets = _gold_sets(gold.column(gold_column))
    pairs = zip(gold_ids, gold_sets, strict=True)
    matched = [(by_id[note], want) for note, want in pairs if note in by_id]
    predicted = [
        by_id[note].codes if note in by_id else frozenset() for note in gold_ids
    ]
    return EvalReport(
        id_column=id_column,
        gold_column=gold_column,
        predicted_codes=predicted_codes,
        gold_notes=len(gold_ids),
        predicted_notes=len(by_id),
        matched_notes=len(matched),
        gold_without_prediction=len(gold_ids) - len(matched),
        predictions_without_gold=len(by_id) - len(matched),
        code=_level_scores(predicted, gold_sets),
        category=_level_scores(_categories(predicted), _categories(gold_sets)),
        **_matched_figures(matched),
        confusions=_confusions(matched, top_confusions),
    )


def _matched_figures(matched: Sequence[tuple[_Row, frozenset[str]]]) -> dict[str, Any]:
    hits = sum(row.primary in want for row, want in matched)
    covered = sum(row.any_valid for row, _ in matched)
    return {
        "primary_exact_match": _share(hits, len(matched)),
        "primary_matches": hits,
        "coverage": _share(covered, len(matched)),
        "no_valid_code": _share(len(matched) - covered, len(matched)),
        "status_counts": dict(
            sorted(Counter(row.status for row, _ in matched).items())
        ),
    }


def _check_inputs(
    predictions: pa.Table, gold: pa.Table, id_column: str, gold_column: str
) -> None:
    _require_columns(gold, "gold", (id_column, gold_column))
    _require_columns(predictions, "predictions", (id_column, *_PREDICTION_COLUMNS))
    _require_list_of(gold, "gold", gold_column, pa.types.is_string, "strings")
    _require_list_of(
        predictions,
        "predictions",
        "codes",
        _is_code_struct,
        "structs with a string code and a bool valid",
    )
    primary = predictions.schema.field("primary_code").type
    if not (pa.types.is_string(primary) or pa.types.is_large_string(primary)):
        raise EvaluationInputError(
            f"predictions column 'primary_code' has type {primary}, not string"
        )
    gold_kind = _id_kind(gold.schema.field(id_column).type)
    predicted_kind = _id_kind(predictions.schema.field(id_column).type)
    if gold_kind != predicted_kind:
        raise EvaluationInputError(
            f"id column {id_column!r} holds {gold_kind} in gold but {predicted_kind} "
            "in predictions; ids are matched by value, so give both the same type"
        )


def _require_columns(table: pa.Table, side: str, names: Iterable[str]) -> None:
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise EvaluationInputError(
            f"{side} table has no column {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, table.column_names))}"
        )


def _require_list_of(
    table: pa.Table,
    side: str,
    column: str,
    item_ok: Callable[[pa.DataType], bool],
    items: str,
) -> None:
    kind = table.schema.field(column).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (is_list and item_ok(kind.value_type)):
        raise EvaluationInputError(
            f"{side} column {column!r} has type {kind}, not a list of {items}"
        )


def _is_code_struct(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind):
        return False
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    code, valid = fields.get("code"), fields.get("valid")
    return (
        code is not None
        and (pa.types.is_string(code) or pa.types.is_large_string(code))
        and valid is not None
        and pa.types.is_boolean(valid)
    )


def _id_kind(kind: pa.DataType) -> str:
    # string/large_string and the integer widths hold the same ids; anything
    # else must match exactly.
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "strings"
    if pa.types.is_integer(kind):
        return "integers"
    return str(kind)


def _unique_ids(table: pa.Table, id_column: str, side: str) -> list[Any]:
    ids = table.column(id_column).to_pylist()
    nulls = sum(note is None for note in ids)
    if nulls:
        raise EvaluationInputError(
            f"{side} has {nulls} row(s) with a null {id_column!r}; "
            "every row needs an id"
        )
    repeated = sum(1 for count in Counter(ids).values() if count > 1)
    if repeated:
        raise EvaluationInputError(
            f"{side} has {repeated} duplicated value(s) in id column {id_column!r} "
            f"({len(ids) - len(set(ids))} extra row(s)); each note must appear once"
        )
    return ids


def _gold_sets(column: pa.ChunkedArray) -> list[frozenset[str]]:
    return [_normal_set(codes or ()) for codes in column.to_pylist()]


def _normal_set(codes: Iterable[str | None]) -> frozenset[str]:
    normal = (_normalise(code) for code in codes if code is not None)
    return frozenset(code for code in normal if code)


def _prediction_rows(table: pa.Table, *, only_valid: bool) -> list[_Row]:
    # Flattening once and walking flat arrays avoids building a dict per code,
    # which is what to_pylist() on the struct column would do.
    codes = table.column("codes")
    flat = pc.list_flatten(codes)
    owners = pc.list_parent_indices(codes).to_pylist()
    names = pc.struct_field(flat, "code").to_pylist()
    valid = pc.struct_field(flat, "valid").to_pylist()
    kept: list[list[str | None]] = [[] for _ in range(table.num_rows)]
    any_valid = [False] * table.num_rows
    for owner, name, ok in zip(owners, names, valid, strict=True):
        any_valid[owner] = any_valid[owner] or bool(ok)
        if ok or not only_valid:
            kept[owner].append(name)
    primaries = table.column("primary_code").to_pylist()
    statuses = table.column("status").to_pylist()
    return [
        _Row(_normal_set(k), v, _normal_primary(p), s if s is not None else "(null)")
        for k, v, p, s in zip(kept, any_valid, primaries, statuses, strict=True)
    ]


def _normal_primary(code: str | None) -> str | None:
    if code is None:
        return None
    # A blank primary code is no primary code, the same as a null.
    return _normalise(code) or None


def _categories(sets: Sequence[frozenset[str]]) -> list[frozenset[str]]:
    return [frozenset(code[:3] for code in codes) for codes in sets]


def _level_scores(
    predicted: Sequence[frozenset[str]], gold: Sequence[frozenset[str]]
) -> LevelScores:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for said, want in zip(predicted, gold, strict=True):
        tp.update(said & want)
        fp.update(said - want)
        fn.update(want - said)
    # Sorted so that the float sums, and so the report, are the same on every
    # run.
    labels = sorted(tp.keys() | fp.keys() | fn.keys())
    per_label = [_scores(tp[label], fp[label], fn[label]) for label in labels]
    totals = (sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return LevelScores(_scores(*totals), _mean(per_label), len(labels), *totals)


def _scores(tp: int, fp: int, fn: int) -> Scores:
    return Scores(
        _share(tp, tp + fp), _share(tp, tp + fn), _share(2 * tp, 2 * tp + fp + fn)
    )


def _mean(scores: Sequence[Scores]) -> Scores:
    if not scores:
        return Scores(0.0, 0.0, 0.0)
    return Scores(
        math.fsum(s.precision for s in scores) / len(scores),
        math.fsum(s.recall for s in scores) / len(scores),
        math.fsum(s.f1 for s in scores) / len(scores),
    )


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _confusions(
    matched: Iterable[tuple[_Row, frozenset[str]]], top: int
) -> list[Confusion]:
    pairs: Counter[tuple[str, str]] = Counter()
    for row, want in matched:
        if row.primary is not None and want and row.primary not in want:
            pairs[row.primary, _likely_intended(row.primary, want)] += 1
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
    return [Confusion(said, meant, n) for (said, meant), n in ranked[:top]]


def _likely_intended(predicted: str, gold: Iterable[str]) -> str:
    return min(gold, key=lambda code: (-_shared_prefix(predicted, code), code))


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def format_report(report: EvalReport) -> str:
    """Render ``report`` as a compact table for a terminal (under 80 columns)."""
    lines = [
        f"notecoder eval: {report.gold_column} by {report.id_column}, "
        f"predicted codes: {report.predicted_codes}",
        f"notes  gold {report.gold_notes}  predicted {report.predicted_notes}  "
        f"matched {report.matched_notes}",
        f"       gold without prediction {report.gold_without_prediction}  "
        f"prediction without gold {report.predictions_without_gold}",
        "",
        f"{'level':<9} {'average':<8} {'precision':>9} {'recall':>7} {'f1':>7}"
        f" {'labels':>7}",
    ]
    for name, level in (("code", report.code), ("category", report.category)):
        for average, scores in (("micro", level.micro), ("macro", level.macro)):
            lines.append(
                f"{name:<9} {average:<8} {scores.precision:>9.3f} "
                f"{scores.recall:>7.3f} {scores.f1:>7.3f} {level.labels:>7}"
            )
    return "\n".join(lines + [""] + _summary_lines(report))


def _summary_lines(report: EvalReport) -> list[str]:
    statuses = "  ".join(f"{k} {v}" for k, v in report.status_counts.items())
    lines = [
        f"primary code exact match  {report.primary_exact_match:.3f}"
        f"  ({report.primary_matches}/{report.matched_notes} matched notes)",
        f"coverage                  {report.coverage:.3f}"
        f"  (no valid code {report.no_valid_code:.3f})",
        f"status                    {statuses or '-'}",
    ]
    if report.confusions:
        lines += ["", "top confusions: primary code -> gold code it likely meant"]
        lines += [f"  {'count':>5}  {'primary':<9}  gold"]
        lines += [
            f"  {c.count:>5}  {c.predicted:<9}  {c.gold}" for c in report.confusions
        ]
    return lines
