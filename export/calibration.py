"""Built-in calibration items and the FP8 accuracy report.

The items are fixed text prompts, half of them paired with a synthetic image (seeded shapes on a
coloured background), so the report exercises the vision path, the decoder and the head without
any data set. The report compares an FP8 engine with the float reference on the same items:
- embedding cosine (min, mean): on the reference's traces (the FP8 engine is handed them, so
  this isolates the numerics), end to end (each engine with its own greedy trace), and with
  think=False. Small random models have near-tied logits, so their greedy traces diverge under
  any perturbation and the end-to-end figure mostly measures that; real checkpoints do not;
- greedy trace agreement: share of identical traces, and of matching tokens up to the first
  difference;
- retrieval agreement: each think=True embedding ranks the think=False embeddings of all items;
  the share of queries whose top-1 candidate is the same under both engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

PROMPTS = (
    "a cat sitting on a red chair next to a window",
    "What is shown in this picture?",
    "two dogs play with a ball in the park",
    "a diagram of a neural network with many layers",
    "Which object is on the left side of the table?",
    "a man rides a bicycle along the river at sunset",
    "a bowl of fruit: apples, bananas and oranges",
    "the document is a table of numbers with a title and a date",
    "a city street with cars, buses and people",
    "Describe the colours and shapes in the image.",
    "retrieve the image that matches this caption: a blue square",
    "the quick brown fox jumps over the lazy dog",
    "how many circles are there?",
    "a photo of a mountain lake under a cloudy sky",
    "find a caption that describes the photo",
    "an orange triangle above a green line",
)


def synthetic_image(i: int) -> Image.Image:
    """A deterministic picture: a few seeded ellipses and rectangles, sizes varying with i."""
    rng = np.random.default_rng(1000 + i)
    w, h = 56 + 28 * (i % 4), 56 + 28 * ((i // 2) % 3)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = [x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def calibration_items(n: int) -> list:
    """n items: prompt i, with a synthetic image on every odd item."""
    return [{"text": PROMPTS[i % len(PROMPTS)], "image": synthetic_image(i)} if i % 2 else PROMPTS[i % len(PROMPTS)] for i in range(n)]


@dataclass
class CalibrationRun:
    embeddings: torch.Tensor  # think=True with its own greedy traces, [N, D]
    traces: list[list[int]]
    plain: torch.Tensor  # think=False, [N, D]
    on_reference_traces: torch.Tensor  # think=True with the reference's traces supplied, [N, D]


def _with_trace(item, trace: list[int]) -> dict:
    return dict(item, trace=trace) if isinstance(item, dict) else {"text": item, "trace": trace}


def run_calibration(engine, items: list, max_trace_tokens: int, progress: bool = False, reference: CalibrationRun | None = None) -> CalibrationRun:
    """Embed the items three ways; `reference` (the float run) supplies the traces for the fixed-trace embeddings."""
    res = engine.embed(items, max_trace_tokens=max_trace_tokens, progress=progress)
    plain = engine.embed(items, think=False, progress=progress)
    fixed = res.embeddings
    if reference is not None:
        fixed = engine.embed([_with_trace(it, tr) for it, tr in zip(items, reference.traces)], progress=progress).embeddings
    return CalibrationRun(res.embeddings, res.trace_token_ids, plain.embeddings, fixed)


def _prefix_agreement(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / n


def accuracy_report(ref: CalibrationRun, test: CalibrationRun) -> dict:
    cos = (ref.embeddings * test.on_reference_traces).sum(-1)
    cos_e2e = (ref.embeddings * test.embeddings).sum(-1)
    cos_plain = (ref.plain * test.plain).sum(-1)
    top_ref = (ref.embeddings @ ref.plain.T).argmax(-1)
    top_test = (test.embeddings @ test.plain.T).argmax(-1)
    return {
        "items": len(ref.traces),
        "cosine": {"min": float(cos.min()), "mean": float(cos.mean())},
        "cosine_end_to_end": {"min": float(cos_e2e.min()), "mean": float(cos_e2e.mean())},
        "cosine_no_think": {"min": float(cos_plain.min()), "mean": float(cos_plain.mean())},
        "trace_exact_match": float(np.mean([a == b for a, b in zip(ref.traces, test.traces)])),
        "trace_token_agreement": float(np.mean([_prefix_agreement(a, b) for a, b in zip(ref.traces, test.traces)])),
        "retrieval_top1_agreement": float((top_ref == top_test).float().mean()),
    }
