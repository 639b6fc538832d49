"""Choosing the next trace token: greedy by default, optional temperature / top-k / top-p sampling.

Greedy decoding keeps embeddings deterministic. Vision placeholder tokens are masked out before
the choice (a trace never contains an image), and a seeded sequence samples from its own
generator, so its trace does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    suppressed_ids: list[int],
) -> list[int]:
    """One token per row of `logits` [B, V] (fp32)."""
    if suppressed_ids:
        logits[:, suppressed_ids] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        gen = generators[i]
        tokens[i] = int(torch.multinomial(probs.to("cpu" if gen is not None else probs.device), 1, generator=gen))
    return tokens


def ends_with_stop(generated: list[int], stop_sequences: list[list[int]]) -> bool:
    """True when the generated ids end with any stop sequence (single tokens or multi-token markers)."""
    return any(len(s) <= len(generated) and generated[-len(s) :] == s for s in stop_sequences if s)
