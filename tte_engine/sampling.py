"""Choosing the next trace token for a whole batch on the device: greedy by default, optional
temperature / top-k / top-p sampling.

Greedy decoding keeps embeddings deterministic. Vision placeholder tokens are never generated:
`Suppression` sets their logits to -inf before the choice, through a precomputed device index
(on a CPU engine: precomputed flat positions in numpy), so no step indexes by a Python list.
(Until stop 15 an additive [V] mask was added to every row: a pass over all B x V logits, where
the fill writes B x k entries. An additive -inf, in the LM head's bias, was tried in stop 17 and
dropped: a NaN or inf raw logit, from a broken or uninitialised weight row, plus -inf is NaN, and
argmax takes NaN as the largest.) A row whose largest logit is not finite (NaN or inf: broken
weights, a 16-bit overflow) gets NO_TOKEN in place of a token, checked on the device beside the
choice (no extra readback): the scheduler ends that sequence with an error, never a trace of
garbage ids.

Sampling is Gumbel-max: token = argmax(filtered logits / T + g), with g ~ Gumbel(0, 1) drawn per
(request seed, trace position, vocab id) by a counter-based hash. So a request's trace depends
only on its seed and its own logits, whatever else is in the batch and in whatever order, with
no per-request generator object and nothing read back from the device. (Its logits themselves
may differ in the last bits from batch to batch, as batched GEMMs and attention's split count
round differently: a draw changes only at such a near-tie.) A request without a seed
gets a fresh random one when its sequence is made. top-k / top-p become one cutoff logit per row
(a sort of the vocabulary, values only), applied in vocabulary order; a batch without them skips
the sort, and the choice is the same argmax in vocabulary order either way. Cost at Qwen2-VL's
151,936 ids (CPU, one thread, batch 16, `benchmarks/test_bench_decode.py -k sampled`): ~1 ms a
row for the noise, ~4 ms a row for the sort; an eager decode step samples from its own logits. The
Gumbel-max pass (`kernels.sampling`) is one Triton kernel on CUDA.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .kernels.sampling import greedy_ids, greedy_tokens, gumbel_argmax


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its trace tokens (the fields of OpenAI's and vLLM's sampling options).

    temperature: 0 = greedy (the default: deterministic traces and embeddings; unlike OpenAI's
        and vLLM's 1.0, so top_k, top_p or seed set without a temperature warn), else logits are
        divided by it before sampling; at most fp32's largest. top_k: keep the k largest logits
        (and any tied with the k-th); 0 = off. top_p: keep the smallest set of the largest whose
        probability reaches it, in (0, 1]; 1 = off. seed: any integer (see `draw_seed`); None = a
        fresh random one per request. Raises ValueError naming the field for a value outside these.
    """

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
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**63:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off) and < 2**63, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        unused = [name for name, off in (("top_k", 0), ("top_p", 1.0), ("seed", None)) if getattr(self, name) != off]
        if self.greedy and unused:  # vLLM and OpenAI default to temperature 1; ours is greedy
            given = ", ".join(f"{name}={getattr(self, name)!r}" for name in unused)
            warnings.warn(f"SamplingParams({given}) with temperature 0 (greedy, the default) decodes greedily: "
                          f"{', '.join(unused)} change nothing; set temperature > 0 to sample", UserWarning, stacklevel=3)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draw_seed(self) -> int:
        """The seed a sequence samples with, in [0, 2**31) (the noise hash's key, `kernels.sampling`,
        mixes 32 bits): the request's seed as given when it is in that range, any other integer
        (negative, or OpenAI's int64 seeds) hashed into it, so that neighbours such as 0 and 2**31
        do not share a stream (any two seeds still may, one time in 2**31); a fresh random one
        without a seed."""
        if self.seed is None:
            return random.getrandbits(31)
        if 0 <= self.seed <= _MASK31:
            return self.seed
        digest = hashlib.blake2b(self.seed.to_bytes((self.seed.bit_length() + 8) // 8, "little", signed=True), digest_size=4).digest()
        return int.from_bytes(digest, "little") & _MASK31


NO_TOKEN = -1  # the id a step gives a row whose logits are not finite (no token can be chosen): that sequence's error
_MASK31 = (1 << 31) - 1
_FP32_MAX = float(np.finfo(np.float32).max)
_FP32_TINY = float(np.finfo(np.float32).tiny)  # the smallest temperature divided by (a smaller one would be inf)


class Suppression:
    """The ids a trace must never contain (vision placeholders; a reasoner's ids past the embedder's
    vocabulary), set to -inf in next-token logits [B, V] before any choice, and the greedy choice
    after it. Made for logits of one dtype on one device (the LM head's).

    `apply_` writes -inf over whatever the LM head gave those columns (NaN or inf too: an additive
    -inf would leave NaN + -inf = NaN, which argmax takes as the largest). On a GPU it is one
    `index_fill_` through a precomputed device index (no host sync, static shapes: capturable in a
    CUDA graph), and `greedy` takes torch's argmax in the logits' own dtype. For fp32 logits on the
    CPU both work on the logits' memory as a numpy array: the fill is an assignment at flat
    positions worked out once (for the largest batch seen; a batch of B rows reads the first B * k;
    see `_put`), and the greedy
    ids are numpy's argmax of the same array (numpy's is vectorized where torch's over the last
    dimension is a scalar loop; see `kernels.sampling.greedy_ids`), left a numpy array for the
    step's readback. Which of the two a call takes is settled when the object is made, not checked
    per call: right after a forward, each small check and op costs several microseconds. Measured
    alternating step by step (stop 19, the 2-core Xeon VM, micro model, one thread): the host work
    beside a decode step's forward 0.89-0.92 / 0.93 / 0.92-0.95 of a torch `index_fill_` then
    `greedy_ids` at batch 1 / 64 / 256 (a per-call check of the logits' dtype and device alone
    cost ~5% at batch 1); stop 20's assignment in place of `put`: a further 0.96-0.97 at batch 1, ~0.99 at 256.

    vocab_size: ids at or past it are dropped (the LM head has no such column); device, dtype: the
    logits'. Calls with other logits stay correct, or fail loudly: numpy's path raises on a bf16,
    CUDA or grad-requiring tensor (`Tensor.numpy`), and torch's takes any."""

    def __init__(self, vocab_size: int, suppressed_ids: list[int], device: torch.device | str, dtype: torch.dtype = torch.float32):
        ids = sorted({i for i in suppressed_ids if 0 <= i < vocab_size})
        self.index = torch.tensor(ids, dtype=torch.int64, device=device)  # int64 [k], sorted, unique
        self.on_numpy = torch.device(device).type == "cpu" and dtype == torch.float32
        self._ids = np.array(ids, dtype=np.int64)
        self._flat = np.zeros(0, dtype=np.int64)  # row b's suppressed columns at b * V + ids, rows 0, 1, ...
        self._flat_vocab = -1  # the V `_flat` holds positions for
        self._minus_inf = np.zeros(0, dtype=np.float32)  # as many -inf as `_flat` has positions
        # (B, V) -> the first B * k of `_flat` and of `_minus_inf` (views)
        self._flat_by_shape: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] with the suppressed columns set to -inf, in place; returns `logits`."""
        if self.on_numpy:
            self._put(logits.numpy())
            return logits
        return logits.index_fill_(-1, self.index, float("-inf"))

    def greedy(self, logits: torch.Tensor, array: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        """`apply_` (the logits suppressed in place), then each row's greedy id: int64 [B] (ties
        go to the lower id; NO_TOKEN where the row's largest logit is not finite: NaN, inf, or
        every id -inf), a numpy array for fp32 CPU logits
        (numpy's argmax gives intp, which is int64 on every 64-bit platform), else a tensor on the
        logits' device (`kernels.sampling.greedy_ids`). `array`: the logits' memory as a numpy
        array, if the caller has one at hand (`runner.LogitsBuffer`; `Tensor.numpy` costs ~4 us
        right after a forward)."""
        if self.on_numpy:
            if array is None:
                array = logits.numpy()
            rows, ones = self._put(array)
            ids = array.argmax(axis=-1)
            # each row's chosen logit, non-finite where its largest is (argmax takes a NaN as the largest);
            # checked in as few numpy calls as can be: right after a forward each costs several
            # microseconds (a step's one row: one scalar read, ~3 us; else a gather and a dot product
            # with ones, their sum, NaN or inf if any is: ~14 us at 8 rows, ~38 at 256, where
            # isfinite().all() took 31 and 55)
            if len(rows) == 1:
                finite = math.isfinite(array.item(0, ids.item(0)))
            else:
                finite = math.isfinite(array[rows, ids].dot(ones))
            if not finite:  # (or a sum past fp32's largest, of logits near it: numpy warns of it, and no row is marked)
                ids[~np.isfinite(array[rows, ids])] = NO_TOKEN
            return ids
        ids = greedy_ids(self.apply_(logits))
        if isinstance(ids, np.ndarray):  # CPU logits of another dtype (bf16): ids on the host already
            ids[~torch.isfinite(logits[torch.arange(len(ids)), torch.from_numpy(ids)]).numpy()] = NO_TOKEN
            return ids
        return torch.where(torch.isfinite(logits.gather(1, ids[:, None])[:, 0]), ids, NO_TOKEN)  # static shapes: no sync

    def _put(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-inf into the suppressed columns of `array` [B, V]; returns the row numbers 0..B-1 (int64
        [B]) and B ones (fp32), made once per shape, for `greedy`'s check. On C-contiguous logits (what the LM
        head writes), an assignment at flat positions of a flat view from an array of -inf of the
        same length, numpy's fast path for it (warm, at 4 suppressed ids: 0.1-0.2 us at batch 1,
        1.5 at 256, where `put` took 0.37 and 4.0); other layouts (`ravel` then copies) through `put`."""
        got = self._flat_by_shape.get(array.shape)
        if got is None:
            got = self._positions(*array.shape)
        flat, minus_inf, rows, ones = got
        whole = array.ravel()
        if whole.base is None:  # a copy: not C-contiguous
            array.put(flat, minus_inf)
        else:
            whole[flat] = minus_inf
        return rows, ones

    def _positions(self, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The flat positions of the suppressed columns of a C-contiguous [rows, vocab] array, as
        many -inf (fp32), the row numbers and `rows` ones (fp32). Raises ValueError if a suppressed id has no column there (as
        `index_fill_` raises)."""
        k = self._ids.size
        if k and self._ids[-1] >= vocab:
            raise ValueError(f"logits of {vocab} ids have no column for suppressed id {int(self._ids[-1])}")
        if vocab != self._flat_vocab or rows * k > self._flat.size:
            grown = max(rows, 2 * self._flat.size // k if k else 0)
            self._flat = (np.arange(grown, dtype=np.int64)[:, None] * vocab + self._ids).reshape(-1)
            self._minus_inf = np.full(self._flat.size, -np.inf, dtype=np.float32)
            self._flat_vocab, self._flat_by_shape = vocab, {}
        got = self._flat_by_shape[(rows, vocab)] = (self._flat[: rows * k], self._minus_inf[: rows * k], np.arange(rows),
                                                     np.ones(rows, dtype=np.float32))
        return got


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    *,
    filtered: bool = True,
    impl: str = "auto",
    greedy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens [B] int64 for logits [B, V] fp32 (suppression already applied); NO_TOKEN for a row
    whose largest logit is not finite (NaN, inf, or every id -inf: broken weights or an overflow).

    temperature [B] fp32 (0 = greedy row), top_k [B] int64 (0 = off), top_p [B] fp32, seeds [B] and
    counters [B] int64 (the request's seed, and how many trace tokens it has): all on the logits'
    device. Everything is vectorized over the batch; nothing syncs with the host.

    `filtered` (known on the host from the requests' parameters): False when no row sets top_k or
    top_p < 1, which skips the sort over the vocabulary that only the filters need. Either way a
    row's token is the same (the filters' cutoff is a value, applied in vocabulary order), so which
    path a batch takes never changes a request's trace. `impl`: the Gumbel-max kernel's
    (`kernels.sampling`: Triton on CUDA by default). `greedy`: `greedy_tokens(logits)` where the
    caller has it already (the tokens of temperature-0 rows); computed here otherwise.
    """
    # the row's largest logit first taken off, so a tiny temperature gives 0 at the top and -inf
    # below, never inf - inf (a non-finite largest logit, a broken row, is left alone)
    top = logits.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(top[:, 0])  # (amax keeps a NaN)
    top.nan_to_num_(0.0, 0.0, 0.0)
    scaled = (logits - top).div_(temperature.clamp_min(_FP32_TINY)[:, None])
    if filtered:
        scaled = scaled.masked_fill_(scaled < filter_cutoffs(scaled, top_k, top_p)[:, None], float("-inf"))
    chosen = torch.where(temperature > 0, gumbel_argmax(scaled, seeds, counters, impl), greedy_tokens(logits) if greedy is None else greedy)
    return torch.where(finite, chosen, NO_TOKEN)


def filter_cutoffs(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit each row keeps [B] (fp32) under top-k and top-p, for temperature-scaled
    logits [B, V] fp32, top_k [B] int64 (0 = off) and top_p [B] fp32 in (0, 1]: the logit of the
    last token kept in descending order, where top-k keeps the first top_k and top-p every token
    whose higher-ranked ones hold less than top_p of the probability (so at least one, and the
    token that reaches top_p too; as transformers' TopPLogitsWarper). A row keeps every token at or
    above its cutoff, so tokens tied with the last one kept are kept too (as its TopKLogitsWarper)."""
    ordered = _sorted_descending(scaled)
    probs = ordered.softmax(dim=-1)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    by_p = (top_p[:, None] >= 1) | (probs.cumsum(-1) - probs < top_p[:, None])  # 1: all (a sum's rounding past 1 drops none)
    keep = ((top_k[:, None] == 0) | (rank < top_k[:, None])) & by_p
    # keep is a prefix of each row; empty only where probs are NaN (a NaN or inf logit: a broken
    # row) or top_p rounds to 0 in fp32: then the largest only, never an index of -1
    return ordered.gather(1, (keep.sum(-1, keepdim=True) - 1).clamp_min_(0))[:, 0]


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row of x [B, V] sorted, largest first (values only). On CPU, fp32 rows go through
    numpy's sort (SIMD-vectorized), which measured 3x faster than `torch.sort`, whose indices
    nothing here needs (2-core EPYC VM, torch 2.13, numpy 2.4, one thread: [16, 151936] 60 vs 190 ms)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(x.detach().neg().numpy(), axis=-1)).neg_()
    return x.sort(dim=-1, descending=True).values


def ends_with_stop(generated: list[int], stop_sequences: list[list[int]]) -> bool:
    """True when the generated ids end with any stop sequence (single tokens or multi-token markers)."""
    return any(len(s) <= len(generated) and generated[-len(s) :] == s for s in stop_sequences if s)
