"""Building the vLLM engine: arguments, CPU-build environment, sampling.

vLLM is imported lazily so that planning, reporting and evaluation work on a machine
(or a driver) without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
        tp = cfg.engine.gpus_per_engine
        kwargs["tensor_parallel_size"] = tp
        if tp > 1:
            # The engine actor holds no GPU itself (see engine_placement): vLLM's
            # Ray executor starts one GPU worker actor per bundle of the placement
            # group the engine actor runs in. The "mp" executor would fork workers
            # onto whichever GPUs the node shows, not the ones Ray reserved.
            kwargs["distributed_executor_backend"] = "ray"
    if cfg.model.lora_path:
        # One adapter per run, so one adapter slot; rank is checked against the
        # adapter's own before any engine starts (modelref.resolve_adapter).
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = cfg.model.max_lora_rank
        kwargs["max_loras"] = 1
    kwargs.update(cfg.engine.extra_args)
    return kwargs


@dataclass(frozen=True)
class EnginePlacement:
    """The Ray resources one engine actor asks for."""

    num_cpus: float
    num_gpus: float
    # Placement-group bundles the actor and its vLLM workers run in, or None for a
    # plain actor. STRICT_PACK keeps them on one node: tensor parallelism across
    # nodes would put every layer's all-reduce on the network.
    bundles: tuple[dict[str, float], ...] | None = None
    strategy: str = "STRICT_PACK"

    def actor_options(self) -> dict[str, float]:
        """``num_cpus``/``num_gpus`` for ``ActorClass.options``."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def engine_placement(cfg: JobConfig, device: str) -> EnginePlacement:
    """What one engine actor asks Ray for, on the CPU build or on GPUs.

    One GPU: the actor holds it and vLLM runs in the actor's process. Several
    (``gpus_per_engine`` is vLLM's tensor_parallel_size): a placement group of one
    GPU bundle per tensor-parallel rank, the first bundle with a CPU for the actor
    itself (scheduler, tokenizer), which holds no GPU; vLLM's Ray executor finds the
    group from inside the actor and puts one worker on each GPU bundle.
    """
    if device == "cpu":
        return EnginePlacement(num_cpus=cfg.engine.cpus_per_engine, num_gpus=0)
    tp = cfg.engine.gpus_per_engine
    if tp == 1:
        return EnginePlacement(num_cpus=1, num_gpus=1)
    bundles = ({"GPU": 1.0, "CPU": 1.0},) + tuple({"GPU": 1.0} for _ in range(tp - 1))
    return EnginePlacement(num_cpus=1, num_gpus=0, bundles=bundles)


def engines_that_fit(node_gpus: list[float], gpus_per_engine: int) -> int:
    """How many engines of ``gpus_per_engine`` GPUs the nodes can hold at once.

    Counted node by node, not from the cluster's total: an engine's GPUs must share
    a node (STRICT_PACK), so four one-GPU nodes hold no two-GPU engine at all.
    """
    return sum(int(gpus) // gpus_per_engine for gpus in node_gpus)


def lora_request(adapter_dir: str) -> Any:
    """The vLLM request naming the run's one adapter (id 1: one adapter per run)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest("notecoder-adapter", 1, adapter_dir)


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
