"""A 16-frame clip with a traced query: Engine.embed vs the naive transformers pipeline, one run.

The naive pipeline is what a transformers user runs: greedy `generate()` over the prompt with
`pixel_values_videos` / `video_grid_thw`, then a second full forward over prompt + trace +
suffix (the clip's vision tower included) for the last-token embedding. Both get the same
preprocessed clip (transformers' video processor needs torchvision, absent from CPU-only installs;
preprocessing is timed on the engine side only). One naive run right before each round of ours
(`conftest.paired_rounds`; the speedup is the median of the rounds' ratios). The benchmark fails only if
the two disagree; the ratio is recorded in benchmark.extra_info (and RESULTS.md).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

av = pytest.importorskip("av")  # the optional `video` extra

from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from conftest import paired_rounds  # noqa: E402

from tte_engine import Engine  # noqa: E402
from tte_engine.inputs import as_query  # noqa: E402

TRACE_TOKENS = 24
ROUNDS = 7  # paired rounds (each ~0.5-1.2 s a pair)
FRAMES = 16
OPTIONS = {"num_frames": FRAMES, "min_pixels": 56 * 56, "max_pixels": 112 * 112}  # 8 temporal patches of 8x8


def _clip(t: int = FRAMES, h: int = 128, w: int = 128, seed: int = 0) -> bytes:
    """An H.264 clip of smooth moving random content, encoded here with PyAV."""
    import io

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), np.full((h, w), 100.0)], -1)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        for i in range(t):
            frame = ((base + 13 * i + rng.normal(0, 10, (h, w, 3))) % 256).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


class NaiveVideo:
    """generate() then a full re-encode, with transformers' Qwen2-VL on the same weights."""

    def __init__(self, checkpoint, engine: Engine):
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        p = engine.prompts
        self.stop_ids, self.suffix_ids, self.suppress_ids = p.think_end_ids + p.eos_ids, p.suffix_ids, p.suppressed_ids
        self.video_token_id = engine.model_cfg.video_token_id

    def _kw(self, ids: list[int], video) -> dict:
        ids_t = torch.tensor([ids])
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values_videos": video.patches,
                "video_grid_thw": torch.tensor([video.grid_thw]), "mm_token_type_ids": 2 * (ids_t == self.video_token_id).int()}

    @torch.no_grad()
    def __call__(self, prompt_ids: list[int], video, max_new_tokens: int) -> tuple[torch.Tensor, list[int]]:
        out = self.model.generate(**self._kw(prompt_ids, video), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop_ids, suppress_tokens=self.suppress_ids, pad_token_id=self.stop_ids[-1])
        trace = out[0, len(prompt_ids):].tolist()
        think_end = self.stop_ids[0]
        full = prompt_ids + trace + ([] if trace and trace[-1] == think_end else [think_end]) + self.suffix_ids
        hidden = self.model.model(**self._kw(full, video)).last_hidden_state[0, -1]
        return F.normalize(hidden.float(), dim=-1), trace


def test_bench_video_vs_naive_transformers(benchmark, bench_small, engine_options):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine(bench_small, **engine_options)
    item = {"text": "What happens in this clip?", "video": _clip(), "video_options": OPTIONS}
    ours = engine.embed([item], max_trace_tokens=TRACE_TOKENS)  # warm-up, and the answer to check
    prompt = engine.prompts.build(as_query(item, 0), 0, think=True)
    (video,) = prompt.images
    assert video.video and video.grid_thw == (FRAMES // 2, 8, 8)
    naive = NaiveVideo(bench_small, engine)
    ref, ref_trace = naive(prompt.token_ids, video, TRACE_TOKENS)
    # the two pipelines must compute the same thing before their speed means anything
    assert ours.prompt_token_ids[0] == prompt.token_ids
    assert ours.trace_token_ids[0] == ref_trace
    assert float(F.cosine_similarity(ours.embeddings[0], ref, dim=0)) >= 0.9999

    # every round of ours starts with empty prefix and encoder caches: the naive pipeline keeps nothing across rounds
    engine_s, naive_s, speedup, pairs = paired_rounds(benchmark, lambda: engine.embed([item], max_trace_tokens=TRACE_TOKENS),
                                               lambda: naive(prompt.token_ids, video, TRACE_TOKENS), ROUNDS, before=engine.reset_prefix_cache)
    benchmark.extra_info.update(naive_median_s=round(naive_s, 4), engine_median_s=round(engine_s, 4), speedup=round(speedup, 2),
                                frames=FRAMES, video_tokens=video.num_tokens, trace_tokens=TRACE_TOKENS, threads=torch.get_num_threads())
    print(f"\nvideo: engine {engine_s:.3f}s (decode + preprocess included)  naive {naive_s:.3f}s  "
          f"speedup {speedup:.2f}x (median of {pairs} paired rounds; {torch.get_num_threads()} threads)")
