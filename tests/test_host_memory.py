"""glibc's malloc thresholds raised once per process by a CPU engine (tte_engine/host_memory.py)."""

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes
import numpy as np
from tte_engine import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def kept_after_free() -> bool:  # is a freed 64 MB block still in the heap (not returned to the OS)?
    a = np.ones(8 << 20)
    del a
    return libc.mallinfo2().fordblks >= 64 << 20

before = kept_after_free()
print(before, host_memory.keep_freed_memory(), host_memory.keep_freed_memory(), kept_after_free())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("env,want", [({}, "False True True True"), ({"TTE_KEEP_FREED_MEMORY": "0"}, "False False False False")])
def test_keep_freed_memory_is_applied_once_and_can_be_turned_off(env, want):
    out = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == want.split()


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="a Linux kernel with THP")
def test_advise_huge_pages_covers_the_aligned_interior_and_keeps_contents():
    """The KV cache is advised to use transparent huge pages: only whole 2 MiB pages inside the
    tensor (never memory around it), nothing for a tensor smaller than one, values unchanged."""
    import torch

    from tte_engine.host_memory import HUGE_PAGE, advise_huge_pages

    big = torch.arange(5 * HUGE_PAGE // 4 + 123, dtype=torch.float32)  # ~5 MiB, unaligned length
    before = big.clone()
    advised = advise_huge_pages(big)
    nbytes = big.numel() * 4
    assert advised % HUGE_PAGE == 0 and nbytes - 2 * HUGE_PAGE < advised <= nbytes
    assert torch.equal(big, before)
    assert advise_huge_pages(torch.zeros(1000)) == 0  # 4 KB: no whole huge page inside
