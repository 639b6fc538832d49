"""Paged KV cache write, decode attention and prefill attention: Triton against the PyTorch reference.

Caches start as NaN everywhere, so a kernel that reads a slot it should not (past a context,
an unused block) or leaves an output element unwritten produces NaN and fails.
"""

import pytest
import torch

from tte_engine.kernels import attention

HEADS, KV_HEADS, BLOCK_SIZE = 12, 2, 16  # Qwen2-VL-2B's GQA: six query heads per KV head
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
HEAD_DIMS = pytest.mark.parametrize("head_dim", [64, 128])


def _paged_cache(lens, head_dim, dtype, device, poison=float("nan")):
    """Caches holding random k/v for the first lens[b] positions of each sequence, in shuffled blocks;
    every other slot (block tails, spare blocks, the table's padding column) holds `poison`."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens) + 1  # one spare column, as a padded table has
    num_blocks = len(lens) * max_blocks + 3
    tables = torch.randperm(num_blocks)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    k_cache = torch.full((num_blocks, BLOCK_SIZE, KV_HEADS, head_dim), poison, dtype=dtype)
    v_cache = k_cache.clone()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[b, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        k_cache.view(-1, KV_HEADS, head_dim)[slots] = torch.randn(n, KV_HEADS, head_dim).to(dtype)
        v_cache.view(-1, KV_HEADS, head_dim)[slots] = torch.randn(n, KV_HEADS, head_dim).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache.to(device), v_cache.to(device), tables.to(device, torch.int32), lens.to(device)


def _fp32(cache):
    """The references read the poisoned caches as they are: never-written slots must not reach a result."""
    return cache.float()


POISONS = pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "huge"])


@DTYPES
@HEAD_DIMS
@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_store_kv(tokens, head_dim, dtype, device):
    k = torch.randn(tokens, KV_HEADS, head_dim, device=device).to(dtype)
    v = torch.randn(tokens, KV_HEADS, head_dim, device=device).to(dtype)
    num_blocks = tokens // BLOCK_SIZE + 2
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    k_cache = torch.full((num_blocks, BLOCK_SIZE, KV_HEADS, head_dim), float("nan"), device=device, dtype=dtype)
    v_cache = k_cache.clone()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    attention.store_kv_torch(k, v, ref_k, ref_v, slots)
    attention.store_kv_triton(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0, equal_nan=True)


@DTYPES
@HEAD_DIMS
@pytest.mark.parametrize(
    "lens",
    [[1], [17], [300], [1100], [1, 17, 300, 33, 64, 65, 129]],
    ids=["ctx1", "ctx17", "ctx300", "ctx1100-manysplits", "batch7"],
)
def test_decode_attention(lens, head_dim, dtype, device, assert_matches):
    k_cache, v_cache, tables, ctx = _paged_cache(lens, head_dim, dtype, device)
    q = torch.randn(len(lens), HEADS, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    attention.decode_attention_triton(q, k_cache, v_cache, tables, ctx, scale, out=out)
    ref = attention.decode_attention_torch(q.float(), _fp32(k_cache), _fp32(v_cache), tables, ctx, scale)
    assert_matches(out, ref, dtype)


@POISONS
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_decode_attention_ignores_never_written_slots(poison, splits, device, assert_matches):
    """Unwritten block tails and padding columns hold NaN, Inf or huge values: both implementations give
    the output of a clean cache (issue 12: a masked score times a NaN value is still NaN), whatever the
    split count a CUDA graph bucket fixes. A padded row (context 0) gives zeros."""
    lens = [1, 17, 5, 0, 40]
    k_cache, v_cache, tables, ctx = _paged_cache(lens, 64, torch.float32, device, poison=poison)
    clean_k, clean_v = torch.nan_to_num(k_cache, posinf=0.0, neginf=0.0), torch.nan_to_num(v_cache, posinf=0.0, neginf=0.0)
    clean_k[clean_k.abs() > 1e20], clean_v[clean_v.abs() > 1e20] = 0, 0
    q = torch.randn(len(lens), HEADS, 64, device=device)
    want = attention.decode_attention_torch(q, clean_k, clean_v, tables, ctx, 0.125)
    ref = attention.decode_attention_torch(q, k_cache, v_cache, tables, ctx, 0.125)
    out = attention.decode_attention_triton(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=splits)
    assert ref.isfinite().all() and out.isfinite().all()
    assert ref[3].eq(0).all() and out[3].eq(0).all()
    assert_matches(ref, want, torch.float32)
    assert_matches(out, want, torch.float32)


def test_decode_attention_of_an_empty_context_is_zero(device):
    """A padded batch slot (context length 0) gives zeros, as the reference's SDPA does."""
    k_cache, v_cache, tables, ctx = _paged_cache([5, 0], 64, torch.float32, device)
    q = torch.randn(2, HEADS, 64, device=device)
    out = attention.decode_attention_triton(q, k_cache, v_cache, tables, ctx, 0.125)
    assert out[1].eq(0).all() and out[0].isfinite().all()


