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


def _paged_cache(lens, head_dim, dtype, device):
    """NaN caches holding random k/v for the first lens[b] positions of each sequence, in shuffled blocks."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens) + 1  # one spare column, as a padded table has
    num_blocks = len(lens) * max_blocks + 3
    tables = torch.randperm(num_blocks)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    k_cache = torch.full((num_blocks, BLOCK_SIZE, KV_HEADS, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[b, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        k_cache.view(-1, KV_HEADS, head_dim)[slots] = torch.randn(n, KV_HEADS, head_dim).to(dtype)
        v_cache.view(-1, KV_HEADS, head_dim)[slots] = torch.randn(n, KV_HEADS, head_dim).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache.to(device), v_cache.to(device), tables.to(device, torch.int32), lens.to(device)


def _fp32(cache):
    """The reference reads whole blocks and masks scores, so it needs finite values in unused slots."""
    return torch.nan_to_num(cache.float())


@DTYPES
@HEAD_DIMS
@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_store_kv(tokens, head_dim, dtype, device):
    k = torch.randn(tokens, KV_HEADS, head_dim, device=device).to(dtype)
    v = torch.randn(tokens, KV_HEADS, head_dim, device=device).to(dtype)
    num_blocks = tokens // BLOCK_SIZE + 2
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    slots[::3] = -1  # padding tokens: not stored
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
