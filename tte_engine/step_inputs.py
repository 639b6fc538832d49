"""Step inputs as a GPU wants them: built in one vectorized pass, sent with one copy.

Every integer a step needs (token ids, positions, slot mapping, context lengths, block-table rows
and their updates, sampling parameters) is written into one pinned int64 host buffer and sent
to the device with one non-blocking copy; the step's tensors are views of the device buffer.
Two host buffers alternate so that writing one never races the copy still reading the other.
On a CPU engine the device buffer is host memory and steps run synchronously, so the step's
arrays are written straight into it and nothing is copied.

A pure decode step uses a fixed layout (`DecodeLayout`): the same device addresses for every
step of a batch bucket, padded to the bucket, so a captured CUDA graph reads its inputs there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# The int64 fields of a decode step, each `rows` long, in buffer order.
SAMPLING_FIELDS = ("seeds", "counters", "top_k", "temperature_bits", "top_p_bits")
ROW_FIELDS = ("input_ids", "positions", "slot_mapping", "context_lens", "table_rows")  # one integer per decode row
DECODE_FIELDS = ROW_FIELDS + ("update_index", "update_value") + SAMPLING_FIELDS


@dataclass(frozen=True)
class DecodeLayout:
    """Where each decode field sits in a buffer laid out for up to `rows` rows (the largest bucket)."""

    rows: int

    def field(self, name: str, batch: int | None = None) -> slice:
        """The first `batch` (default: all) entries of field `name`."""
        start = DECODE_FIELDS.index(name) * self.rows
        return slice(start, start + (self.rows if batch is None else batch))

    def row_fields(self, buffer: np.ndarray) -> np.ndarray:
        """The ROW_FIELDS of `buffer` as one [len(ROW_FIELDS), rows] view (they lead the layout)."""
        return buffer[: len(ROW_FIELDS) * self.rows].reshape(len(ROW_FIELDS), self.rows)

    @property
    def size(self) -> int:
        return len(DECODE_FIELDS) * self.rows

    def views(self, buffer: np.ndarray) -> DecodeViews:
        """The fields a decode step writes into `buffer` (at least `size` entries), as views."""
        return DecodeViews(buffer[: self.size], self.row_fields(buffer), buffer[self.field("update_index")], buffer[self.field("update_value")])


class DecodeViews(NamedTuple):
    """A host buffer's decode layout as views, made once per buffer (right after a forward, each
    slice or reshape of a step costs ~1 us)."""

    buffer: np.ndarray  # [DecodeLayout.size] int64: the whole layout
    row_fields: np.ndarray  # [len(ROW_FIELDS), rows]: `DecodeLayout.row_fields`
    update_index: np.ndarray  # [rows]: block-table updates, flat index
    update_value: np.ndarray  # [rows]: block-table updates, block id


def float_bits(values: np.ndarray) -> np.ndarray:
    """fp32 values as int64 holding their bit patterns (so floats ride in the int64 buffer)."""
    return values.astype(np.float32).view(np.int32).astype(np.int64)


def bits_float(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of `float_bits`, on the device: int64 bit patterns -> fp32."""
    return bits.to(torch.int32).view(torch.float32)


class StagingBuffer:
    """Pinned host int64 buffers (two, alternating) and one device buffer they are copied into."""

    def __init__(self, size: int, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._grow(size)

    def _grow(self, size: int) -> None:
        """(Re)allocate for `size` entries. Only a buffer no graph reads may grow: the decode buffer
        is sized for the largest bucket once."""
        self.device_buffer = torch.empty(size, dtype=torch.int64, device=self.device)
        self.capacity = size
        if self.device.type == "cpu":  # written in place: the step that reads it is over before the next write
            self._host = [self.device_buffer, self.device_buffer]
        else:
            self._host = [torch.empty(size, dtype=torch.int64, pin_memory=self.pinned) for _ in range(2)]
        self.host_arrays = [h.numpy() for h in self._host]  # what `host` hands out: numpy views of the same memory

    def host(self, size: int) -> np.ndarray:
        """The next host buffer as a numpy array of `size` entries, free to write."""
        if size > self.capacity:
            self._grow(max(size, 2 * self.capacity))
        return self.host_arrays[self.next_turn()][:size]

    def next_turn(self) -> int:
        """Switch to the other host buffer, once the copy that last read it is done, and return its
        index in `host_arrays` (whole, `capacity` entries), free to write. For a caller that keeps
        views of both buffers and never needs more than `capacity`. The wait never waits in a loop
        of decode steps: that copy was two steps ago, and the last step's token readback already
        waited for everything its stream ran before it (a decode step's one sync)."""
        self._turn ^= 1
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        return self._turn

    def send(self, size: int) -> None:
        """Copy the first `size` entries of the buffer `host()` returned to `device_buffer` (on a CPU
        engine they are there already)."""
        if self._host[self._turn] is self.device_buffer:
            return
        self.device_buffer[:size].copy_(self._host[self._turn][:size], non_blocking=True)
        if self.pinned:
            event = self._events[self._turn] or torch.cuda.Event()
            event.record()
            self._events[self._turn] = event


def pack(arrays: list[np.ndarray], out: np.ndarray) -> list[slice]:
    """Write int arrays back to back into `out`; returns each one's slice."""
    slices, at = [], 0
    for a in arrays:
        n = a.size
        out[at : at + n] = a.reshape(-1)
        slices.append(slice(at, at + n))
        at += n
    return slices
