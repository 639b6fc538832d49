"""The exceptions tte_engine raises. Callers catch these, never bare asserts or KeyErrors."""

from __future__ import annotations

import re


class TTEError(Exception):
    """Base class for every error tte_engine raises on purpose."""


class CheckpointError(TTEError):
    """A checkpoint or engine directory is missing, malformed, or not supported."""


class InvalidInputError(TTEError, ValueError):
    """An input item cannot be embedded (empty, undecodable image, too long, ...).

    `index` is the position of the bad item in the batch (None when the whole call is wrong),
    `reason` says what is wrong with it, and `field` names the item's bad field when one is to
    blame ("text", "image", "instruction", "trace"; None otherwise).
    """

    def __init__(self, reason: str, index: int | None = None, field: str | None = None):
        self.index = index
        self.reason = reason
        self.field = field
        super().__init__(reason if index is None else f"item {index}: {reason}")


class CapacityError(TTEError):
    """The KV cache or another budget is too small for the engine to run at all."""


class ExportError(TTEError):
    """`tte-export` cannot do what was asked (output directory taken or unwritable, bad option mix, ...)."""


class Cancelled(TTEError):
    """Work stopped because whoever asked for it is gone (a server's client disconnected); there is
    no one to report to, so this is not the item's error."""


class CacheError(TTEError):
    """The result cache file cannot be used (not a SQLite database, corrupt, written by another schema)."""


_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{8,}\b")


def describe(exc: BaseException) -> str:
    """`exc` as deterministic text for an error row: its type and message, object reprs and addresses removed."""
    text = _REPR.sub("<object>", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
