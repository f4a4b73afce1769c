"""The demo model and the sample archive: deterministic, well formed, and usable.

Notes count as PHI here even though they are invented: assertions name note ids and
counts, never text.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import simple_icd_10_cm as icd

from notecoder import demo
from notecoder.errors import ConfigError

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
SINGLE = {
    "type": "object",
    "properties": {"code": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["code", "confidence"],
    "additionalProperties": False,
}
MULTI = {
    "type": "object",
    "properties": {"codes": {"type": "array", "items": SINGLE}},
    "required": ["codes"],
    "additionalProperties": False,
}


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, request) -> tuple[Path, Path]:
    """The session's demo model, and a second build made in a separate process.

    The second build runs while the first is made, one core each, so checking
    determinism costs about one build of wall time, not two.
    """
    other = tmp_path_factory.mktemp("model-again") / "demo"
    code = (
        "import sys; from notecoder.demo import build_demo_model as b; b(sys.argv[1])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(other)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = request.getfixturevalue("demo_model")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return first, other


def test_demo_model_builds_byte_identically(two_builds):
    first, other = two_builds
    assert set(digests(first)) == MODEL_FILES
    assert digests(first) == digests(other)


def test_untrained_model_differs_from_trained(two_builds, tmp_path):
    raw = demo.build_demo_model(tmp_path / "raw", train=False)
    trained = digests(two_builds[0])
    untrained = digests(raw)
    assert untrained["tokenizer.json"] == trained["tokenizer.json"]
    assert untrained["model.safetensors"] != trained["model.safetensors"]


def test_tokenizer_covers_any_text_and_renders_chats():
    tok = demo.build_tokenizer()
    text = 'Pt c/o "chest pain" – naïve café, 5 mg q.d. 😀 {"code":"I10"}\n\tend'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    bare = demo.prompt_ids(tok, "note")
    with_system = tok.apply_chat_template(
        [
            {"role": "system", "content": "Code it."},
            {"role": "user", "content": "note"},
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert bare[0] == tok.bos_token_id and with_system[0] == tok.bos_token_id
    assert with_system[-len(bare) + 1 :] == bare[1:]
    assert tok.convert_tokens_to_ids("<|system|>") in with_system


def test_answer_ids_spell_the_answer_and_share_the_opening():
    tok = demo.build_tokenizer()
    codes = ["J45.909", "E78.5"]
    single, multi = (demo.answer_ids(tok, codes, s) for s in ("single", "multi"))
    for shape, ids in (("single", single), ("multi", multi)):
        assert ids[-1] == tok.eos_token_id, shape
        assert tok.decode(ids[:-1]) == demo.answer_json(codes, shape), shape
    # The shapes must spell '{"code' alike and part only after it (see answer_ids).
    opening = tok.encode('{"code', add_special_tokens=False)
    assert single[: len(opening)] == multi[: len(opening)] == opening
    assert tok.decode(multi[len(opening) : len(opening) + 1]) == "s"


def test_archive_layout(tmp_path):
    root = demo.write_sample_archive(tmp_path / "a")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))
    assert files == [
        "year=2024/part-000.parquet",
        "year=2024/part-001.parquet",
        "year=2025/part-000.parquet",
    ]
    for name in files:
        meta = pq.ParquetFile(root / name).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert groups == [40, 40, 20], name
        assert pq.read_schema(root / name).equals(demo.ARCHIVE_SCHEMA), name
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 300
    assert set(table.column("year").to_pylist()) == {2024, 2025}


def test_archive_is_deterministic_and_seeded(tmp_path):
    one = demo.write_sample_archive(tmp_path / "one", notes=60, files=2)
    two = demo.write_sample_archive(tmp_path / "two", notes=60, files=2)
    other = demo.write_sample_archive(tmp_path / "other", notes=60, files=2, seed=7)
    assert digests(one) == digests(two)
    assert digests(one) != digests(other)


def test_archive_sizes_and_bad_arguments(tmp_path):
    root = demo.write_sample_archive(
        tmp_path / "a", notes=50, files=2, row_group_size=7
    )
    counts = []
    for path in sorted(root.rglob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        counts.append((meta.num_rows, meta.num_row_groups))
    assert counts == [(25, 4), (25, 4)]
    with pytest.raises(ConfigError, match="at least"):
        demo.write_sample_archive(tmp_path / "b", notes=demo.MIN_NOTES - 1)
    with pytest.raises(ConfigError, match="files"):
        demo.write_sample_archive(tmp_path / "c", notes=20, files=21)


def test_ids_are_unique_and_edge_rows_where_promised():
    rows = demo.sample_rows()
    ids = [r["note_id"] for r in rows]
    assert len(set(ids)) == len(ids) == 300
    assert ids == sorted(ids)
    texts = {r["note_id"]: r["text"] for r in rows}
    assert [i for i, t in texts.items() if t is None] == [demo.NULL_NOTE_ID]
    assert [i for i, t in texts.items() if t == ""] == [demo.EMPTY_NOTE_ID]
    blank = [i for i, t in texts.items() if t and not t.strip()]
    assert blank == [demo.BLANK_NOTE_ID]
    words = {i: len(t.split()) for i, t in texts.items() if t}
    assert [i for i, n in words.items() if n > 500] == [demo.LONG_NOTE_ID]
    assert words[demo.LONG_NOTE_ID] >= demo.LONG_NOTE_WORDS
    assert max(n for i, n in words.items() if i != demo.LONG_NOTE_ID) < 120
    uncoded = [r["note_id"] for r in rows if not r["gold_icd10"]]
    assert uncoded == list(demo.EDGE_EMPTY_IDS)


def test_every_gold_code_is_billable_icd10cm():
    codes = {c for r in demo.sample_rows(notes=600) for c in r["gold_icd10"]}
    codes |= {c.code for c in demo.CONDITIONS} | set(demo.COMORBIDITIES)
    assert len(codes) >= len(demo.CONDITIONS)
    invalid = sorted(c for c in codes if not icd.is_valid_item(c))
    assert invalid == []
    assert sorted(c for c in codes if not icd.is_leaf(c)) == []


def test_pass_through_columns_are_filled():
    rows = demo.sample_rows()
    assert all(r["claim_id"].startswith("CLM-") for r in rows)
    assert len({r["facility"] for r in rows}) > 1


def _prompts(tokenizer, rows, budget):
    """Prompt ids per row; the long note is cut to ``budget`` tokens of note."""
    prompts = []
    for row in rows:
        ids = tokenizer.encode(row["text"][:3000], add_special_tokens=False)
        note = tokenizer.decode(ids[:budget]) if len(ids) > budget else row["text"]
        prompts.append({"prompt_token_ids": demo.prompt_ids(tokenizer, note)})
    return prompts


def _items(text: str, shape: str) -> list[dict] | None:
    """The answer's {code, confidence} items, or None unless it is of the shape."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    if shape == "single":
        items = [answer]
    elif isinstance(answer, dict) and set(answer) == {"codes"}:
        items = answer["codes"]
    else:
        return None
    for item in items if isinstance(items, list) else [None]:
        if not isinstance(item, dict) or set(item) != {"code", "confidence"}:
            return None
        if not isinstance(item["code"], str):
            return None
        if not isinstance(item["confidence"], (int, float)):
            return None
    return items


