"""think=False embedding (prefill only) vs transformers' forward on the same weights, one run.

Three workloads on `bench-small`: 64 short texts, one ~2k-token text, four 224x224 images. The
baseline is what a user without tte_engine would run for a VLM2Vec-style embedding: transformers'
processor recipe (chat template, tokenizer, image processor), one batched forward of
Qwen2VLForConditionalGeneration's decoder (left padding) over prompt + embed suffix, the last
token's final hidden state, L2-normalized. Both pipelines must agree (same token ids, cosine)
before anything is timed; the speed ratio is reported (extra_info, printed), never asserted.
Targets (issue 9): >= 1.5x on the 2k-token text, >= 1.2x on images.

Prefix caching is off: the rounds repeat the same inputs, and this benchmark times the prefill
itself (the cache's gain is benchmarks/test_bench_prefix.py's). Rounds are interleaved (the baseline runs in the benchmark's untimed setup before each timed
engine round), so both sides see the same machine load; the speedup is the median of the rounds'
ratios (`conftest.paired_rounds`).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import paired_rounds, verdict
from naive_pipeline import NaivePipeline
from tte_engine import Engine
from tte_engine.config import EngineConfig

ROUNDS = 5
TARGETS = {"long_text_2k": 1.5, "images_4x224": 1.2}
_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every tall bright tower".split()


def _texts(count: int, words: tuple[int, int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, int(rng.integers(*words)))) for _ in range(count)]


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WORKLOADS = {
    "short_texts_64": lambda: _texts(64, (6, 40), seed=1),
    "long_text_2k": lambda: _texts(1, (787, 788), seed=2),  # ~2,000 prompt tokens with bench-small's tokenizer
    "images_4x224": lambda: [{"image": _image(224, 224, seed=i)} for i in range(4)],
}


class NaiveNoThink(NaivePipeline):
    """transformers' recipe for a think=False embedding: prompt + suffix, one forward, last token."""

    @torch.no_grad()
    def embed(self, items) -> tuple[torch.Tensor, list[list[int]]]:
        prompts, images = zip(*(self._prompt(it) for it in items))
        full = [list(p) + self.suffix_ids for p in prompts]
        hidden = self.model.model(**self._batch(full, list(images))).last_hidden_state[:, -1]
        return F.normalize(hidden.float(), dim=-1), full


@pytest.fixture(scope="module")
def pipelines(bench_small, engine_options):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine(bench_small, config=EngineConfig(enable_prefix_caching=False, **engine_options))  # every round computes its prefill
    p = engine.prompts
    naive = NaiveNoThink(bench_small, think_start="", suffix_ids=p.suffix_ids, stop_ids=p.think_end_ids + p.eos_ids,
                         suppress_ids=p.suppressed_ids, instruction=engine.tte.instructions["default"])
    return engine, naive


@pytest.mark.parametrize("workload", WORKLOADS)
def test_bench_prefill_vs_transformers(benchmark, pipelines, workload):
    engine, naive = pipelines
    items = WORKLOADS[workload]()
    ours = engine.embed(items, think=False)  # warm-up, and the answers to check
    ref, ref_ids = naive.embed(items)
    # the two pipelines must compute the same thing before their speed means anything
    assert [p + s for p, s in zip(ours.prompt_token_ids, ours.embed_token_ids)] == ref_ids
    cos = float(F.cosine_similarity(ours.embeddings, ref).min())
    assert cos >= 0.9999, f"{workload}: engine and transformers disagree (min cosine {cos:.6f})"

    engine_s, naive_s, speedup, pairs = paired_rounds(benchmark, lambda: engine.embed(items, think=False), lambda: naive.embed(items), ROUNDS)
    tokens = sum(map(len, ref_ids))
    benchmark.extra_info.update(workload=workload, items=len(items), tokens=tokens, naive_median_s=round(naive_s, 4),
                                engine_median_s=round(engine_s, 4), speedup=round(speedup, 2), target=TARGETS.get(workload),
                                min_cosine=round(cos, 6), threads=torch.get_num_threads())
    target = f" ({verdict(speedup, TARGETS[workload])})" if workload in TARGETS else " (no target)"
    print(f"\n{workload}: {len(items)} items, {tokens} tokens: engine {engine_s:.3f}s  transformers {naive_s:.3f}s  "
          f"speedup {speedup:.2f}x{target} (median of {pairs} paired rounds; {torch.get_num_threads()} threads)")
