"""Gumbel-max sampling: the id of the largest scaled logit + Gumbel(0, 1) noise, per row.

argmax_i(scaled[b, i] + g[b, i]) with g ~ Gumbel(0, 1) is a draw from softmax(scaled[b]) (the
Gumbel-max trick). The noise of id i in row b is a hash of (seed[b], counter[b], i), so a row's
draw depends on nothing else in the batch and needs no generator state (murmur3's 32-bit
finalizer structure, in int64 arithmetic whose products stay below 2**63: the same integers on
every device). From the 32-bit hash h, u = (h + 0.5) / 2**32 is uniform in (0, 1), exact in fp64,
never 0 or 1; g = -log(E) with E = -log(u) taken in fp64 and rounded to fp32 (E keeps its relative
precision there), so g lies in [-3.14, 22.9] and two ids tie only when their hashes do (about
V / 2**32 of draws at the top). In fp32, u near 1 has steps of 2**-24: with 24 bits (until stop 16)
1 id in 2**24 got u = 1.0 and noise +inf (0.9% of draws at 151,936 ids picked an arbitrary id, a
suppressed one included), and 23 bits would still tie the top two ids in 1-2% of such draws.

- `gumbel_argmax_torch`, the reference: the noise as [B, V] temporaries, ~20 elementwise passes
  over int64 tensors. On CPU it runs in bands of the vocabulary sized to stay in cache.
- the Triton kernel: one program per row, looping over the vocabulary in tiles, the noise made in
  registers and reduced as it goes: it reads the logits once (B * V * 4 bytes) and writes B ids.
  At batch 256 and Qwen2-VL's 151,936 ids the reference moves ~6 GB (about 1.5 ms at an H200's
  bandwidth, against a 2.2 ms decode step), the kernel 0.16 GB. Estimated from bytes, not
  measured: no GPU was lent while it was written (tests/kernels/test_sampling_kernel.py checks
  it under the interpreter and compiles it for sm_90).

Ties go to the lower id, as argmax. The reference counts a NaN as the maximum (argmax's rule); the
kernel's `tl.max` may pass over a NaN: NaN logits (a broken model) pick some id either way.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dispatch import HAS_TRITON, use_triton

_MASK32 = (1 << 32) - 1
_SEED_MUL, _ID_MUL = 0x3C6EF35F, 0x2545F491  # row key = mix(seed * _SEED_MUL + counter); noise bits = mix(key * _ID_MUL + id)
_MIX1, _MIX2 = 0x7FEB352D, 0x446CA68B


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors (values < 2**32 after the first mask)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * _MIX1) & _MASK32
    x = ((x ^ (x >> 15)) * _MIX2) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, N] fp32 for token_ids [B, N] (or [1, N], the same ids for every row)
    of rows with seeds [B] at counters [B] (int64), written in place over one int64 temporary."""
    x = _hash32(seeds[:, None] * _SEED_MUL + counters[:, None]) * _ID_MUL + token_ids
    x.bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(_MIX1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(_MIX2).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return gumbel_from_bits(x)


def gumbel_from_bits(x: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (fp32, finite) from 32-bit hash values x (int64, 0 <= x < 2**32), increasing in x."""
    u = x.double().add_(0.5).mul_(1.0 / (1 << 32))  # uniform in (0, 1), never 0 or 1 (exact in fp64)
    return u.log_().neg_().float().log_().neg_()


# The CPU reference makes its noise this many elements at a time (a band of vocabulary ids across
# every row): its ~20 elementwise passes over int64 temporaries then stay in the core's caches. Over
# a whole [16, 151936] batch at once they spill to memory: 4x slower (2-core EPYC VM, torch 2.13,
# one thread; bands of 2**14 to 2**18 elements measured within 20% of each other).
CPU_NOISE_CHUNK = 1 << 16


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (int64 [B]) for logits [B, V] (any float dtype), the same index bit for
    bit (the first maximum; a NaN counts as the maximum, as in argmax), as a tensor on the logits'
    device (on CPU it shares the memory of `greedy_ids`' numpy array)."""
    return torch.as_tensor(greedy_ids(logits))


def greedy_ids(logits: torch.Tensor) -> np.ndarray | torch.Tensor:
    """`greedy_tokens` as a decode step reads it back: on CPU a numpy int64 array [B], elsewhere a
    tensor on the logits' device. Static shapes, no host sync.

    On CPU, logits go through numpy's argmax (16-bit ones converted to fp32 first: exact, order
    kept), which is vectorized where torch's argmax over the last dimension is a scalar loop
    (torch 2.13, numpy 2.4, the 2-core EPYC VM, one thread: [256, 640] 17 vs 150 us, [1, 151936]
    12 vs 127 us); the ids stay a numpy array, as the step's readback wants them: wrapping them
    in a tensor and unwrapping it again cost ~15 us of a batch-1 decode step's ~80 us of host work
    on the micro model (stop 18, alternating step by step; right after a forward every call runs
    several times slower than in a loop). Other devices take argmax in the logits' own dtype (no
    fp32 copy of a bf16 [B, V])."""
    if logits.is_cpu:
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return (logits.detach() if logits.requires_grad else logits).numpy().argmax(axis=-1).astype(np.int64, copy=False)
    return logits.argmax(dim=-1)


def gumbel_argmax_torch(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    rows, vocab = scaled.shape
    if scaled.device.type != "cpu" or rows * vocab <= CPU_NOISE_CHUNK:
        return greedy_tokens(gumbel_noise(seeds, counters, torch.arange(vocab, device=scaled.device)[None, :]).add_(scaled))
    width = max(1, CPU_NOISE_CHUNK // rows)
    best = torch.full((rows,), float("-inf"))
    token = torch.zeros(rows, dtype=torch.int64)
    for start in range(0, vocab, width):
        noisy = gumbel_noise(seeds, counters, torch.arange(start, min(start + width, vocab))[None, :]).add_(scaled[:, start : start + width])
        index = greedy_tokens(noisy)
        value = noisy.gather(1, index[:, None])[:, 0]
        better = ~(value <= best) & ~best.isnan()  # as argmax: an equal value further on loses, the first NaN wins
        best, token = torch.where(better, value, best), torch.where(better, index + start, token)
    return token


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix32(x):
        x = x & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x446CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(S, SEEDS, COUNTERS, OUT, V, stride_s, BLOCK_V: tl.constexpr):
        """One row: argmax over the vocabulary of scaled + noise, in tiles of BLOCK_V ids.

        Bytes: V * 4 read (the scaled logits), 8 written. Per id: ~15 int64 ops (the hash), one
        fp64 log and one fp32 log; no memory traffic besides the logits."""
        row = tl.program_id(0).to(tl.int64)
        key = _mix32(tl.load(SEEDS + row) * 0x3C6EF35F + tl.load(COUNTERS + row)) * 0x2545F491
        best = tl.full((), float("-inf"), tl.float32)
        best_id = tl.zeros((), tl.int64)
        for start in range(0, V, BLOCK_V):
            ids = start + tl.arange(0, BLOCK_V).to(tl.int64)
            inside = ids < V
            bits = _mix32(key + ids)
            u = (bits.to(tl.float64) + 0.5) * (1.0 / 4294967296.0)
            noisy = tl.load(S + row * stride_s + ids, mask=inside, other=float("-inf")) - tl.log((-tl.log(u)).to(tl.float32))
            noisy = tl.where(inside, noisy, float("-inf"))
            tile_best = tl.max(noisy, axis=0)
            tile_id = tl.argmax(noisy, axis=0).to(tl.int64)  # the first maximum of the tile
            better = tile_best > best  # strictly: an equal value in a later tile loses, as in argmax
            best_id = tl.where(better, start + tile_id, best_id)
            best = tl.where(better, tile_best, best)
        tl.store(OUT + row, best_id)


SAMPLE_BLOCK_V = 2048  # ids per tile: 16 per thread at 4 warps


def gumbel_argmax_triton(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    rows, vocab = scaled.shape
    if scaled.stride(-1) != 1:
        scaled = scaled.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=scaled.device)
    _gumbel_argmax_kernel[(rows,)](scaled, seeds.contiguous(), counters.contiguous(), out, vocab, scaled.stride(0),
                                   BLOCK_V=SAMPLE_BLOCK_V, num_warps=4)
    return out


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """A draw from softmax(scaled[b]) for each row: argmax over the vocabulary of scaled [B, V]
    fp32 + Gumbel noise keyed by (seeds[b], counters[b], id) (int64 [B] each, on the same device).
    Returns int64 [B]. Static shapes, no host sync (capturable)."""
    if use_triton(impl, scaled):
        return gumbel_argmax_triton(scaled, seeds, counters)
    return gumbel_argmax_torch(scaled, seeds, counters)
