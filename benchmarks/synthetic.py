"""Synthetic inputs for the benchmarks and the GPU check (seeded; nothing is downloaded). Kept
apart from conftest.py so that the GPU check imports it without pytest."""

import numpy as np
from PIL import Image


def synthetic_image(h: int, w: int, seed: int) -> Image.Image:
    """A uniformly random RGB image, h x w pixels, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
