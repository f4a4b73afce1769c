"""How much notecoder adds on top of raw vLLM, note for note.

Runs the same notes twice through one engine in this process:

1. raw vLLM: ``LLM.generate`` over the same prompt token ids (already rendered and
   cut to fit, since raw vLLM rejects a note longer than the context), with the same
   sampling and JSON schema;
2. notecoder: ``NoteCoder.code_notes`` (chat template and token-aware cutting,
   generation, parsing, normalising and ICD-10-CM validation).

and prints notes/s and tokens/s for each, and notecoder's overhead in seconds and per
cent. Prints figures only; targets belong to whoever reads them.

    .venv/bin/python benchmarks/throughput.py                 # demo model, sample notes
    .venv/bin/python benchmarks/throughput.py --notes 2000 \\
        --model /models/m --input ../shared/data/codiesp/background.parquet
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import click
import pyarrow.dataset as ds

from notecoder.coder import NoteCoder, RunContext
from notecoder.config import load_config
from notecoder.engine import make_llm

REPO = Path(__file__).resolve().parents[1]


def _notes(input_uri: str, column: str, n: int) -> list[str]:
    table = ds.dataset(input_uri, partitioning="hive").head(n, columns=[column])
    return [t for t in table.column(column).to_pylist() if t and t.strip()]


def _raw(llm, coder: NoteCoder, prompts: list[list[int]]) -> tuple[float, int]:
    batch = [{"prompt_token_ids": ids} for ids in prompts]
    started = time.perf_counter()
    outs = llm.generate(batch, coder.sampling, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
    return seconds, tokens


def _ours(coder: NoteCoder, texts: list[str]) -> tuple[float, int, float]:
    started = time.perf_counter()
    rows, engine_seconds = coder.code_notes(texts, list(range(len(texts))))
    seconds = time.perf_counter() - started
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    return seconds, tokens, engine_seconds


@click.command()
@click.option("--config", default=str(REPO / "configs" / "local.yaml"))
@click.option("--model", default=None, help="Model folder; default the demo model.")
@click.option("--input", "input_uri", default=None, help="Parquet file or folder.")
@click.option("--text-column", default="text")
@click.option("--notes", default=300, show_default=True)
@click.option("--repeat", default=3, show_default=True)
def main(config, model, input_uri, text_column, notes, repeat):
    """Raw vLLM against notecoder on the same notes and engine."""
    from notecoder.demo import build_demo_model, write_sample_archive

    work = Path(tempfile.mkdtemp(prefix="notecoder-bench-"))
    model = model or str(build_demo_model(work / "model"))
    input_uri = input_uri or str(write_sample_archive(work / "archive", notes=notes))
    cfg = load_config(config, {"model.path": model})
    texts = _notes(input_uri, text_column, notes)
    llm = make_llm(
        cfg, model, cfg.engine.device if cfg.engine.device != "auto" else "cpu"
    )
    ctx = RunContext("bench", "bench", model, str(work / "out"), "cpu")
    coder = NoteCoder(cfg, ctx, llm=llm)
    prompts = [coder.prompts.build(t).token_ids for t in texts]
    _raw(llm, coder, prompts[:8])  # warm-up: grammar compilation, caches
    click.echo(f"{len(texts)} notes, {repeat} rounds, best round shown")
    # Alternate the two so that caches and the machine's load treat them alike.
    raws, ourses = [], []
    for _ in range(repeat):
        raws.append(_raw(llm, coder, prompts))
        ourses.append(_ours(coder, texts))
    raw = min(raws, key=lambda r: r[0])
    ours = min(ourses, key=lambda r: r[0])
    overhead = ours[0] - ours[2]
    click.echo(
        f"raw vLLM    {raw[0]:8.2f} s  {len(texts) / raw[0]:9.1f} notes/s  "
        f"{raw[1] / raw[0]:10.1f} tokens/s"
    )
    click.echo(
        f"notecoder   {ours[0]:8.2f} s  {len(texts) / ours[0]:9.1f} notes/s  "
        f"{ours[1] / ours[0]:10.1f} tokens/s"
    )
    click.echo(
        f"notecoder inside generate: {ours[2]:.2f} s; "
        f"outside generate: {overhead:.2f} s "
        f"({100 * overhead / ours[0]:.1f}% of its time); "
        f"end to end vs raw: {100 * (ours[0] - raw[0]) / raw[0]:+.1f}%"
    )


if __name__ == "__main__":
    main()
