"""Building the vLLM engine: arguments, CPU-build environment, sampling.

vLLM is imported lazily so that planning, reporting and evaluation work on a machine
(or a driver) without it.
"""

from __future__ import annotations

import os
from typing import Any

from notecoder.config import JobConfig
from notecoder.results import json_schema


def llm_kwargs(cfg: JobConfig, model_dir: str, device: str) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from the config."""
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": cfg.model.dtype,
        "max_model_len": cfg.model.max_model_len,
        "seed": cfg.sampling.seed,
        "enforce_eager": cfg.engine.enforce_eager,
        # Without this a weak or unsure model pads JSON with white space until
        # max_tokens; xgrammar is the backend that honours it.
        "structured_outputs_config": {
            "backend": "xgrammar",
            "disable_any_whitespace": True,
        },
    }
    if device == "cuda":
        kwargs["tensor_parallel_size"] = cfg.engine.gpus_per_engine
    kwargs.update(cfg.engine.extra_args)
    return kwargs


def cpu_engine_env(cfg: JobConfig, index: int, cores: int | None) -> dict[str, str]:
    """Environment for engine ``index`` on the CPU build.

    Each engine gets its own cores: without an explicit binding every engine on a node
    pins core 0 and they run one at a time.
    """
    per = cfg.engine.cpus_per_engine
    env = {
        "VLLM_CPU_KVCACHE_SPACE": _gib(cfg.engine.cpu_kv_cache_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    cores = cores or os.cpu_count() or 1
    first = (index * per) % cores
    last = first + per - 1
    if last < cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{last}" if per > 1 else str(first)
    return env


def _gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def common_engine_env() -> dict[str, str]:
    """Environment for every engine actor."""
    return {
        # The engine core runs inside the actor's process: one process per engine is
        # simpler to place, kill and replace than an actor with a child process.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's start-up chatter drowns the per-shard lines; its warnings still show.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


def make_llm(cfg: JobConfig, model_dir: str, device: str) -> Any:
    from vllm import LLM

    return LLM(**llm_kwargs(cfg, model_dir, device))


def sampling_params(cfg: JobConfig) -> Any:
    """vLLM sampling parameters: greedy and seeded unless configured otherwise."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if cfg.sampling.structured:
        schema = json_schema(cfg.output.shape, cfg.output.max_codes)
        structured = StructuredOutputsParams(json=schema)
    return SamplingParams(
        temperature=cfg.sampling.temperature,
        seed=cfg.sampling.seed,
        max_tokens=cfg.sampling.max_tokens,
        structured_outputs=structured,
    )