# (query tokens, context length) per sequence: fresh prompts, then chunks that continue a cached prefix
PREFILL_CASES = {
    "fresh1": [(1, 1)],
    "fresh17": [(17, 17)],
    "fresh300": [(300, 300)],
    "suffix17after283": [(17, 300)],
    "batch7": [(1, 1), (17, 17), (300, 300), (5, 40), (1, 300), (17, 150), (64, 64)],
    # odd sizes, several sequences continuing cached prefixes, mixed with fresh ones: the reference
    # batches them into padded calls of both kinds (right-aligned causal and masked)
    "continued6": [(3, 45), (33, 33), (7, 7), (19, 130), (2, 2), (50, 77)],
    "suffixes5": [(3, 97), (3, 61), (2, 150), (5, 33), (1, 17)],
}


@DTYPES
@HEAD_DIMS
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention(case, head_dim, dtype, device, assert_matches):
    q_lens, lens = zip(*PREFILL_CASES[case])
    k_cache, v_cache, tables, ctx = _paged_cache(lens, head_dim, dtype, device)
    cu_q = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), HEADS, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    attention.prefill_attention_triton(q, k_cache, v_cache, tables, cu_q, ctx, scale, out=out)
    ref = attention.prefill_attention_torch(q.float(), _fp32(k_cache), _fp32(v_cache), tables, cu_q, ctx, scale)
    assert_matches(out, ref, dtype)


