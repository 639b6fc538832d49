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
gets a fresh random one when its sequence is made. top-k / top-p become one cutoff logit per row
(a sort of the vocabulary, values only), applied in vocabulary order; a batch without them skips
the sort, and the choice is the same argmax in vocabulary order either way. Cost at Qwen2-VL's
151,936 ids (CPU, one thread, batch 16, `benchmarks/test_bench_decode.py -k sampled`): ~1 ms a
row for the noise, ~4 ms a row for the sort; the LM head's logits of the decode step are reused.
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
    """Gumbel(0, 1) noise [B, N] fp32 for token_ids [B, N] (or [1, N], the same ids for every row)
    of rows with seeds [B] at counters [B] (int64). `_hash32` of the token ids keyed by the row,
    written in place over one [B, N] int64 temporary."""
    x = _hash32(seeds[:, None] * 0x3C6EF35F + counters[:, None]) * 0x2545F491 + token_ids
    x.bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(0x446CA68B).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    u = (x >> 8).float().add_(0.5).mul_(1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return u.log_().neg_().log_().neg_()


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    *,
    filtered: bool = True,
) -> torch.Tensor:
    """Tokens [B] int64 for logits [B, V] fp32 (suppression already applied).

    temperature [B] fp32 (0 = greedy row), top_k [B] int64 (0 = off), top_p [B] fp32, seeds [B] and
    counters [B] int64 (the request's seed, and how many trace tokens it has): all on the logits'
    device. Everything is vectorized over the batch; nothing syncs with the host.

    `filtered` (known on the host from the requests' parameters): False when no row sets top_k or
    top_p < 1, which skips the sort over the vocabulary that only the filters need. Either way a
    row's token is the same (the filters' cutoff is a value, applied in vocabulary order), so which
    path a batch takes never changes a request's trace.
    """
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if filtered:
        scaled = scaled.masked_fill_(scaled < filter_cutoffs(scaled, top_k, top_p)[:, None], float("-inf"))
    return torch.where(temperature > 0, gumbel_argmax(scaled, seeds, counters), greedy_tokens(logits))


def filter_cutoffs(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit each row keeps [B] (fp32) under top-k and top-p, for temperature-scaled
    logits [B, V] fp32, top_k [B] int64 (0 = off) and top_p [B] fp32 in (0, 1]: the logit of the
    last token kept in descending order, where top-k keeps the first top_k and top-p every token
    whose higher-ranked ones hold less than top_p of the probability (so at least one, and the
    token that crosses top_p too). A row keeps every token at or above its cutoff, so tokens tied
    with the last one kept are kept too (as transformers' TopKLogitsWarper does)."""
    ordered = _sorted_descending(scaled)
    probs = ordered.softmax(dim=-1)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    by_p = (top_p[:, None] >= 1) | (probs.cumsum(-1) - probs <= top_p[:, None])  # 1: all (a sum's rounding past 1 drops none)
    keep = ((top_k[:, None] == 0) | (rank < top_k[:, None])) & by_p
    return ordered.gather(1, keep.sum(-1, keepdim=True) - 1)[:, 0]  # keep is a prefix of each row, never empty


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row of x [B, V] sorted, largest first (values only). On CPU, fp32 rows go through
    numpy's sort (SIMD-vectorized), which measured 3x faster than `torch.sort`, whose indices
    nothing here needs (2-core EPYC VM, torch 2.13, numpy 2.4, one thread: [16, 151936] 60 vs 190 ms)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(x.detach().neg().numpy(), axis=-1)).neg_()
    return x.sort(dim=-1, descending=True).values


# The noise of a CPU sampling pass is made this many elements at a time (a band of vocabulary ids
# across every row): its ~20 elementwise passes over int64 temporaries then stay in the core's caches.
# Over a whole [16, 151936] batch at once they spill to memory: 4x slower (2-core EPYC VM, torch 2.13,
# one thread; bands of 2**14 to 2**18 elements measured within 20% of each other).
CPU_NOISE_CHUNK = 1 << 16


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of scaled [B, V] fp32 + Gumbel noise (`gumbel_noise` of each row's
    seed [B] and counter [B], int64, for token ids 0..V-1): int64 [B], a sample from softmax(scaled)
    (the Gumbel-max trick). On CPU the noise is made and reduced in cache-sized chunks of the
    vocabulary, each chunk's best kept (ties: the lower id, as argmax); on other devices in one pass."""
    rows, vocab = scaled.shape
    if scaled.device.type != "cpu" or rows * vocab <= CPU_NOISE_CHUNK:
        ids = torch.arange(vocab, device=scaled.device)[None, :]
        return greedy_tokens(scaled + gumbel_noise(seeds, counters, ids))
    width = max(1, CPU_NOISE_CHUNK // rows)
    best = torch.full((rows,), float("-inf"))
    token = torch.zeros(rows, dtype=torch.int64)
    for start in range(0, vocab, width):
        noisy = gumbel_noise(seeds, counters, torch.arange(start, min(start + width, vocab))[None, :]).add_(scaled[:, start : start + width])
        index = greedy_tokens(noisy)  # numpy's argmax: ~5x faster here than torch's max over a row
        value = noisy.gather(1, index[:, None])[:, 0]
        better = ~(value <= best) & ~best.isnan()  # as argmax: an equal value further on loses, the first NaN wins
        best, token = torch.where(better, value, best), torch.where(better, index + start, token)
    return token


def ends_with_stop(generated: list[int], stop_sequences: list[list[int]]) -> bool:
    """True when the generated ids end with any stop sequence (single tokens or multi-token markers)."""
    return any(len(s) <= len(generated) and generated[-len(s) :] == s for s in stop_sequences if s)
