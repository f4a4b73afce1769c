"""What every notecoder command shares: log set-up and turning errors into one line."""

from __future__ import annotations

import functools
import logging
import sys

import click

from notecoder.errors import NotecoderError


def setup_logging(level: str) -> None:
    """Log to stderr at ``level`` (DEBUG, INFO, WARNING, ERROR)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail_clearly(func):
    """Turn notecoder's own errors into one clear line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NotecoderError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper
