"""The `notecoder` command line. Thin: options in, library calls, clear errors out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from notecoder.clikit import fail_clearly, setup_logging
from notecoder.config import ConfigError, JobConfig, load_config, parse_override

log = logging.getLogger("notecoder")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR_DEFAULT = ".demo"


def job_options(func):
    """The options shared by `notecoder run` and the Ray job entry point."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            help="YAML config (see configs/); options below override it.",
        ),
        click.option(
            "--input", "input_uri", help="Input archive: folder, glob, file or s3://."
        ),
        click.option("--output", "output_uri", help="Output folder or s3:// prefix."),
        click.option("--model", "model_path", help="Model folder or s3:// prefix."),
        click.option("--engines", type=int, help="Number of engine actors."),
        click.option("--shard-rows", type=int, help="Target rows per shard."),
        click.option(
            "--skip-coded",
            multiple=True,
            metavar="URI",
            help="Leave out notes coded before: an earlier output or a Parquet ledger "
            "of ids (repeatable; for incremental nightly runs).",
        ),
        click.option(
            "--new-run",
            is_flag=True,
            help="Start a new run in an output that holds another: its record moves "
            "to _notecoder/previous/<run id>/ and its parts are deleted.",
        ),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override any config key, e.g. --set sampling.max_tokens=32.",
        ),
        click.option(
            "--log-level",
            default="INFO",
            show_default=True,
            help="Log level on stderr (DEBUG, INFO, WARNING, ERROR).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def config_from_options(
    config_path: str | None,
    input_uri: str | None,
    output_uri: str | None,
    model_path: str | None,
    engines: int | None,
    shard_rows: int | None,
    sets: tuple[str, ...],
    skip_coded: tuple[str, ...] = (),
) -> JobConfig:
    overrides: dict[str, Any] = dict(parse_override(s) for s in sets)
    overrides.update(
        {
            "input.uri": input_uri,
            "output.uri": output_uri,
            "model.path": model_path,
            "engine.engines": engines,
            "shard_rows": shard_rows,
            "input.skip_coded": list(skip_coded) or None,
        }
    )
    return load_config(config_path, overrides)


def run_from_options(log_level: str, new_run: bool = False, **options: Any) -> None:
    """What `notecoder run` and `jobs/code_notes.py` do."""
    from notecoder.runner import run_job

    setup_logging(log_level)
    cfg = config_from_options(**options)
    run_job(cfg, echo=click.echo, new_run=new_run)


@click.group()
@click.version_option(package_name="notecoder")
def main() -> None:
    """Code clinical-note archives with a fine-tuned LLM, in batch, on vLLM and Ray."""


@main.command()
@job_options
@fail_clearly
def run(**options: Any) -> None:
    """Code an archive: plan, code every shard, commit, print the run summary.

    Running the same command again resumes: committed shards are skipped.
    """
    run_from_options(**options)


@main.command("demo-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@fail_clearly
def demo_model(out_dir: str) -> None:
    """Build the tiny demo model (deterministic, no download) into OUT_DIR."""
    from notecoder.demo import build_demo_model

    path = build_demo_model(out_dir)
    click.echo(f"demo model written to {path}")


@main.command("sample-archive")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--notes", default=300, show_default=True, help="How many notes.")
@fail_clearly
def sample_archive(out_dir: str, notes: int) -> None:
    """Write a synthetic archive of invented notes with gold codes into OUT_DIR."""
    from notecoder.demo import write_sample_archive

    path = write_sample_archive(out_dir, notes=notes)
    click.echo(f"sample archive written to {path}")


@main.command()
@click.option(
    "--dir",
    "demo_dir",
    default=DEMO_DIR_DEFAULT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo model, archive and output go.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    help="Log level on stderr (DEBUG, INFO, WARNING, ERROR).",
)
@fail_clearly
def demo(demo_dir: str, log_level: str) -> None:
    """Build the demo model and sample archive, then code it with configs/local.yaml."""
    from notecoder.demo import build_demo_model, write_sample_archive
    from notecoder.runner import run_job

    setup_logging(log_level)
    base = Path(demo_dir)
    # A second `make demo` reuses what the first built, so it resumes its run (and
    # shows that a rerun writes nothing) instead of refusing a rewritten input.
    model = base / "model"
    if not (model / "config.json").is_file():
        model = build_demo_model(model)
    archive = base / "archive"
    if not archive.is_dir():
        archive = write_sample_archive(archive)
    config = _shipped_config("local.yaml")
    cfg = config_from_options(
        config,
        str(archive),
        str(base / "output"),
        str(model),
        None,
        None,
        ("input.passthrough_columns=[claim_id, facility]",),
    )
    run_job(cfg, echo=click.echo)
    click.echo(f"coded rows: {base / 'output'}")


def _shipped_config(name: str) -> str | None:
    path = REPO_ROOT / "configs" / name
    if path.is_file():
        return str(path)
    raise ConfigError(f"configs/{name} not found next to the notecoder package")


# plan, report and eval live in notecoder.commands (issue 5); added once main exists.
from notecoder.commands import register  # noqa: E402

register(main)
