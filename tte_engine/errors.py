"""The exceptions tte_engine raises. Callers catch these, never bare asserts or KeyErrors."""

from __future__ import annotations


class TTEError(Exception):
    """Base class for every error tte_engine raises on purpose."""


class CheckpointError(TTEError):
    """A checkpoint or engine directory is missing, malformed, or not supported."""


class InvalidInputError(TTEError, ValueError):
    """An input item cannot be embedded (empty, undecodable image, too long, ...).

    `index` is the position of the bad item in the batch (None when the whole call is wrong)
    and `reason` says what is wrong with it.
    """

    def __init__(self, reason: str, index: int | None = None):
        self.index = index
        self.reason = reason
        super().__init__(reason if index is None else f"item {index}: {reason}")


class CapacityError(TTEError):
    """The KV cache or another budget is too small for the engine to run at all."""


class ExportError(TTEError):
    """`tte-export` cannot do what was asked (output directory taken or unwritable, bad option mix, ...)."""
