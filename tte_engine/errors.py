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


class ModelOutputError(TTEError, RuntimeError):
    """The model gave an unusable result for one item (a NaN or inf embedding, or next-token logits
    of its trace: broken weights, or an overflow in 16 bits), after its work ran. `index` is the item's position in the batch,
    `reason` what went wrong. Not the input's fault: a server answers it with a 500 for that request."""

    def __init__(self, reason: str, index: int | None = None):
        self.index, self.reason = index, reason
        super().__init__(reason if index is None else f"item {index}: {reason}")


NON_FINITE_LOGITS = ("the model produced non-finite next-token logits (NaN or inf) while thinking, so no trace token could be "
                     "chosen: its weights hold NaN or inf, or a 16-bit forward overflowed")
NON_FINITE_EMBEDDING = ("the model produced a non-finite embedding (NaN or inf): its weights hold NaN or inf, or a 16-bit "
                        "forward overflowed")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`exc`'s message on one line (its lines joined, cut at `limit` characters), for a CheckpointError's text."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
