"""Errors a user can act on: each message names the file or value and what to do."""


class TuiliError(Exception):
    """Base of tuili's user-facing errors; the CLI prints these without a traceback."""


class ModelFormatError(TuiliError, ValueError):
    """A checkpoint, config or tokenizer that tuili cannot read: the message names it."""


class DataError(TuiliError, ValueError):
    """Text data that cannot be read or is too short for what was asked."""


class RequestFailed(TuiliError, RuntimeError):
    """One generation request failed in its own work (sampling, detokenizing); the engine and the
    other requests went on. The message says what failed."""


class QueueTimeout(RequestFailed):
    """A request waited longer than the engine's `max_queue_time` without starting: the engine is
    overloaded. Nothing of it ran; retrying later (or on another replica) is safe."""
