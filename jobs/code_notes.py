"""Ray job entry point: code a Parquet archive of clinical notes.

    python jobs/code_notes.py --config configs/local.yaml --input notes/ \
        --output coded/ --model PATH

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/code_notes.py --config configs/cluster.yaml ...

Submitted with ``--working-dir .``, the job finds the library in ``lib/`` of the
uploaded folder even where notecoder is not installed on the cluster's image; its
dependencies must be there (see README, "Running on a Ray cluster").
"""

import sys
from pathlib import Path

try:
    import notecoder  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import click

from notecoder.cli import job_options, run_from_options
from notecoder.clikit import fail_clearly


@click.command()
@job_options
@fail_clearly
def main(**options):
    """Code an archive of clinical notes; rerun the same command to resume."""
    run_from_options(**options)


if __name__ == "__main__":
    main()
