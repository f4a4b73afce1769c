"""Config loading: every shipped file loads; bad keys and values are named."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from notecoder.cli import main
from notecoder.config import JobConfig, load_config, parse_override
from notecoder.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"local.yaml", "single-gpu.yaml", "cluster.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.sampling.temperature == 0.0


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  max_tokenz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sampling.max_tokenz'"):
        load_config(bad)


def test_unknown_section_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engines: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'engines'"):
        load_config(bad)


def test_bad_value_names_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output:\n  shape: triple\n")
    with pytest.raises(ConfigError, match=r"output.shape"):
        load_config(bad)


def test_rule_across_fields():
    with pytest.raises(ConfigError, match=r"max_tokens .* must be below"):
        load_config(None, {"sampling.max_tokens": 600, "model.max_model_len": 512})


def test_passthrough_cannot_repeat_id():
    with pytest.raises(ConfigError, match=r"passthrough_columns names 'note_id'"):
        load_config(None, {"input.passthrough_columns": ["note_id"]})


def test_not_yaml_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("/nonexistent/notecoder.yaml")


def test_overrides_beat_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("shard_rows: 10\nsampling:\n  max_tokens: 20\n")
    cfg = load_config(f, {"shard_rows": 99, "sampling.seed": 7, "engine.engines": None})
    assert cfg.shard_rows == 99
    assert cfg.sampling.seed == 7
    assert cfg.sampling.max_tokens == 20
    assert cfg.engine.engines == 1  # None means "not given": the default stays


def test_parse_override_reads_yaml_values():
    assert parse_override("sampling.max_tokens=32") == ("sampling.max_tokens", 32)
    assert parse_override("input.passthrough_columns=[a, b]") == (
        "input.passthrough_columns",
        ["a", "b"],
    )
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("no-equals-sign")


def test_cli_reports_config_error_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  max_model_length: 5\n")
    result = CliRunner().invoke(
        main, ["run", "--config", str(bad), "--input", "x", "--output", "y"]
    )
    assert result.exit_code != 0
    assert "unknown key 'model.max_model_length'" in result.output


def test_cli_names_missing_paths():
    result = CliRunner().invoke(main, ["run", "--input", "x"])
    assert result.exit_code != 0
    assert "--output" in result.output and "--model" in result.output


def test_every_field_is_described():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from walk(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field.description

    undocumented = [name for name, desc in walk(JobConfig) if not desc]
    assert undocumented == []
