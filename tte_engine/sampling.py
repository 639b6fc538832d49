"""Choosing the next trace token for a whole batch on the device: greedy by default, optional
temperature / top-k / top-p sampling.

Greedy decoding keeps embeddings deterministic. Vision placeholder tokens are never generated:
`suppress_` sets their logits to -inf before the choice, through a precomputed device index
(`suppressed_index`), so no step indexes by a Python list. (Until stop 15 an additive [V] mask
was added to every row: a pass over all B x V logits, where the fill writes B x k entries.)

Sampling is Gumbel-max: token = argmax(filtered logits / T + g), with g ~ Gumbel(0, 1) drawn per
(request seed, trace position, vocab id) by a counter-based hash. So a request's trace depends
only on its seed and its own logits, whatever else is in the batch and in whatever order, with
no per-request generator object and nothing read back from the device. A request without a seed
gets a fresh random one when its sequence is made.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def number(name, ok, what):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"SamplingParams.{name} must be {what}, got {value!r}")

        # the device computes in fp32: a larger temperature would be inf there (logits / inf: NaN)
        number("temperature", lambda v: 0 <= v <= _FP32_MAX, f"a number >= 0 (0 = greedy) and <= {_FP32_MAX:.7g} (fp32's largest)")
        number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draw_seed(self) -> int:
        """The seed a sequence samples with: the request's, or a fresh random one (31 bits)."""
        return (self.seed if self.seed is not None else random.getrandbits(31)) & _MASK31


_MASK31 = (1 << 31) - 1
_FP32_MAX = float(np.finfo(np.float32).max)
_MASK32 = (1 << 32) - 1


def suppressed_index(vocab_size: int, suppressed_ids: list[int], device) -> torch.Tensor:
    """The ids a trace must never contain that the vocabulary has, as an int64 device tensor [k]
    (sorted, unique) for `suppress_`."""
    return torch.tensor(sorted({i for i in suppressed_ids if 0 <= i < vocab_size}), dtype=torch.int64, device=device)


def suppress_(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] with column `index` (int64 [k], from `suppressed_index`) set to -inf, in place;
    returns `logits`. No host sync, static shapes (capturable in a CUDA graph)."""
    return logits.index_fill_(-1, index, float("-inf"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (int64 [B]) for logits [B, V], the same index bit for bit (the first
    maximum; a NaN counts as the maximum, as in argmax).

    On CPU, fp32 logits go through numpy's argmax, which is vectorized where torch's argmax over
    the last dimension is a scalar loop (torch 2.13, numpy 2.4, the 2-core EPYC VM, one thread:
    [256, 640] 17 vs 150 us, [1, 151936] 12 vs 127 us); the result shares numpy's memory. Other
    devices and dtypes use argmax itself. Static shapes, no host sync."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (murmur3's finalizer structure) on int64 tensors holding values < 2**32.

    Multipliers stay below 2**31 so no product overflows int64: exact on every device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x446CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, N] fp32 for token_ids [B, N] of rows with seeds [B] at counters [B] (int64)."""
    key = _hash32(seeds[:, None] * 0x3C6EF35F + counters[:, None])
    bits = _hash32(key * 0x2545F491 + token_ids)
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    """Tokens [B] int64 for logits [B, V] fp32 (suppression already applied).

    temperature [B] fp32 (0 = greedy row), top_k [B] int64 (0 = off), top_p [B] fp32, seeds [B] and
    counters [B] int64 (the request's seed, and how many trace tokens it has): all on the logits'
    device. Everything is vectorized over the batch; nothing syncs with the host.
    """
    greedy = greedy_tokens(logits)
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ((top_k[:, None] > 0) & (rank >= top_k[:, None])) | (probs.cumsum(-1) - probs > top_p[:, None])
    noisy = ordered.masked_fill(drop, float("-inf")) + gumbel_noise(seeds, counters, order)
    sampled = order.gather(1, greedy_tokens(noisy)[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def ends_with_stop(generated: list[int], stop_sequences: list[list[int]]) -> bool:
    """True when the generated ids end with any stop sequence (single tokens or multi-token markers)."""
    return any(len(s) <= len(generated) and generated[-len(s) :] == s for s in stop_sequences if s)