def _prefill_per_sequence(q, k_cache, v_cache, tables, cu_q, ctx, scale):
    """Plain fp64 softmax attention, one sequence at a time, reading only each context's slots."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, (s, e) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        n, c = e - s, int(ctx[b])
        pos = torch.arange(c)
        slots = tables[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        k = k_cache.view(-1, KV_HEADS, k_cache.shape[-1])[slots].double().repeat_interleave(HEADS // KV_HEADS, 1)
        v = v_cache.view(-1, KV_HEADS, v_cache.shape[-1])[slots].double().repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k) * scale
        scores = scores.masked_fill(pos[None, None, :] > (c - n + torch.arange(n))[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


@POISONS
@pytest.mark.parametrize("case", ["batch7", "continued6", "suffixes5", "one_long_many_short"])
def test_prefill_reference_batches_exactly(case, poison):
    """The PyTorch reference packs sequences into padded 4-D SDPA calls (grouped, causal or masked):
    it must equal per-sequence attention, whatever the never-written slots hold."""
    cases = {**PREFILL_CASES, "one_long_many_short": [(700, 700), (1, 650), *[(n, n) for n in (5, 9, 13, 31)], (4, 29)]}
    q_lens, lens = zip(*cases[case])
    k_cache, v_cache, tables, ctx = _paged_cache(lens, 64, torch.float32, "cpu", poison=poison)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), HEADS, 64)
    ref = attention.prefill_attention_torch(q, k_cache, v_cache, tables, cu_q, ctx, 0.125)
    assert ref.isfinite().all()
    torch.testing.assert_close(ref.double(), _prefill_per_sequence(q, k_cache, v_cache, tables, cu_q, ctx, 0.125), rtol=1e-5, atol=1e-5)


def test_prefill_groups_cover_every_sequence_once():
    groups = attention.varlen_groups([700, 1, 5, 9, 4, 2048, 3], [700, 650, 5, 9, 29, 2048, 2051])
    assert sorted(b for g, _ in groups for b in g) == list(range(7))
    modes = {tuple(g): causal for g, causal in groups}
    assert len(groups) > 1 and any(modes.values()) and not all(modes.values())


def test_prefill_reads_q_from_a_fused_projection(device, assert_matches):
    """q as a strided view of a [T, (H + 2 KVH) * hd] qkv output, as the decoder passes it."""
    head_dim = 64
    k_cache, v_cache, tables, ctx = _paged_cache([9, 4], head_dim, torch.float32, device)
    cu_q = torch.tensor([0, 9, 13], dtype=torch.int32, device=device)
    qkv = torch.randn(13, (HEADS + 2 * KV_HEADS) * head_dim, device=device)
    q = qkv[:, : HEADS * head_dim].view(13, HEADS, head_dim)
    out = attention.prefill_attention_triton(q, k_cache, v_cache, tables, cu_q, ctx, 0.125)
    ref = attention.prefill_attention_torch(q, _fp32(k_cache), _fp32(v_cache), tables, cu_q, ctx, 0.125)
    assert_matches(out, ref, torch.float32)


@POISONS
def test_prefill_attention_ignores_never_written_slots(poison, device, assert_matches):
    """Prefill (fresh prompts and continued prefixes) over caches whose unused slots are poisoned
    gives the clean cache's output in both implementations (issue 12)."""
    q_lens, lens = (3, 17, 1, 9), (3, 30, 16, 40)
    k_cache, v_cache, tables, ctx = _paged_cache(lens, 64, torch.float32, device, poison=poison)
    clean_k = torch.where(k_cache.isfinite() & (k_cache.abs() < 1e20), k_cache, 0)
    clean_v = torch.where(v_cache.isfinite() & (v_cache.abs() < 1e20), v_cache, 0)
    cu_q = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), HEADS, 64, device=device)
    want = attention.prefill_attention_torch(q, clean_k, clean_v, tables, cu_q, ctx, 0.125)
    ref = attention.prefill_attention_torch(q, k_cache, v_cache, tables, cu_q, ctx, 0.125)
    out = attention.prefill_attention_triton(q, k_cache, v_cache, tables, cu_q, ctx, 0.125)
    assert ref.isfinite().all() and out.isfinite().all()
    assert_matches(ref, want, torch.float32)
    assert_matches(out, want, torch.float32)


