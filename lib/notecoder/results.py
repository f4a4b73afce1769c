"""From model output to coded rows: parsing, validation, statuses, output schema.

Every input row yields exactly one output row with a status:

- ``ok``: parsed, and every returned code is a valid ICD-10-CM code
- ``invalid_code``: parsed, but a code is not in ICD-10-CM, or no code was returned
- ``unparseable``: the output is not the JSON the output shape asks for
- ``truncated_output``: generation hit ``max_tokens`` before the JSON closed
- ``empty_note``: no text to code (null, empty or only white space); nothing generated
- ``error``: anything else that went wrong for this row alone

The ``error`` column says why, naming causes and counts only: neither the note nor the
model's answer (which may echo the note) ever goes into it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pyarrow as pa

from notecoder import codes

STATUSES = (
    "ok",
    "invalid_code",
    "unparseable",
    "truncated_output",
    "empty_note",
    "error",
)

CODE_TYPE = pa.struct(
    [
        ("code", pa.string()),
        ("confidence", pa.float64()),
        ("valid", pa.bool_()),
        ("billable", pa.bool_()),
    ]
)

# Columns every output row gets after the id and pass-through columns, in this order.
RESULT_FIELDS = [
    pa.field("codes", pa.list_(CODE_TYPE)),
    pa.field("primary_code", pa.string()),
    pa.field("primary_confidence", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("note_truncated", pa.bool_()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("shard_id", pa.string()),
]


class ParseError(ValueError):
    """The model's answer is not the JSON its output shape asks for."""


def json_schema(shape: str, max_codes: int) -> dict:
    """The JSON schema handed to structured decoding for an output shape."""
    one = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "maxLength": 8},
            "confidence": {"type": "number"},
        },
        "required": ["code", "confidence"],
        "additionalProperties": False,
    }
    if shape == "single":
        return one
    return {
        "type": "object",
        "properties": {
            "codes": {"type": "array", "items": one, "maxItems": max_codes},
        },
        "required": ["codes"],
        "additionalProperties": False,
    }


def parse_answer(
    text: str, shape: str, max_codes: int
) -> list[tuple[str, float | None]]:
    """(raw code, confidence) pairs from a model answer; raises ParseError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"answer is not JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise ParseError("answer is JSON nested too deeply") from None
    if shape == "single":
        return [_one_code(obj, "answer")]
    if not isinstance(obj, dict) or not isinstance(obj.get("codes"), list):
        raise ParseError('answer has no "codes" list')
    items = obj["codes"][:max_codes]
    return [_one_code(item, f"codes[{i}]") for i, item in enumerate(items)]


def _one_code(obj: object, where: str) -> tuple[str, float | None]:
    if not isinstance(obj, dict):
        raise ParseError(f"{where} is not a JSON object")
    code = obj.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ParseError(f'{where} has no "code" string')
    conf = obj.get("confidence")
    usable = isinstance(conf, (int, float)) and not isinstance(conf, bool)
    if not usable or not math.isfinite(conf):
        conf = None
    else:
        conf = min(1.0, max(0.0, float(conf)))
    return code, conf


@dataclass
class RowResult:
    """The coded outcome of one note."""

    status: str
    codes: list[dict] = field(default_factory=list)
    error: str | None = None
    note_truncated: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def primary(self) -> dict | None:
        """The first valid code, else the first code: what a biller looks at first."""
        for c in self.codes:
            if c["valid"]:
                return c
        return self.codes[0] if self.codes else None


def judge(
    text: str, finish_reason: str | None, shape: str, max_codes: int
) -> RowResult:
    """Status and codes for one answer; the caller sets the token counts."""
    if finish_reason == "length":
        return RowResult("truncated_output", error="answer hit sampling.max_tokens")
    try:
        pairs = parse_answer(text, shape, max_codes)
    except ParseError as exc:
        return RowResult("unparseable", error=str(exc))
    found = []
    seen = set()
    for raw, conf in pairs:
        code = codes.normalise(raw)
        if code in seen:
            continue
        seen.add(code)
        valid, billable = codes.check(code)
        found.append(
            {"code": code, "confidence": conf, "valid": valid, "billable": billable}
        )
    if not found:
        return RowResult("invalid_code", error="no code returned")
    bad = sum(1 for c in found if not c["valid"])
    if bad:
        return RowResult(
            "invalid_code", found, error=f"{bad} of {len(found)} codes not in ICD-10-CM"
        )
    return RowResult("ok", found)


def output_schema(input_schema: pa.Schema, keep: list[str]) -> pa.Schema:
    """Id and pass-through columns as they came in, then the result columns."""
    return pa.schema([input_schema.field(n) for n in keep] + RESULT_FIELDS)


def build_table(
    inputs: pa.Table,
    keep: list[str],
    rows: list[RowResult],
    model: str,
    run_id: str,
    shard_id: str,
) -> pa.Table:
    """The output table: one row per input row, in input order."""
    if len(rows) != inputs.num_rows:
        raise AssertionError(
            f"shard {shard_id}: {len(rows)} results for {inputs.num_rows} rows"
        )
    primaries = [r.primary for r in rows]
    n = len(rows)
    columns = [inputs.column(name) for name in keep] + [
        pa.array([r.codes for r in rows], pa.list_(CODE_TYPE)),
        pa.array([p["code"] if p else None for p in primaries], pa.string()),
        pa.array([p["confidence"] if p else None for p in primaries], pa.float64()),
        pa.array([r.status for r in rows], pa.string()),
        pa.array([r.error for r in rows], pa.string()),
        pa.array([r.note_truncated for r in rows], pa.bool_()),
        pa.array([r.prompt_tokens for r in rows], pa.int32()),
        pa.array([r.completion_tokens for r in rows], pa.int32()),
        pa.array([model] * n, pa.string()),
        pa.array([run_id] * n, pa.string()),
        pa.array([shard_id] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=output_schema(inputs.schema, keep))
