"""The `notecoder plan`, `report` and `eval` commands: before and after a run.

Thin, like the rest of the command line: options in, a library call
(:mod:`notecoder.estimate`, :mod:`notecoder.report`, :mod:`notecoder.evaluate`,
:mod:`notecoder.ledger`), text or JSON out, notecoder's errors turned into one line
and exit status 1. None of them starts an engine or Ray. ``register`` adds them to
the ``notecoder`` group (cli.py calls it).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.clikit import fail_clearly, setup_logging
from notecoder.config import load_config, parse_override
from notecoder.errors import StorageError
from notecoder.storage import S3Settings, Storage

READ_THREADS = 16
PREDICTION_COLUMNS = ("codes", "primary_code", "status")


def register(group: click.Group) -> None:
    """Add plan, report and eval to the ``notecoder`` command group."""
    for command in (plan, report, eval_command):
        group.add_command(command)


def _storage(config_path: str | None) -> Storage:
    """Storage with the S3 settings of ``config_path`` (AWS defaults without one)."""
    if config_path is None:
        return Storage()
    s3 = load_config(config_path).s3
    return Storage(S3Settings(s3.endpoint_url, s3.region, s3.addressing_style))


_CONFIG_FOR_S3 = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="A run config, read only for its s3 section (an S3-compatible endpoint).",
)
_LOG_LEVEL = click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    help="Log level on stderr (DEBUG, INFO, WARNING, ERROR).",
)


# -- plan -----------------------------------------------------------------------------


@click.command("plan")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML config (see configs/), as for `notecoder run`.",
)
@click.option(
    "--input", "input_uri", help="Input archive: folder, glob, file or s3://."
)
@click.option("--model", "model_path", help="Model folder or s3:// prefix.")
@click.option(
    "--output",
    "output_uri",
    help="Output of an earlier run: its committed shards are left out, and its "
    "measured throughput and completion lengths replace the guesses.",
)
@click.option(
    "--tokens-per-second",
    type=float,
    help="Tokens one engine codes per second; wins over a measured figure. Default: "
    "the last run in --output, else cost.planning_tokens_per_second.",
)
@click.option(
    "--sample",
    "sample_notes",
    type=int,
    default=256,
    show_default=True,
    help="Notes to tokenize for the prompt-token estimate.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. --set engine.engines=8.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")
@_LOG_LEVEL
@fail_clearly
def plan(
    config_path: str | None,
    input_uri: str | None,
    model_path: str | None,
    output_uri: str | None,
    tokens_per_second: float | None,
    sample_notes: int,
    sets: tuple[str, ...],
    as_json: bool,
    log_level: str,
) -> None:
    """Estimate a run before starting it: notes, tokens, engine-hours and dollars.

    Reads only Parquet footers and the text of a sample of notes, tokenized with the
    model's own tokenizer and chat template; no engine starts and no weights are
    read. Prices the work on your engines and at the hosted-API baseline.
    """
    from notecoder.estimate import estimate, format_plan, plan_json

    setup_logging(log_level)
    overrides: dict[str, Any] = dict(parse_override(s) for s in sets)
    overrides.update(
        {"input.uri": input_uri, "model.path": model_path, "output.uri": output_uri}
    )
    cfg = load_config(config_path, overrides)
    result = estimate(
        cfg, sample_notes=sample_notes, tokens_per_second=tokens_per_second
    )
    click.echo(plan_json(result) if as_json else format_plan(result))


# -- report ---------------------------------------------------------------------------


@click.command("report")
@click.argument("output", required=False)
@click.option(
    "--history",
    "history_uri",
    metavar="LEDGER_URI",
    help="A run ledger (output.ledger_uri; by default _notecoder-ledger/ beside the "
    "outputs): show cost, throughput and F1 run after run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, not tables.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML page with the picture.",
)
@click.option(
    "--png",
    "png_path",
    type=click.Path(dir_okay=False),
    help="Also write the picture as PNG.",
)
@_CONFIG_FOR_S3
@_LOG_LEVEL
@fail_clearly
def report(
    output: str | None,
    history_uri: str | None,
    as_json: bool,
    html_path: str | None,
    png_path: str | None,
    config_path: str | None,
    log_level: str,
) -> None:
    """Report on the run in OUTPUT, finished or not: progress, cost, slow shards.

    Reads only the output's run record and commit markers. With --history, adds the
    trend of earlier runs from a run ledger; OUTPUT may then be left out.
    """
    from notecoder import report as report_mod
    from notecoder.ledger import format_history, read_history

    setup_logging(log_level)
    if output is None and history_uri is None:
        raise click.UsageError("give OUTPUT, --history LEDGER_URI, or both")
    storage = _storage(config_path)
    run = report_mod.build_report(storage, output) if output else None
    history = read_history(storage, history_uri) if history_uri else None
    if as_json:
        click.echo(report_mod.report_json(run, history))
    else:
        texts = [report_mod.format_run_report(run)] if run else []
        texts += [format_history(history)] if history else []
        click.echo("\n\n".join(texts))
    if png_path:
        Path(png_path).write_bytes(report_mod.render_png(run, history))
        click.echo(f"picture written to {png_path}", err=True)
    if html_path:
        Path(html_path).write_text(report_mod.render_html(run, history))
        click.echo(f"page written to {html_path}", err=True)


# -- eval -----------------------------------------------------------------------------


@click.command("eval")
@click.option(
    "--predictions",
    "predictions_uri",
    required=True,
    metavar="OUTPUT",
    help="A notecoder output; only its committed parts are read.",
)
@click.option(
    "--gold",
    "gold_uri",
    required=True,
    metavar="GOLD",
    help="Parquet file, folder or glob of note ids with a list of gold codes each.",
)
@click.option(
    "--id-column",
    default="note_id",
    show_default=True,
    help="Column naming the note, in both tables.",
)
@click.option(
    "--gold-column",
    default="gold_icd10",
    show_default=True,
    help="Gold column: a list of code strings.",
)
@click.option(
    "--predicted-codes",
    type=click.Choice(["all", "valid"]),
    default="all",
    show_default=True,
    help="Score every code the model wrote, or only codes valid in ICD-10-CM.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")
@click.option(
    "--record",
    is_flag=True,
    help="Add the scores to the run ledger, next to the run's cost and throughput.",
)
@click.option(
    "--ledger",
    "ledger_uri",
    metavar="LEDGER_URI",
    help="Ledger for --record; default: the one the run in OUTPUT writes to.",
)
@_CONFIG_FOR_S3
@_LOG_LEVEL
@fail_clearly
def eval_command(
    predictions_uri: str,
    gold_uri: str,
    id_column: str,
    gold_column: str,
    predicted_codes: str,
    as_json: bool,
    record: bool,
    ledger_uri: str | None,
    config_path: str | None,
    log_level: str,
) -> None:
    """Score a run's codes against gold codes: micro and macro F1, primary match.

    Notes are matched by id; every figure is over the gold notes (see
    notecoder.evaluate for the definitions).
    """
    from notecoder.evaluate import evaluate, format_report

    setup_logging(log_level)
    storage = _storage(config_path)
    predictions = read_predictions(storage, predictions_uri, id_column)
    gold = read_gold(storage, gold_uri, id_column, gold_column)
    result = evaluate(
        predictions, gold, id_column, gold_column, predicted_codes=predicted_codes
    )
    text = json.dumps(result.to_dict(), indent=2) if as_json else format_report(result)
    click.echo(text)
    if record:
        written = _record(storage, predictions_uri, ledger_uri, result, gold_uri)
        click.echo(f"recorded in the run ledger: {written}", err=True)


def read_predictions(storage: Storage, output_uri: str, id_column: str) -> pa.Table:
    """The committed rows of an output, only the columns scoring needs."""
    from notecoder.commit import OutputLayout

    parts = OutputLayout(storage, output_uri).committed_parts()
    if not parts:
        raise StorageError(
            f"{output_uri} has no committed parts: give the --output of a run that "
            "committed at least one shard"
        )
    return _read_tables(storage, parts, [id_column, *PREDICTION_COLUMNS])


def read_gold(
    storage: Storage, gold_uri: str, id_column: str, gold_column: str
) -> pa.Table:
    """The id and gold columns of a Parquet file, folder or glob."""
    from notecoder.plan import find_files

    files = [e.uri for e in find_files(storage, gold_uri)]
    if not files:
        raise StorageError(f"no Parquet files at {gold_uri}: check --gold")
    table = _read_tables(storage, files, [id_column, gold_column])
    return _plain_string_lists(table, gold_column)


def _plain_string_lists(table: pa.Table, column: str) -> pa.Table:
    # polars writes lists of strings as large_list<large_string>, which evaluate()
    # does not take for gold; the codes are the same, so they are cast.
    if column not in table.column_names:
        return table
    kind = table.schema.field(column).type
    large = pa.large_list(pa.large_string()), pa.large_list(pa.string())
    if kind in large or kind == pa.list_(pa.large_string()):
        index = table.column_names.index(column)
        cast = table.column(column).cast(pa.list_(pa.string()))
        table = table.set_column(index, column, cast)
    return table


def _read_tables(storage: Storage, uris: list[str], columns: list[str]) -> pa.Table:
    with ThreadPoolExecutor(min(READ_THREADS, len(uris))) as pool:
        tables = list(pool.map(lambda u: _read_columns(storage, u, columns), uris))
    return pa.concat_tables(tables, promote_options="permissive")


def _read_columns(storage: Storage, uri: str, columns: list[str]) -> pa.Table:
    # Only the columns a file has: a missing one is then reported by evaluate(),
    # which names the table and the column.
    try:
        with storage.open_input(uri) as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            return parquet.read(columns=present)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(
            f"{uri} is not readable Parquet ({type(exc).__name__})"
        ) from None


def _record(
    storage: Storage,
    output_uri: str,
    ledger_uri: str | None,
    result: Any,
    gold_uri: str,
) -> str:
    from notecoder.commit import OutputLayout
    from notecoder.ledger import ledger_uri_of_run, record_eval

    layout = OutputLayout(storage, output_uri)
    manifest = layout.read_json(layout.run_file)
    if manifest is None:
        raise StorageError(
            f"{output_uri} has no _notecoder/run.json, so no run to record against"
        )
    uri = ledger_uri or ledger_uri_of_run(manifest, output_uri)
    if uri is None:
        raise StorageError(
            "the run keeps no ledger (output.ledger_uri is empty): pass --ledger"
        )
    return record_eval(storage, uri, manifest["run_id"], result, gold_uri)