def test_decode_scratch_is_never_read_unwritten(device, assert_matches, monkeypatch):
    """Flash-decoding's split scratch (partial outputs and log-sum-exps) starts as NaN: the merge reads
    only the splits that pass 1 wrote, so short contexts with many (empty) splits stay exact (issue 12)."""
    lens = [1, 5, 40, 0]
    k_cache, v_cache, tables, ctx = _paged_cache(lens, 64, torch.float32, device)
    q = torch.randn(len(lens), HEADS, 64, device=device)
    want = attention.decode_attention_torch(q, k_cache, v_cache, tables, ctx, 0.125)
    real_empty = torch.empty
    monkeypatch.setattr(attention.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    out = attention.decode_attention_triton(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=8)
    assert out.isfinite().all()
    assert_matches(out, want, torch.float32)


def _decode_per_head(q, k_cache, v_cache, tables, ctx, scale):
    """Each sequence's one query row per head over its own context alone, in fp64 (zeros for an empty context)."""
    heads, head_dim = q.shape[1:]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(ctx.tolist()):
        pos = torch.arange(n)
        slots = tables[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = (c.view(-1, KV_HEADS, head_dim)[slots].double().repeat_interleave(heads // KV_HEADS, dim=1) for c in (k_cache, v_cache))
        if n:
            out[b] = torch.einsum("hn,nhd->hd", (torch.einsum("hd,nhd->hn", q[b].double(), k) * scale).softmax(-1), v)
    return out


@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("heads", [HEADS, KV_HEADS], ids=["gqa", "no_gqa"])
def test_decode_attention_grouped_query_rows_are_attention_per_head(heads, head_dim):
    """On CPU, decode attention hands SDPA each GQA group's query heads as the rows of one query (a
    group of one without GQA): the attention of each head alone, padded and empty rows included."""
    k_cache, v_cache, tables, ctx = _paged_cache([1, 17, 0, 300, 33], head_dim, torch.float32, "cpu")
    q = torch.randn(len(ctx), heads, head_dim)
    out = attention.decode_attention_torch(q, k_cache, v_cache, tables, ctx, head_dim**-0.5)
    assert out.isfinite().all() and out[2].eq(0).all()
    torch.testing.assert_close(out.double(), _decode_per_head(q, k_cache, v_cache, tables, ctx, head_dim**-0.5), rtol=1e-5, atol=1e-6)


def test_prefill_given_its_longest_query_reads_nothing_back(device):
    """The runner knows each sequence's query rows on the host and passes the longest: the Triton
    wrapper then sizes its grid without reading cu_seqlens_q back (a device sync per layer on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ScalarReads.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    q_lens, lens = zip(*PREFILL_CASES["continued6"])
    k_cache, v_cache, tables, ctx = _paged_cache(lens, 64, torch.float32, device)
    cu_q = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), HEADS, 64, device=device)
    with ScalarReads():
        given = attention.prefill_attention(q, k_cache, v_cache, tables, cu_q, ctx, 0.125, max_query_len=max(q_lens), impl="triton")
    assert ScalarReads.count == 0
    read = attention.prefill_attention(q, k_cache, v_cache, tables, cu_q, ctx, 0.125, impl="triton")
    assert ScalarReads.count == 0 and torch.equal(given, read)
    with ScalarReads():
        attention.prefill_attention(q, k_cache, v_cache, tables, cu_q, ctx, 0.125, impl="triton")
    assert ScalarReads.count == 1  # without it: the one read this test exists to keep out of the engine


def _torch_plan(tables, rows, context_lens, width: int):
    """`decode_plan` (the torch reference) of rows `rows` of the numpy block-table array, `width` blocks wide."""
    return attention.decode_plan(torch.from_numpy(tables[rows, :width]), torch.from_numpy(context_lens).to(torch.int32), BLOCK_SIZE)


def _assert_same_plan(expected, got, what: str = "") -> None:
    """A host plan equals the torch plan, tensor for tensor; it says None for the non-empty rows
    (every row of a decode batch holds a token), where the torch plan has all True."""
    assert got[2] is None and bool(expected[2].all()), what
    for e, r in zip(expected[:2], got[:2], strict=True):
        assert e.dtype == r.dtype and e.shape == r.shape and torch.equal(e, r), what


@pytest.mark.parametrize("lens", [[1], [1, 5, 17], [33, 1, 2, 150, 16, 7, 300]], ids=["one", "short_rows", "odd7"])
@pytest.mark.parametrize("extra_blocks", [0, 2])
def test_host_decode_plan_equals_decode_plan(lens, extra_blocks):
    """The CPU runner works out decode attention's plan in numpy (`HostDecodePlan`) from the host
    block-table array and a subset of its rows: it must equal the torch plan, tensor for tensor."""
    import numpy as np

    g = torch.Generator().manual_seed(len(lens) * 10 + extra_blocks)
    width = max(-(-n // BLOCK_SIZE) for n in lens) + extra_blocks  # table columns read (padding ones too)
    tables = torch.randint(0, 1000, (len(lens) + 4, width + 3), generator=g, dtype=torch.int32).numpy()
    rows = torch.randperm(len(lens) + 4, generator=g)[: len(lens)].numpy().astype(np.int64)
    index = np.asarray(lens, dtype=np.int64) - 1  # the new token's position: the context holds lens tokens
    slots = tables[rows, index // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + index % BLOCK_SIZE
    got = attention.HostDecodePlan().step(tables, rows, index + 1, slots, width, BLOCK_SIZE, tick=0)
    _assert_same_plan(_torch_plan(tables, rows, index + 1, width), got)


def _walk_batch(plan):
    """Run `plan` (a HostDecodePlan) over the steps of a batch of 5 rows: odd lengths, blocks
    gained mid-run, the span crossing block boundaries and jumping by two blocks, rows leaving
    mid-run, the longest among them, then a jump (steps it did not see) and the same step again
    (a retried step). Yields, per step, (step, its plan, the block-table array, the rows'
    table rows, the positions their new tokens take, those tokens' slots, the span in blocks)."""
    import numpy as np

    g = np.random.default_rng(7)
    bsz, steps, max_blocks = 5, 40, 10
    held = g.permutation(1000)[: (bsz + 3) * max_blocks].reshape(bsz + 3, max_blocks).astype(np.int32)
    rows = g.permutation(bsz + 3)[:bsz].astype(np.int64)  # the batch's rows of the block table
    start = np.array([1, 17, 3, 30, 16], dtype=np.int64)  # the position each row's first step computes
    for step in [*range(steps), steps + 3, steps + 3]:
        if step == 25:  # two short rows leave (the longest still sets the span: the plan is compacted, not rebuilt)
            keep = np.array([False, True, False, True, True])
            plan.keep_rows(keep)
            rows, start = rows[keep], start[keep]
        if step == 33:  # the longest row leaves: the span shrinks
            keep = start != 30
            plan.keep_rows(keep)
            rows, start = rows[keep], start[keep]
        index = start + step
        # steps 10-13 read two padding blocks more (the span jumps by two blocks, then back)
        width = int(index.max()) // BLOCK_SIZE + 1 + (2 if 10 <= step < 14 else 0)
        # a row holds the blocks up to its new token's; later entries are garbage until it gains them
        # (short rows gain theirs while the longest row sets the span: no rebuild then)
        tables = held.copy()
        tables[rows] = np.where(np.arange(max_blocks) <= (index // BLOCK_SIZE)[:, None], held[rows], 99999)
        slots = tables[rows, index // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + index % BLOCK_SIZE
        yield step, plan.step(tables, rows, index + 1, slots, width, BLOCK_SIZE, tick=step), tables, rows, index, slots, width


@pytest.mark.parametrize("keys_ahead", [attention.KEYS_AHEAD, 3])  # 3: new keys worked out again mid-run, often
def test_host_decode_plan_follows_a_batch_step_by_step(keys_ahead, monkeypatch):
    """`HostDecodePlan` updates its plan by one key per row a step, widens it when the span grows
    and rebuilds it when the span shrinks or a step does not follow on: at every step of a batch
    (`_walk_batch`) it must equal the plan built from scratch, tensor for tensor."""
    monkeypatch.setattr(attention, "KEYS_AHEAD", keys_ahead)
    for step, got, tables, rows, index, _, width in _walk_batch(attention.HostDecodePlan()):
        _assert_same_plan(_torch_plan(tables, rows, index + 1, width), got, f"step {step}")


@pytest.mark.parametrize("kept_bytes", [attention.KEPT_CONTEXT_BYTES, 1, "one layer"])  # 1: nothing kept
def test_kept_context_attends_as_gathering_at_every_step(kept_bytes, monkeypatch):
    """A host plan keeps each layer's gathered keys and values from step to step (`KeptContext`)
    and copies in only the new rows: over the steps of a batch (`_walk_batch`: rows gaining
    blocks, leaving, the span growing and shrinking, a jump, a retried step), with each step's
    new k/v stored first, as the model does, decode attention of three layers must give what
    it gives gathering every position at every step, bit for bit; with room for all layers, for
    none, and for one (the others gather)."""
    g = torch.Generator().manual_seed(3)
    hd, layers = 24, 3
    caches = [(torch.randn(1000, BLOCK_SIZE, KV_HEADS, hd, generator=g), torch.randn(1000, BLOCK_SIZE, KV_HEADS, hd, generator=g))
              for _ in range(layers)]
    monkeypatch.setattr(attention, "KEEP_MIN_ROWS", 0)  # keep from the first row
    plan = attention.HostDecodePlan()
    for step, got, tables, rows, index, slots, width in _walk_batch(plan):
        # "one layer": room for one layer's keys and values (fp32) at this step's span
        monkeypatch.setattr(attention, "KEPT_CONTEXT_BYTES", 2 * 4 * got.slots.numel() * KV_HEADS * hd if kept_bytes == "one layer" else kept_bytes)
        assert got.kept is not None
        reference = _torch_plan(tables, rows, index + 1, width)
        q = torch.randn(len(rows), HEADS, hd, generator=g)
        for k_cache, v_cache in caches:
            new = torch.from_numpy(slots)
            attention.store_kv_torch(torch.randn(len(rows), KV_HEADS, hd, generator=g), torch.randn(len(rows), KV_HEADS, hd, generator=g),
                                     k_cache, v_cache, new)
            kept = attention.decode_attention_torch(q, k_cache, v_cache, None, None, 0.2, got)
            gathered = attention.decode_attention_torch(q, k_cache, v_cache, None, None, 0.2, reference)
            assert torch.equal(kept, gathered), f"step {step}"
        expected_kept = {attention.KEPT_CONTEXT_BYTES: layers, 1: 0}.get(kept_bytes, 1)
        assert len(got.kept.layers) == expected_kept, f"step {step}"


def test_an_engines_kept_context_is_bounded_by_its_kv_cache(make_checkpoint, monkeypatch):
    """The gathered context a CPU engine keeps between decode steps is a copy of part of its cache:
    at most a quarter of the cache's bytes (else up to KEPT_CONTEXT_BYTES beside a cache of a few MB),
    and a plan holds no more than that, layer by layer."""
    from tte_engine import Engine
    from tte_engine.scheduler import DecodeBatch

    monkeypatch.setattr(attention, "KEEP_MIN_ROWS", 0)
    engine = Engine(make_checkpoint("engine", think_max_tokens=12), cache_memory=2 << 20)
    runner = engine.stages[0].runner
    cache_bytes = runner.cache.k.nbytes + runner.cache.v.nbytes
    assert runner.kept_context_bytes == cache_bytes // 4 < attention.KEPT_CONTEXT_BYTES
    plans = []
    real_plan = runner._decode_plan

    def plan(decode: DecodeBatch):
        got = real_plan(decode)
        plans.append(got)
        return got

    monkeypatch.setattr(runner, "_decode_plan", plan)
    items = ["a cat on a chair", "two dogs in the park", "a red chair"]
    want = engine.embed(items)
    kept = [p.kept for p in plans if p.kept is not None]
    assert kept and all(k.max_bytes == runner.kept_context_bytes and 0 < k.bytes <= k.max_bytes for k in kept)
    plans.clear()
    monkeypatch.setattr(runner, "kept_context_bytes", 0)  # no room: every layer gathers at every step, to the same results
    got = engine.embed(items)
    assert plans and all(not p.kept.layers for p in plans if p.kept is not None)
    assert got.trace_token_ids == want.trace_token_ids and torch.equal(got.embeddings, want.embeddings)


def test_small_plans_keep_no_context():
    """Below KEEP_MIN_ROWS (batch x span) a host plan gathers at every step: keeping costs more there."""
    import numpy as np

    tables = np.arange(64, dtype=np.int32).reshape(4, 16)
    rows, ctx = np.arange(4, dtype=np.int64), np.array([3, 9, 20, 40], dtype=np.int64)
    slots = tables[rows, (ctx - 1) // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
    small = attention.HostDecodePlan().step(tables, rows, ctx, slots, 3, BLOCK_SIZE, tick=0)  # 4 x 48 rows
    assert small.kept is None and 4 * 3 * BLOCK_SIZE < attention.KEEP_MIN_ROWS
    large = attention.HostDecodePlan().step(tables, rows, ctx, slots, 16, BLOCK_SIZE, tick=0)  # 4 x 256 rows
    assert large.kept is not None
