"""Every Triton kernel compiles for Hopper (sm_90) with Triton's real backend, on a machine without a GPU.

The interpreter checks what a kernel computes but not whether it compiles: a tl.dot below the
tensor cores' 16x16x16, a construct the code generator refuses, or more shared memory than the GPU
has all pass there and fail on the first GPU run (register spills only make it slow). This test
calls every Triton wrapper at engine sizes (Qwen2-VL-2B and -7B) in a child process without
TRITON_INTERPRET, with a stand-in driver that reports an H100 and kernel launches that only
compile (through ptxas to a cubin), then asks ptxas for each kernel's registers and spills.
On a CUDA machine the kernel tests themselves run compiled, so this check is skipped there.
"""

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

H100_SHARED_MEMORY = 232448  # bytes a block may opt in to on sm_90


def compile_all() -> list[str]:
    """Run every wrapper with compile-only launches; return one line per compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(Hopper())
    compiled = []

    def compile_only(self, grid):
        return lambda *args, **kwargs: compiled.append(self.run(*args, grid=grid, warmup=True, **kwargs))

    JITFunction.__getitem__ = compile_only

    from tte_engine.kernels import activations, attention, norms, pooling, rotary, sampling

    for dtype in (torch.bfloat16, torch.float32):
        for d, inter, heads, kv_heads in ((1536, 8960, 12, 2), (3584, 18944, 28, 4)):
            x = torch.randn(4, d, dtype=dtype)
            w = torch.randn(d, dtype=dtype)
            norms.rms_norm_triton(x, w, 1e-6)
            norms.add_rms_norm_triton(x, x, w, 1e-6)
            activations.swiglu_triton(torch.randn(4, 2 * inter, dtype=dtype))
            cu = torch.tensor([0, 1, 4], dtype=torch.int32)
            pooling.pool_last_normalize_triton(x, cu, 1e-12, torch.float32)
            pooling.pool_last_rmsnorm_normalize_triton(x, cu, w, 1e-6, x, 1e-12, torch.float32)

            hd, block_size, blocks = 128, 16, 8
            qkv = torch.randn(4, (heads + 2 * kv_heads) * hd, dtype=dtype)
            q = qkv[:, : heads * hd].view(4, heads, hd)
            k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(4, kv_heads, hd)
            cos_sin = torch.randn(64, hd)
            rotary.apply_mrope_triton(q, k, torch.zeros(3, 4, dtype=torch.long), cos_sin, (16, 24, 24))
            rotary.apply_mrope_triton(q, k, torch.zeros(4, dtype=torch.long), cos_sin, (16, 24, 24))
            k_cache = torch.randn(blocks, block_size, kv_heads, hd, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            attention.store_kv_triton(k, k, k_cache, v_cache, torch.arange(4))
            tables = torch.arange(blocks, dtype=torch.int32).view(2, 4)
            lens = torch.tensor([40, 64], dtype=torch.int32)
            wide_table = torch.zeros(1, 64, dtype=torch.int32)  # a long span: many splits to merge
            for table, q_batch in ((tables, 2), (wide_table, 1)):
                q = torch.randn(q_batch, heads, hd, dtype=dtype)
                attention.decode_attention_triton(q, k_cache, v_cache, table, lens[:q_batch], 0.1)
            for q_len in (1, 16, 64):  # each q_len picks its own query tile
                cu_q = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32)
                q = torch.randn(2 * q_len, heads, hd, dtype=dtype)
                attention.prefill_attention_triton(q, k_cache, v_cache, tables, cu_q, lens, 0.1)

    sampling.gumbel_argmax_triton(torch.randn(4, 151936), torch.arange(4), torch.zeros(4, dtype=torch.int64))  # Qwen2-VL's vocabulary

    lines = []
    for kernel in {k.hash: k for k in compiled}.values():
        assert "cubin" in kernel.asm, kernel.name
        assert kernel.metadata.shared <= H100_SHARED_MEMORY, (kernel.name, kernel.metadata.shared)
        regs, spilled = _registers_and_spills(kernel.asm["ptx"])
        assert spilled == 0, f"{kernel.name} spills {spilled} bytes of registers"
        warps, shared = kernel.metadata.num_warps, kernel.metadata.shared
        lines.append(f"{kernel.name}: {warps} warps, {regs} registers, {shared} B shared")
    return lines


def _registers_and_spills(ptx: str) -> tuple[int, int]:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spilled


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests run compiled")
@pytest.mark.skipif(not _has_nvidia_backend(), reason="needs triton with its NVIDIA backend")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "_decode_merge_kernel" in run.stdout and "_prefill_kernel" in run.stdout and "_gumbel_argmax_kernel" in run.stdout


if __name__ == "__main__":
    print("\n".join(compile_all()))
