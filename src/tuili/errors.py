"""Errors a user can act on: each message names the file or value and what to do."""


class TuiliError(Exception):
    """Base of tuili's user-facing errors; the CLI prints these without a traceback."""


class ModelFormatError(TuiliError, ValueError):
    """A checkpoint, config or tokenizer that tuili cannot read: the message names it."""


class DataError(TuiliError, ValueError):
    """Text data that cannot be read or is too short for what was asked."""