@pytest.mark.engine
@pytest.mark.parametrize("shape", ["single", "multi"])
def test_engine_codes_sample_notes_as_schema_valid_json(shared_llm, shape):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    rows = [r for r in demo.sample_rows()[:40] if r["gold_icd10"]]
    assert demo.LONG_NOTE_ID in {r["note_id"] for r in rows}
    schema = SINGLE if shape == "single" else MULTI
    params = SamplingParams(
        temperature=0,
        seed=0,
        max_tokens=64,
        structured_outputs=StructuredOutputsParams(json=schema),
    )
    prompts = _prompts(shared_llm.get_tokenizer(), rows, 400)
    outputs = shared_llm.generate(prompts, params, use_tqdm=False)
    malformed, unfinished, wrong = [], [], []
    for row, out in zip(rows, outputs, strict=True):
        items = _items(out.outputs[0].text, shape)
        if items is None:
            malformed.append(row["note_id"])
        elif not items or items[0]["code"] != row["gold_icd10"][0]:
            wrong.append(row["note_id"])
        if out.outputs[0].finish_reason != "stop":
            unfinished.append(row["note_id"])
    assert malformed == [] and unfinished == []
    # The toy codes its own kind of note; a few misses are allowed for another CPU.
    assert len(wrong) <= len(rows) // 10, f"wrong primary code for {wrong}"
