"""Think-then-embed on TensorRT-LLM's PyTorch backend: what each request sends, and how its outputs pool.

Everything here is plain Python/torch and runs without TensorRT-LLM; `trtllm_runtime.py` feeds it
to TensorRT-LLM. Design (read from TensorRT-LLM's source, see `trtllm_runtime.py` for the files):

One request per item does both stages on one KV cache. The prompt goes in as text + images (the
Qwen2-VL input processor of `tensorrt_llm/_torch/models/modeling_qwen2vl.py` tokenizes text with
the checkpoint's Hugging Face processor and takes no token ids), the trace is generated greedily,
and a per-request logits processor (`TraceThenSuffix`, TensorRT-LLM's `LogitsProcessor` call
signature from `tensorrt_llm/sampling_params.py`) applies our engine's rules: vision placeholder
ids are never generated, the trace stops at the think-end marker, an EOS or the budget; then it
forces our embed tail (think-end if the trace lacks it, then the embed suffix) and finally a
sentinel `end_id` (a vision placeholder id, which the trace can never produce), which ends the
request. The model variant emits, per processed token, the final-norm hidden state (`tte_pooled`)
and, for the `mhsa` head, the residual stream entering layer L-K (`tte_source`), through
`SamplingParams.additional_model_outputs` (handled by
`tensorrt_llm/_torch/pyexecutor/handle_additional_outputs.py`). The embedding is the pooled state of
the step whose *input* was the last tail token, i.e. the last generation output.

Why not a second request over prompt + trace + suffix that hits KV block reuse: the Qwen2-VL input
processor would re-tokenize the trace from text (not guaranteed to give the generated ids), block
reuse covers only full blocks (the tail is recomputed anyway), and reused positions emit no context
outputs (handle_additional_outputs warns exactly so), which the `mhsa` head needs for every
position. The single request computes every position once; the cost is one decode step per tail
token plus one for the sentinel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import HeadConfig, ModelConfig
from ..sampling import ends_with_stop

OUT_POOLED = "tte_pooled"  # final-norm hidden state of the processed token [D]
OUT_SOURCE = "tte_source"  # residual stream entering backbone layer L-K [D] (mhsa head only)
LAUNCH_FILE = "tte_trtllm.json"
LAUNCH_FORMAT_VERSION = 1
VARIANT_ARCHITECTURE = "TTEQwen2VLForConditionalGeneration"  # registered by trtllm_runtime.register_model()


@dataclass
class RequestPlan:
    """One item's TensorRT-LLM request: the prompt, the options, and what the engine would compute.

    prompt_token_ids: what our engine feeds the model (image placeholders expanded), which the
    Hugging Face processor must reproduce from `prompt_text` + `images`; positions [3, P] int64
    M-RoPE positions of the prompt and `rope_delta` for the generated tokens.
    """

    index: int
    prompt_text: str
    prompt_token_ids: list[int]
    images: list[Any]
    positions: torch.Tensor
    rope_delta: int
    think: bool
    max_trace_tokens: int
    think_end_ids: list[int]
    suffix_ids: list[int]
    stop_sequences: list[list[int]]
    suppressed_ids: list[int]
    end_id: int
    head: str  # "last_token" or "mhsa"

    @property
    def max_tokens(self) -> int:
        """Generated-token budget: trace + think-end + suffix + the sentinel."""
        trace = self.max_trace_tokens if self.think else 0
        return trace + len(self.think_end_ids) + len(self.suffix_ids) + 1

    def sampling_options(self) -> dict[str, Any]:
        """Keyword arguments for `tensorrt_llm.SamplingParams` (the logits processor and outputs are added by the runtime)."""
        return {"max_tokens": self.max_tokens, "end_id": self.end_id, "top_k": 1, "detokenize": False,
                "stop_token_ids": None, "ignore_eos": False}

    def output_names(self) -> list[tuple[str, bool]]:
        """(additional output, gather_context) pairs to request."""
        return [(OUT_POOLED, False)] + ([(OUT_SOURCE, True)] if self.head == "mhsa" else [])

    def embed_tail(self, trace_ids: list[int]) -> list[int]:
        """Tokens forced after the trace: think-end unless the trace wrote it, then the suffix (`Sequence.start_embed`)."""
        if not self.think:
            return list(self.suffix_ids)
        closed = bool(self.think_end_ids) and trace_ids[-len(self.think_end_ids):] == self.think_end_ids
        return ([] if closed else list(self.think_end_ids)) + list(self.suffix_ids)


class TraceThenSuffix:
    """The per-request token rule: free greedy trace (placeholders banned) until a stop, then the forced tail and the sentinel.

    `forced(generated)` is the pure rule; `__call__` is TensorRT-LLM's `LogitsProcessor` signature
    (req_id, logits, token_ids, stream_ptr, client_id), editing the logits in place; token_ids[0]
    holds the prompt followed by the generated tokens.
    """

    def __init__(self, plan: RequestPlan):
        self.plan = plan

    def trace_end(self, generated: list[int]) -> int | None:
        """Length of the trace within `generated`, once the trace is over (else None)."""
        if not self.plan.think:
            return 0
        for k in range(0, min(len(generated), self.plan.max_trace_tokens) + 1):
            if k == self.plan.max_trace_tokens or (k and ends_with_stop(generated[:k], self.plan.stop_sequences)):
                return k
        return None

    def forced(self, generated: list[int]) -> int | None:
        """The token this step must produce, or None while the trace is free."""
        k = self.trace_end(generated)
        if k is None:
            return None
        tail = self.plan.embed_tail(generated[:k]) + [self.plan.end_id]
        step = len(generated) - k
        return tail[step] if step < len(tail) else self.plan.end_id

    def __call__(self, req_id, logits: torch.Tensor, token_ids, stream_ptr=None, client_id=None) -> None:
        generated = list(token_ids[0][len(self.plan.prompt_token_ids):])
        token = self.forced(generated)
        if token is None:
            logits[..., self.plan.suppressed_ids] = float("-inf")
        else:
            keep = logits[..., token].clone()
            logits.fill_(float("-inf"))
            logits[..., token] = keep


def plan_request(engine, item: Any, index: int = 0, *, think: bool = True, max_trace_tokens: int | None = None,
                 instruction: str | None = None) -> RequestPlan:
    """The request our engine's configuration implies for `item` (raises InvalidInputError like `Engine.embed`).

    Uses the engine's own prompt builder and positions; the prompt text is the same chat template
    rendering that `PromptBuilder.build` tokenizes.
    """
    from ..errors import InvalidInputError
    from ..inputs import as_query

    query = as_query(item, index)
    seq = engine.make_sequence(item, index, think=think, max_trace_tokens=max_trace_tokens, instruction=instruction)
    p = engine.prompts
    text = p.instruction_for(query, instruction)
    if (query.text or "").strip():
        text = f"{text}\n{query.text}" if text else query.text
    if getattr(query, "video", None) is not None:
        raise InvalidInputError("the TensorRT-LLM runner sends images only (no video)", index, "video")
    content = [{"type": "image"} for _ in seq.prompt.images] + [{"type": "text", "text": text}]
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if think:
        rendered += engine.tokenizer.decode(p.think_start_ids)
    images = ([query.image] if query.image is not None else []) + list(getattr(query, "images", None) or [])
    return RequestPlan(
        index=index, prompt_text=rendered, prompt_token_ids=list(seq.prompt.token_ids), images=images,
        positions=seq.positions, rope_delta=seq.rope_delta, think=think, max_trace_tokens=seq.max_trace_tokens,
        think_end_ids=list(p.think_end_ids), suffix_ids=list(p.suffix_ids), stop_sequences=[list(s) for s in p.stop_sequences],
        suppressed_ids=list(p.suppressed_ids), end_id=int(engine.model_cfg.image_token_id), head=engine.tte.head.type,
    )


# ---------------------------------------------------------------------------------------- pooling
def _rows(x: Any, width: int) -> torch.Tensor:
    """An additional output (a tensor, or a list of per-step tensors) as [N, width] fp32."""
    if isinstance(x, (list, tuple)):
        x = torch.cat([torch.as_tensor(t).reshape(-1, width) for t in x]) if x else torch.zeros(0, width)
    return torch.as_tensor(x).reshape(-1, width).float()


def sequence_positions(plan: RequestPlan, total: int) -> torch.Tensor:
    """[3, total] M-RoPE positions of prompt + generated tokens (text positions continue with rope_delta)."""
    p = plan.positions.shape[1]
    tail = (torch.arange(p, total) + plan.rope_delta).expand(3, -1)
    return torch.cat([plan.positions, tail], dim=1)


def pool_embedding(plan: RequestPlan, context_outputs: dict[str, Any], generation_outputs: dict[str, Any], hidden_size: int,
                   head: "HeadRunner | None" = None) -> torch.Tensor:
    """The L2-normalized embedding [D] fp32 from one finished request's additional outputs.

    generation_outputs[name] holds one row per generated token: row 0 is the last prompt position
    and row j > 0 the input that produced generated token j (handle_additional_outputs.py), so the
    last row belongs to the last tail token. For `mhsa`, context rows [P] + generation rows[1:]
    are the source states of prompt + trace + tail, which `head` turns into the embedding.
    Raises ValueError when an output is missing or short.
    """
    if plan.head == "mhsa":
        if head is None:
            raise ValueError("an mhsa plan needs the head (HeadRunner) to pool")
        ctx = _rows(context_outputs.get(OUT_SOURCE), hidden_size) if OUT_SOURCE in (context_outputs or {}) else None
        gen = _rows(generation_outputs.get(OUT_SOURCE), hidden_size) if OUT_SOURCE in (generation_outputs or {}) else None
        if ctx is None or gen is None or ctx.shape[0] != len(plan.prompt_token_ids):
            raise ValueError(f"request {plan.index}: {OUT_SOURCE} must cover every prompt position (was KV block reuse on?)")
        states = torch.cat([ctx, gen[1:]])
        return head(states, sequence_positions(plan, states.shape[0]))
    if OUT_POOLED not in (generation_outputs or {}):
        raise ValueError(f"request {plan.index}: no {OUT_POOLED} output (was the TTE model variant loaded?)")
    last = _rows(generation_outputs[OUT_POOLED], hidden_size)[-1]
    return F.normalize(last, dim=-1)


class HeadRunner(nn.Module):
    """The mhsa head alone, loaded from a checkpoint's head weight file; (states [T, D], positions [3, T]) -> embedding [D] fp32."""

    def __init__(self, model_cfg: ModelConfig, head_cfg: HeadConfig):
        super().__init__()
        from ..model.heads import MHSAHead

        self.cfg, self.head_cfg = model_cfg, head_cfg
        self.head = MHSAHead(model_cfg.text, head_cfg)

    @classmethod
    def load(cls, checkpoint: Path, model_cfg: ModelConfig, head_cfg: HeadConfig, *, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> "HeadRunner":
        """Raises CheckpointError when the head weight file is missing or incomplete."""
        from ..errors import CheckpointError
        from ..model.loader import _expected, check_complete, copy_tensors, head_target_of, iter_tensors

        runner = cls(model_cfg, head_cfg).to(dtype)
        f = Path(checkpoint) / head_cfg.weights
        if not f.exists():
            raise CheckpointError(f"{checkpoint}: the mhsa head's weights {head_cfg.weights} are missing")
        filled = copy_tensors(runner, iter_tensors([f]), head_target_of, str(f))
        check_complete(_expected(runner, lambda n: n.startswith("head.")), filled, str(f))
        return runner.to(device).eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from .onnx_export import HeadGraph

        graph = HeadGraph(self)  # dense causal attention over one sequence: the same math as the engine's head
        p = next(self.parameters())
        return graph(states.to(p.device, p.dtype), positions.to(p.device)).float().cpu()


# ---------------------------------------------------------------------------------------- launch config
def launch_config(engine, *, max_batch_size: int, max_seq_len: int, fp8: str | None, kv_cache_fp8: bool) -> dict[str, Any]:
    """What `TrtllmTTE` needs to start TensorRT-LLM on the exported directory (written as tte_trtllm.json)."""
    p = engine.prompts
    return {
        "format": "tte-trtllm-launch",
        "format_version": LAUNCH_FORMAT_VERSION,
        "architecture_override": VARIANT_ARCHITECTURE,
        "llm_args": {
            "backend": "pytorch",
            "max_batch_size": max_batch_size,
            "max_seq_len": max_seq_len,
            "max_num_tokens": max(8192, max_seq_len),
            "kv_cache_config": {"enable_block_reuse": engine.tte.head.type != "mhsa",
                                **({"dtype": "fp8"} if kv_cache_fp8 else {})},
            # mhsa: the layer L-K stream is recorded by a Python hook, which a replayed CUDA graph would skip
            **({"cuda_graph_config": None} if engine.tte.head.type == "mhsa" else {}),
        },
        "quantization": fp8,
        "head": engine.tte.to_dict()["head"],
        "hidden_size": engine.model_cfg.text.hidden_size,
        "source_layer": engine.stages[-1].runner.model.head_source_layer,
        "tokens": {"think_start_ids": p.think_start_ids, "think_end_ids": p.think_end_ids, "suffix_ids": p.suffix_ids,
                   "eos_ids": p.eos_ids, "suppressed_ids": p.suppressed_ids, "stop_sequences": p.stop_sequences,
                   "end_id": int(engine.model_cfg.image_token_id)},
        "outputs": {"pooled": OUT_POOLED, "source": OUT_SOURCE},
        "tested_against": "never run: written against TensorRT-LLM's main branch source (see trtllm_runtime.py)",
    }


def write_launch_config(out: Path, config: dict[str, Any]) -> Path:
    path = Path(out) / LAUNCH_FILE
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class StepSimulator:
    """TensorRT-LLM's additional-output bookkeeping for one request, as handle_additional_outputs.py does it.

    Fed with the model's emitted rows per step (context: one row per prompt token when gathered;
    generation: one row per step), it accumulates context_outputs / generation_outputs the way the
    executor hands them to the result. Used by the CPU tests of the emitted-output contract.
    """

    names: list[tuple[str, bool]]
    context_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    generation_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def context_step(self, rows_all: dict[str, torch.Tensor], rows_last: dict[str, torch.Tensor]) -> None:
        """rows_all[name]: [P, D] (every prompt token); rows_last[name]: [1, D] (the last one, the logits gather)."""
        for name, gather_context in self.names:
            if gather_context:
                self.context_outputs.setdefault(name, []).append(rows_all[name])
                self.generation_outputs.setdefault(name, []).append(rows_all[name][-1:])
            else:
                self.generation_outputs.setdefault(name, []).append(rows_last[name][-1:])

    def generation_step(self, rows: dict[str, torch.Tensor]) -> None:
        for name, _ in self.names:
            self.generation_outputs.setdefault(name, []).append(rows[name].reshape(1, -1))
