"""Coding notes: one engine, shards in, committed parts out.

:class:`NoteCoder` codes a table of notes (batch in, batch out, one row out per row
in). :class:`ShardCoder` wraps it with the reading and committing of one shard, and is
what each Ray actor hosts (``CoderActor``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from notecoder import engine as engine_mod
from notecoder.commit import OutputLayout
from notecoder.config import JobConfig
from notecoder.incremental import drop_skipped
from notecoder.plan import Shard, read_shard
from notecoder.prompts import PromptBuilder
from notecoder.results import RowResult, build_table, judge
from notecoder.s3model import ensure_local_model
from notecoder.storage import S3Settings, Storage
from notecoder.tally import ShardTally

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every engine needs to know about the run it serves."""

    run_id: str
    model_label: str  # goes into every row's `model` column
    model_dir: str  # local folder the engine loads
    output_uri: str
    device: str  # "cpu" or "cuda"
    s3: S3Settings = S3Settings()
    model_source: str = ""  # as configured; an s3:// model is fetched on each node
    model_hash: str = ""  # the content hash in run.json, checked after a fetch
    # The LoRA adapter (model.lora_path), if any, held like the model: as
    # configured, where the driver found it, and its content hash.
    lora_source: str = ""
    lora_dir: str = ""
    lora_hash: str = ""


