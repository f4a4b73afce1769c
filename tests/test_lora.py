"""A LoRA adapter on the demo model: config, checks, audit trail, and a real run.

The adapter is made here, without peft: PEFT's file layout (adapter_config.json and
adapter_model.safetensors with ``base_model.model.<module>.lora_A/B.weight`` tensors)
written with torch and safetensors, from a seeded generator, with weights large
enough that the tiny demo model answers differently through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from notecoder.coder import NoteCoder, RunContext
from notecoder.commit import OutputLayout
from notecoder.config import load_config
from notecoder.engine import llm_kwargs
from notecoder.errors import ConfigError, ModelError, OutputMismatchError
from notecoder.modelref import content_hash, resolve_adapter, resolve_model
from notecoder.runner import prepare, run_job
from notecoder.storage import Storage

from .conftest import REPO, assert_no_fragments, note_fragments
from .s3server import s3_fixture  # noqa: F401
from .test_cluster import deadline

# Every linear layer of the demo model's Llama blocks: (input, output) width.
_TARGETS = {
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("hidden", "hidden"),
    "self_attn.v_proj": ("hidden", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("hidden", "inter"),
    "mlp.up_proj": ("hidden", "inter"),
    "mlp.down_proj": ("inter", "hidden"),
}


def make_adapter(
    model_dir: Path, out_dir: Path, rank: int = 8, seed: int = 0, scale: float = 0.5
) -> Path:
    """Write a deterministic, nonzero PEFT LoRA adapter for the model's layers."""
    config = json.loads((model_dir / "config.json").read_text())
    width = {"hidden": config["hidden_size"], "inter": config["intermediate_size"]}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in _TARGETS.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn(rank, width[fan_in], generator=gen) * scale
            b = torch.randn(width[fan_out], rank, generator=gen) * scale
            tensors[f"{name}.lora_A.weight"] = a
            tensors[f"{name}.lora_B.weight"] = b
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({m.split(".")[-1] for m in _TARGETS}),
        "bias": "none",
        "base_model_name_or_path": model_dir.name,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def adapter(demo_model, tmp_path_factory) -> Path:
    return make_adapter(demo_model, tmp_path_factory.mktemp("lora") / "coder-lora")


def _cfg(**overrides):
    return load_config(REPO / "configs" / "local.yaml", overrides)


# -- pure logic -----------------------------------------------------------------------


def test_adapter_files_are_deterministic_and_nonzero(demo_model, tmp_path):
    one = make_adapter(demo_model, tmp_path / "one")
    two = make_adapter(demo_model, tmp_path / "two")
    assert content_hash(one) == content_hash(two)
    other = make_adapter(demo_model, tmp_path / "other", seed=1)
    assert content_hash(other) != content_hash(one)
    from safetensors.torch import load_file

    weights = load_file(one / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    assert all(t.abs().sum() > 0 for t in weights.values())


def test_config_takes_an_adapter_and_only_ranks_vllm_serves():
    cfg = _cfg(**{"model.lora_path": "s3://b/adapter", "model.max_lora_rank": 32})
    assert cfg.model.lora_path == "s3://b/adapter"
    assert cfg.model.max_lora_rank == 32
    assert _cfg().model.lora_path is None
    with pytest.raises(ConfigError, match="model.max_lora_rank"):
        _cfg(**{"model.max_lora_rank": 12})


def test_engine_enables_lora_only_with_an_adapter():
    plain = llm_kwargs(_cfg(), "/m", "cpu")
    assert "enable_lora" not in plain and "max_lora_rank" not in plain
    cfg = _cfg(**{"model.lora_path": "/a", "model.max_lora_rank": 64})
    kwargs = llm_kwargs(cfg, "/m", "cpu")
    assert kwargs["enable_lora"] is True
    assert kwargs["max_lora_rank"] == 64
    assert kwargs["max_loras"] == 1


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "is not a folder"),
        ("no-config", "has no adapter_config.json"),
        ("no-weights", "has no adapter_model.safetensors"),
        (
            "rank",
            r"rank 32, above model.max_lora_rank \(8\): set model.max_lora_rank "
            "to 32",
        ),
        ("not-lora", "vLLM serves LoRA only"),
    ],
)
def test_a_bad_adapter_is_refused_before_any_engine(
    demo_model, tmp_path, breakage, message
):
    folder = make_adapter(
        demo_model, tmp_path / "a", rank=32 if breakage == "rank" else 8
    )
    if breakage == "missing":
        folder = tmp_path / "absent"
    elif breakage == "no-config":
        (folder / "adapter_config.json").unlink()
    elif breakage == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif breakage == "not-lora":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["peft_type"] = "IA3"
        (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message) as caught:
        resolve_model(Storage(), str(demo_model), str(folder), max_lora_rank=8)
    assert "model.lora_path" in str(caught.value)


def test_adapter_hash_joins_the_model_label(demo_model, adapter, tmp_path):
    base = resolve_model(Storage(), str(demo_model))
    with_adapter = resolve_model(Storage(), str(demo_model), str(adapter), 8)
    assert with_adapter.content_hash == base.content_hash
    assert with_adapter.adapter.content_hash == content_hash(adapter)
    assert with_adapter.adapter.rank == 8
    assert with_adapter.label == (
        f"{base.label}+coder-lora@{content_hash(adapter)[:12]}"
    )
    other = make_adapter(demo_model, tmp_path / "coder-lora", seed=3)
    assert resolve_model(Storage(), str(demo_model), str(other), 8).label != (
        with_adapter.label
    )


