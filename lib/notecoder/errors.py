"""The exceptions notecoder raises.

Every message names what to change (a config key, a CLI option, a file) and never
carries note text: notes are PHI, ids and counts are not.
"""


class NotecoderError(Exception):
    """Base class: a problem the user can fix; the CLI prints it and exits non-zero."""


class ConfigError(NotecoderError):
    """A config file or option is missing, malformed or inconsistent."""


class PlanError(NotecoderError):
    """The input archive cannot be planned: no files, a missing column, a bad file."""


class StorageError(NotecoderError):
    """A file or object could not be read or written."""


class OutputMismatchError(NotecoderError):
    """The output already holds a run made with other settings; mixing is refused."""


class ModelError(NotecoderError):
    """The model folder or prefix cannot be used."""


class ShardsFailedError(NotecoderError):
    """Some shards failed on every attempt; the others were committed."""

    def __init__(self, message: str, failed: list[str]):
        super().__init__(message)
        self.failed = failed