class NoteCoder:
    """A vLLM engine and everything needed to turn notes into coded rows."""

    def __init__(self, cfg: JobConfig, ctx: RunContext, llm: Any | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.llm = (
            llm
            if llm is not None
            else engine_mod.make_llm(cfg, ctx.model_dir, ctx.device)
        )
        self.sampling = engine_mod.sampling_params(cfg)
        # Passed only with an adapter, so an engine built without enable_lora (and
        # the fakes of the unit tests) never sees the argument.
        self.generate_kwargs: dict[str, Any] = {}
        if ctx.lora_dir:
            self.generate_kwargs["lora_request"] = engine_mod.lora_request(ctx.lora_dir)
        budget = cfg.model.max_model_len - cfg.sampling.max_tokens
        self.prompts = PromptBuilder(
            self.llm.get_tokenizer(), cfg.model.system_prompt, budget
        )

    def code_notes(
        self, texts: list[str | None], ids: list[Any]
    ) -> tuple[list[RowResult], float]:
        """One RowResult per note, in order, and the seconds spent generating.

        Never raises for a single bad note: it gets the status ``error``.
        """
        results: list[RowResult | None] = [None] * len(texts)
        prompts, slots = [], []
        for i, text in enumerate(texts):
            if text is None or not str(text).strip():
                results[i] = RowResult("empty_note", error="note has no text")
                continue
            try:
                prompt = self.prompts.build(str(text))
            except Exception as exc:  # one bad note must not fail its shard
                results[i] = _row_error(ids[i], "building the prompt", exc)
                continue
            prompts.append(prompt)
            slots.append(i)
        started = time.perf_counter()
        outputs = self._generate(
            [p.token_ids for p in prompts], [ids[i] for i in slots]
        )
        engine_seconds = time.perf_counter() - started
        for prompt, slot, out in zip(prompts, slots, outputs, strict=True):
            results[slot] = self._judge(prompt, out, ids[slot])
        return [r for r in results if r is not None], engine_seconds

    def _generate(self, token_ids: list[list[int]], ids: list[Any]) -> list[Any]:
        """Generate the whole batch at once; on failure, note by note to isolate it."""
        if not token_ids:
            return []
        batch = [{"prompt_token_ids": t} for t in token_ids]
        try:
            return self.llm.generate(
                batch, self.sampling, use_tqdm=False, **self.generate_kwargs
            )
        except Exception as exc:
            log.warning(
                "batch of %d notes failed in the engine (%s); retrying one by one",
                len(batch),
                type(exc).__name__,
            )
        outputs = []
        for one, note_id in zip(batch, ids, strict=True):
            try:
                outputs.append(
                    self.llm.generate(
                        [one], self.sampling, use_tqdm=False, **self.generate_kwargs
                    )[0]
                )
            except Exception as exc:
                outputs.append(_row_error(note_id, "generating", exc))
        return outputs

    def _judge(self, prompt: Any, out: Any, note_id: Any) -> RowResult:
        if isinstance(out, RowResult):
            out.prompt_tokens = len(prompt.token_ids)
            out.note_truncated = prompt.truncated
            return out
        try:
            completion = out.outputs[0]
            row = judge(
                completion.text,
                completion.finish_reason,
                self.cfg.output.shape,
                self.cfg.output.max_codes,
            )
            row.completion_tokens = len(completion.token_ids)
        except Exception as exc:
            row = _row_error(note_id, "reading the answer", exc)
        row.prompt_tokens = len(prompt.token_ids)
        row.note_truncated = prompt.truncated
        return row


def _row_error(note_id: Any, stage: str, exc: Exception) -> RowResult:
    # The exception text could quote the note (a tokenizer error, say): only its type
    # goes into the row and the log.
    log.warning("note %s: %s failed (%s)", note_id, stage, type(exc).__name__)
    return RowResult("error", error=f"{stage} failed: {type(exc).__name__}")


class ShardCoder:
    """Reads, codes and commits whole shards with one engine."""

    def __init__(
        self,
        cfg: JobConfig,
        ctx: RunContext,
        llm: Any | None = None,
        skip_ids: Any | None = None,
    ):
        self.cfg = cfg
        self.storage = Storage(ctx.s3)
        if llm is None and ctx.model_source:
            # The driver's model_dir is a path on the driver's node.
            local = ensure_local_model(
                self.storage, ctx.model_source, ctx.model_dir, ctx.model_hash
            )
            ctx = dataclasses.replace(ctx, model_dir=local)
        if llm is None and ctx.lora_source:
            # The adapter too is fetched (s3://) or looked for (a folder) per node.
            lora = ensure_local_model(
                self.storage, ctx.lora_source, ctx.lora_dir, ctx.lora_hash
            )
            ctx = dataclasses.replace(ctx, lora_dir=lora)
        self.ctx = ctx
        self.skip_ids = skip_ids  # ids coded by earlier runs (--skip-coded)
        self.layout = OutputLayout(self.storage, ctx.output_uri)
        self.coder = NoteCoder(cfg, ctx, llm)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> str:
        """Answers once the engine is loaded; the driver waits on it."""
        return self.worker

    def code_shard(self, shard: Shard, attempt: int = 1) -> ShardTally:
        """Code one shard and commit it; returns its tally."""
        cfg = self.cfg.input
        tally = ShardTally(
            shard.shard_id, shard.file_uri, attempt=attempt, worker=self.worker
        )
        tally.started_at = time.time()
        t0 = time.perf_counter()
        keep = [cfg.id_column, *cfg.passthrough_columns]
        table = read_shard(self.storage, shard, [*keep, cfg.text_column])
        table, tally.skipped = drop_skipped(table, cfg.id_column, self.skip_ids)
        tally.read_seconds = time.perf_counter() - t0
        texts = table.column(cfg.text_column).to_pylist()
        ids = table.column(cfg.id_column).to_pylist()
        rows, tally.engine_seconds = self.coder.code_notes(texts, ids)
        out = build_table(
            table.select(keep),
            keep,
            rows,
            self.ctx.model_label,
            self.ctx.run_id,
            shard.shard_id,
        )
        _fill_counts(tally, rows)
        t1 = time.perf_counter()
        self.layout.write_part(out, shard.shard_id)
        tally.write_seconds = time.perf_counter() - t1
        tally.wall_seconds = time.perf_counter() - t0
        tally.finished_at = time.time()
        self.layout.write_marker(tally, self.ctx.run_id)
        return tally


def _fill_counts(tally: ShardTally, rows: list[RowResult]) -> None:
    tally.rows = len(rows)
    tally.statuses = dict(Counter(r.status for r in rows))
    tally.prompt_tokens = sum(r.prompt_tokens for r in rows)
    tally.completion_tokens = sum(r.completion_tokens for r in rows)
    tally.truncated_notes = sum(1 for r in rows if r.note_truncated)


def coder_actor_class() -> Any:
    """The Ray actor class hosting a ShardCoder (Ray imported lazily)."""
    import ray

    return ray.remote(ShardCoder)