# -- the real engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(ray_local, demo_model, adapter, tmp_path_factory):
    """A whole run with the adapter on the local Ray cluster and the real engine."""
    from notecoder.demo import write_sample_archive

    base = tmp_path_factory.mktemp("lora-run")
    archive = write_sample_archive(base / "notes", notes=24, files=1)
    out = base / "coded"
    overrides = {
        "input.uri": str(archive),
        "output.uri": str(out),
        "model.path": str(demo_model),
        "model.lora_path": str(adapter),
        "model.max_lora_rank": 8,
        "shard_rows": 12,
    }
    lines: list[str] = []
    with deadline(300):
        summary = run_job(_cfg(**overrides), echo=lines.append)
    return archive, out, summary, overrides, "\n".join(lines)


@pytest.mark.engine
def test_run_with_adapter_codes_every_note_once(lora_run):
    archive, out, summary, _, printed = lora_run
    table = pl.read_parquet(f"{out}/part-*.parquet")
    ids = pl.read_parquet(f"{archive}/**/*.parquet").get_column("note_id")
    assert sorted(table.get_column("note_id")) == sorted(ids)
    assert table.height == summary.rows == 24
    assert summary.shards_failed == 0
    texts = pl.read_parquet(f"{archive}/**/*.parquet").get_column("text").to_list()
    assert_no_fragments(printed, note_fragments(texts), "the printed summary")


@pytest.mark.engine
def test_adapter_is_in_run_json_and_every_row_label(lora_run, demo_model, adapter):
    _, out, _, _, _ = lora_run
    run = json.loads((out / "_notecoder" / "run.json").read_text())
    adapter_hash = content_hash(adapter)
    assert run["model"]["lora"] == {
        "path": str(adapter),
        "content_hash": adapter_hash,
        "rank": 8,
    }
    assert run["settings"]["model.lora_hash"] == adapter_hash
    assert run["settings"]["model.content_hash"] == content_hash(demo_model)
    labels = pl.read_parquet(f"{out}/part-*.parquet").get_column("model").unique()
    assert labels.to_list() == [run["model"]["label"]]
    assert run["model"]["label"].endswith(f"+coder-lora@{adapter_hash[:12]}")


def _code(primary: dict | None) -> str | None:
    return primary["code"] if primary else None


@pytest.mark.engine
def test_adapter_changes_the_answers(lora_run, shared_llm, local_config, demo_model):
    """The same notes through the base model (in this process) answer otherwise."""
    archive, out, _, _, _ = lora_run
    notes = pl.read_parquet(f"{archive}/**/*.parquet").sort("note_id")
    ctx = RunContext("base", "demo@base", str(demo_model), "/unused", "cpu")
    rows, _ = NoteCoder(local_config, ctx, llm=shared_llm).code_notes(
        notes.get_column("text").to_list(), notes.get_column("note_id").to_list()
    )
    base = {
        note_id: (row.status, _code(row.primary), row.completion_tokens)
        for note_id, row in zip(notes.get_column("note_id"), rows, strict=True)
        if row.status != "empty_note"
    }
    coded = pl.read_parquet(f"{out}/part-*.parquet")
    lora = {
        r["note_id"]: (r["status"], r["primary_code"], r["completion_tokens"])
        for r in coded.iter_rows(named=True)
        if r["note_id"] in base
    }
    assert set(lora) == set(base)
    differ = sum(1 for note_id in base if base[note_id] != lora[note_id])
    # Measured: every one of the 21 non-empty notes differs; half is a safe floor.
    assert differ >= len(base) // 2, f"only {differ} of {len(base)} notes differ"


@pytest.mark.engine
def test_rerun_with_another_adapter_is_refused(lora_run, demo_model, tmp_path):
    _, _, _, overrides, _ = lora_run
    other = make_adapter(demo_model, tmp_path / "coder-lora", seed=7)
    cfg = _cfg(**{**overrides, "model.lora_path": str(other)})
    with pytest.raises(OutputMismatchError, match="model.lora_hash"):
        prepare(cfg)
    resumed = prepare(_cfg(**overrides))
    assert resumed.pending == []
    assert OutputLayout(Storage(), overrides["output.uri"]).committed()


# -- S3 -------------------------------------------------------------------------------
# Last in this file: starting the moto server imports flask, and vLLM 0.32 cannot build
# an engine in a process that has (its kernel dispatcher trips over flask's proxies),
# so the in-process base engine above must exist before it.


@pytest.mark.s3
def test_adapter_on_s3_is_fetched_and_hashed_like_the_folder(s3, adapter):
    uri = s3.upload_folder(adapter, f"s3://{s3.new_bucket()}/adapters/coder-lora")
    ref = resolve_adapter(Storage(s3.settings()), uri, max_rank=16)
    assert ref.content_hash == content_hash(adapter)
    assert Path(ref.local_dir) != adapter and Path(ref.local_dir).is_dir()
    assert ref.label.startswith("coder-lora@")
