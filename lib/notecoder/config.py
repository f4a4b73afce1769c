"""Typed, closed configuration for a notecoder run.

A run is described by one YAML file (see ``configs/``) loaded into :class:`JobConfig`.
Every section rejects keys it does not know, so a misspelt setting fails loudly instead
of being ignored. Command-line options override the file through dotted paths
(``sampling.max_tokens=32``), applied before validation so the same rules hold.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from notecoder.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    """Where the notes are and which columns matter."""

    uri: str | None = Field(
        None,
        description="Parquet archive: a folder (Hive partitions allowed), a glob, one "
        "file, or an s3://bucket/prefix. Usually given with --input.",
    )
    id_column: str = Field("note_id", description="Column that identifies a note.")
    text_column: str = Field("text", description="Column holding the note text.")
    passthrough_columns: list[str] = Field(
        default_factory=list,
        description="Input columns copied unchanged into every output row.",
    )
    skip_coded: list[str] = Field(
        default_factory=list,
        description="Notes coded before, left out of this run: earlier notecoder "
        "outputs or Parquet ledgers of ids (folder, glob, file or s3://). Usually "
        "--skip-coded, for incremental nightly runs.",
    )


class OutputConfig(_Section):
    """Where coded rows go and what the model is asked to return."""

    uri: str | None = Field(
        None, description="Output folder or s3://bucket/prefix. Usually --output."
    )
    shape: Literal["single", "multi"] = Field(
        "single",
        description='"single": {"code", "confidence"}; "multi": '
        '{"codes": [{"code", "confidence"}, ...]}.',
    )
    max_codes: int = Field(
        20, ge=1, le=100, description="Most codes kept from one note (multi shape)."
    )
    ledger_uri: str | None = Field(
        None,
        description="Run ledger: folder or s3:// prefix where every run adds one small "
        "Parquet file of its totals (and `notecoder eval --record` its accuracy). "
        'Null puts it beside the output, in <output>/../_notecoder-ledger/; "" keeps '
        "no ledger. See notecoder.ledger.",
    )


class ModelConfig(_Section):
    """The fine-tuned model and how the engine loads it."""

    path: str | None = Field(
        None,
        description="Model folder or s3://bucket/prefix in Hugging Face layout. "
        "Usually --model.",
    )
    revision: str | None = Field(
        None, description="Free-text revision recorded in the audit trail."
    )
    dtype: str = Field(
        "auto", description='Weights dtype for vLLM: "auto", "bfloat16", "float32".'
    )
    max_model_len: int = Field(
        4096, ge=64, description="Context window in tokens (prompt plus output)."
    )
    system_prompt: str | None = Field(
        None,
        description="Optional system message. A fine-tuned model usually needs none.",
    )
    lora_path: str | None = Field(
        None,
        description="LoRA adapter applied to the model at `path`: a folder or "
        "s3://bucket/prefix in PEFT layout (adapter_config.json and "
        "adapter_model.safetensors). Null codes with the model as it is.",
    )
    # The ranks vLLM 0.32 builds LoRA kernels for (vllm.config.lora.MaxLoRARanks).
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16,
        description="Largest LoRA rank the engine reserves room for; at least the "
        "adapter's rank `r`. Used only with lora_path.",
    )


class SamplingConfig(_Section):
    """Decoding settings. Greedy and seeded by default, so reruns agree."""

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy.")
    seed: int = Field(0, description="Sampling seed; fixed so runs repeat.")
    max_tokens: int = Field(
        64, ge=1, description="Most tokens the model may write for one note."
    )
    structured: bool = Field(
        True,
        description="Constrain output to the JSON schema of the output shape. Off only "
        "for a model that reliably writes the JSON by itself.",
    )


class EngineConfig(_Section):
    """How many engines, on what, and anything else vLLM should be told."""

    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description='"cpu" for the vLLM CPU build, "cuda" for GPUs, "auto" picks '
        "cuda where the Ray cluster has GPUs.",
    )
    engines: int | None = Field(
        1,
        ge=1,
        description="Engine actors to start; null takes every GPU in the cluster "
        "divided by gpus_per_engine.",
    )
    gpus_per_engine: int = Field(
        1, ge=1, description="GPUs per engine (vLLM tensor_parallel_size)."
    )
    cpus_per_engine: int = Field(
        1, ge=1, description="CPU cores per engine on the CPU build (OpenMP threads)."
    )
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0, description="KV cache per engine on the CPU build, in GiB."
    )
    start_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="How long to wait for every engine to load (and for the cluster "
        "to have room for it) before the run fails.",
    )
    enforce_eager: bool = Field(
        False, description="Skip graph capture: faster start, slower decode."
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further keyword arguments passed as they are to vllm.LLM.",
    )


class CostConfig(_Section):
    """Prices used to turn measured time and tokens into dollars."""

    usd_per_accelerator_hour: float = Field(
        1.0, ge=0, description="What one GPU (or CPU engine) costs per hour."
    )
    baseline_usd_per_1k_input_tokens: float = Field(
        0.042, ge=0, description="Hosted-API price per 1K prompt tokens, to compare."
    )
    baseline_usd_per_1k_output_tokens: float = Field(
        0.042, ge=0, description="Hosted-API price per 1K completion tokens."
    )
    baseline_few_shot_tokens: int = Field(
        1000,
        ge=0,
        description="Few-shot example tokens the hosted API needs on every call.",
    )
    planning_tokens_per_second: float = Field(
        2000.0,
        gt=0,
        description="Tokens (prompt plus completion) one engine codes per second, for "
        "`notecoder plan` when no earlier run in --output measured it. Take the "
        "figure from `notecoder report` of a real run on your hardware.",
    )


class S3Config(_Section):
    """How to reach S3 or an S3-compatible store. Credentials are never set here: they
    come from the standard AWS chain (environment, profile, instance or pod role)."""

    endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store; null for AWS."
    )
    region: str | None = Field(None, description="Region; null takes the AWS chain's.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket addressing; some S3-compatible stores need path."
    )


class JobConfig(_Section):
    """A whole run."""

    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    s3: S3Config = Field(default_factory=S3Config)
    shard_rows: int = Field(
        1000,
        ge=1,
        description="Target rows per shard; shards are cut on row-group boundaries, "
        "so a shard holds at least one whole row group.",
    )
    max_shard_attempts: int = Field(
        3, ge=1, le=20, description="Tries per shard before it is reported failed."
    )

    @model_validator(mode="after")
    def _check_across_fields(self) -> JobConfig:
        if self.sampling.max_tokens >= self.model.max_model_len:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be below "
                f"model.max_model_len ({self.model.max_model_len}): the prompt needs "
                "room too"
            )
        cols = [self.input.id_column, self.input.text_column]
        for name in self.input.passthrough_columns:
            if name in cols:
                raise ValueError(
                    f"input.passthrough_columns names {name!r}, which is already the "
                    "id or text column; remove it from passthrough_columns"
                )
        if self.input.id_column == self.input.text_column:
            raise ValueError("input.id_column and input.text_column must differ")
        return self

    def require_paths(self) -> None:
        """Raise ConfigError unless input, output and model are all set."""
        missing = [
            flag
            for flag, value in (
                ("--input (input.uri)", self.input.uri),
                ("--output (output.uri)", self.output.uri),
                ("--model (model.path)", self.model.path),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                "missing "
                + ", ".join(missing)
                + ": set it in the config or on the command line"
            )


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML (numbers, true, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set takes key.path=value, got {text!r}")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """Load a YAML config, apply dotted overrides, and validate the result.

    ``overrides`` maps dotted keys to values; ``None`` values are skipped so that CLI
    options left unset do not clobber the file.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {source}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {source} must be a mapping of sections")
        data = copy.deepcopy(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}: remove it or check its spelling")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
    return f"config {source}: " + "; ".join(lines)
