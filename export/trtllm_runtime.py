"""Think-then-embed inside TensorRT-LLM (PyTorch backend): a Qwen2-VL model variant that emits what pooling needs, and a runner.

STATUS: NEVER RUN. TensorRT-LLM cannot be installed on the machines this was written on, so no
line below that touches `tensorrt_llm` has executed. What is tested on CPU is everything around
it: the request plan (`trtllm_plan.py`: token ids, options, the forced tail), the weight layout
(`hf_checkpoint.py`, read back by our loader and by transformers), and the emitted-output
contract (rows gathered like TensorRT-LLM's logits, accumulated like its executor, pooled like our
engine). Run `python -m tte_engine.export.trtllm_runtime DIR` on a TensorRT-LLM machine to check it.

Written against TensorRT-LLM's main branch as read from its repository (NVIDIA/TensorRT-LLM):
- tensorrt_llm/_torch/models/modeling_qwen2vl.py: `Qwen2VLModelBase` (vision via transformers'
  `model.visual`, `fuse_input_embeds`, M-RoPE config, `self.llm` = Qwen2ForCausalLM built by
  `AutoModelForCausalLM.from_config`), `register_auto_model("Qwen2VLForConditionalGeneration")`,
  `register_input_processor(Qwen2VLInputProcessorBase, model_type="qwen2_vl")`.
- tensorrt_llm/_torch/modules/logits_processor.py: the logits gather (`cumsum(seq_lens) - 1` per
  request unless context logits are returned), which the emitted rows follow.
- tensorrt_llm/_torch/pyexecutor/handle_additional_outputs.py: how a forward's extra outputs
  become `additional_context_outputs` / `additional_generation_outputs` per request.
- docs/source/features/additional-outputs.md and tensorrt_llm/sampling_params.py
  (`AdditionalModelOutput(name, gather_context)`, `LogitsProcessor.__call__`):
  a model forward returns a dict with "logits" plus the extra tensors.
- tensorrt_llm/_torch/modules/linear.py (`FP8QDQLinearMethod`, `FP8RowwiseLinearMethod`) and
  tensorrt_llm/quantization/modelopt_config.py: the FP8 layouts `hf_checkpoint.py` writes.
- docs/source/features/quantization.md, kvcache.md: `KvCacheConfig(enable_block_reuse, dtype)`.

The variant subclasses TensorRT-LLM's own Qwen2-VL model and changes only the end of its
forward: the language model's decoder (`self.llm.model`) is run once, its final-norm output goes
through the usual logits processor, and the same rows (gathered the same way) are returned as
`tte_pooled`; with an `mhsa` head, a forward hook on decoder layer L-K records its input stream
(hidden + residual, as TensorRT-LLM's fused-norm layers carry it) as `tte_source` for every token.
Which architecture is built: the exported config.json names the variant in `architectures` (and
carries `tte_source_layer`), so TensorRT-LLM's auto model picks the class `register_model()`
registered in this process; transformers still reads the directory as Qwen2-VL (`model_type`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .trtllm_plan import (
    LAUNCH_FILE,
    OUT_POOLED,
    OUT_SOURCE,
    VARIANT_ARCHITECTURE,
    HeadRunner,
    TraceThenSuffix,
    plan_request,
    pool_embedding,
)

logger = logging.getLogger("tte_engine")

_REGISTERED: dict[str, Any] = {}


def emitted_rows(hidden: torch.Tensor, seq_lens: torch.Tensor | None, return_context_logits: bool) -> torch.Tensor:
    """The rows of `hidden` [num_tokens, D] that TensorRT-LLM's LogitsProcessor turns into logits.

    One per request (its last token) unless context logits are returned (then every row); this is
    the row layout handle_additional_outputs.py expects for an output gathered without context.
    """
    if return_context_logits:
        return hidden
    if seq_lens is None:
        return hidden[-1:]
    last = torch.cumsum(seq_lens.to(torch.long), dim=0) - 1
    return hidden[last.to(hidden.device)]


def register_model():
    """Define and register the TTE Qwen2-VL variant with TensorRT-LLM; returns the class. Imports tensorrt_llm."""
    if "cls" in _REGISTERED:
        return _REGISTERED["cls"]
    from tensorrt_llm._torch.models.modeling_qwen2vl import Qwen2VLModel  # noqa: I001  (never run here)
    from tensorrt_llm._torch.models.modeling_multimodal_utils import fuse_input_embeds
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model

    @register_auto_model(VARIANT_ARCHITECTURE)
    class TTEQwen2VLModel(Qwen2VLModel):
        """Qwen2-VL whose forward returns {"logits", "tte_pooled"[, "tte_source"]} (see the module doc)."""

        def __init__(self, model_config, *args, **kwargs):
            super().__init__(model_config, *args, **kwargs)
            self.tte_source_layer = getattr(model_config.pretrained_config, "tte_source_layer", None)
            self._source: list[torch.Tensor] = []
            if self.tte_source_layer is not None:
                layer = self.llm.model.layers[self.tte_source_layer]

                def record(_module, args, kwargs):
                    h = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
                    residual = kwargs.get("residual")
                    self._source.append(h if residual is None else h + residual)

                layer.register_forward_pre_hook(record, with_kwargs=True)

        @torch.inference_mode()
        def forward(self, attn_metadata, input_ids=None, position_ids=None, input_embeds=None,
                    return_context_logits: bool = False, **kwargs):
            num_context = attn_metadata.num_contexts
            multimodal_params = kwargs.get("multimodal_params", [])
            mm_embeds, mrope_config = [], {}
            if multimodal_params:
                mm_embeds = self.mm_encoder.forward(multimodal_params[:num_context])
                mrope_config = self._parse_and_concat_mrope_config(multimodal_params, num_context, attn_metadata.num_generations)
            if "mrope_position_deltas" in kwargs:
                mrope_config["mrope_position_deltas"] = kwargs["mrope_position_deltas"]
            input_ids, input_embeds = fuse_input_embeds(self.llm.model.embed_tokens, input_ids, mm_embeds)
            self._source.clear()
            hidden = self.llm.model(input_ids=input_ids, attn_metadata=attn_metadata, position_ids=position_ids,
                                    inputs_embeds=input_embeds, mrope_config=mrope_config)
            logits = self.llm.logits_processor.forward(hidden, self.llm.lm_head, attn_metadata, return_context_logits)
            seq_lens = getattr(attn_metadata, "seq_lens_cuda", None)
            out = {"logits": logits, OUT_POOLED: emitted_rows(hidden, seq_lens, return_context_logits)}
            if self._source:
                # gathered with context: every token's row, the executor slices per request
                out[OUT_SOURCE] = self._source[-1]
            return out

    _REGISTERED["cls"] = TTEQwen2VLModel
    return TTEQwen2VLModel


class TrtllmTTE:
    """Generate the trace and pool the embedding in TensorRT-LLM, from a `tte-export --target trtllm` directory.

    embed(items) -> float32 [N, D] L2-normalized, with `.traces` of the last call. Needs
    tensorrt_llm (imported here, lazily) and a GPU. Never run (see the module doc).
    """

    def __init__(self, path: str | Path, **llm_overrides: Any):
        self.path = Path(path)
        self.launch = json.loads((self.path / LAUNCH_FILE).read_text())
        from tte_engine import Engine  # our engine on CPU, for prompt building only (no weights run)

        self.planner = Engine(self.path, device="cpu", cache_memory=256 << 20)  # loads the weights on CPU (only its prompt building is used)
        register_model()
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        args = dict(self.launch["llm_args"])
        args.update(llm_overrides)
        kv = KvCacheConfig(**args.pop("kv_cache_config"))
        args.pop("backend", None)  # LLM from tensorrt_llm is the PyTorch backend's
        self.llm = LLM(model=str(self.path), kv_cache_config=kv, **args)
        self.head = None
        if self.launch["head"]["type"] == "mhsa":
            self.head = HeadRunner.load(self.path, self.planner.model_cfg, self.planner.tte.head, device="cuda", dtype=torch.bfloat16)
        self.traces: list[list[int]] = []

    def _sampling_params(self, plan):
        from tensorrt_llm import SamplingParams

        try:
            from tensorrt_llm.sampling_params import AdditionalModelOutput

            outputs = [AdditionalModelOutput(name=n, gather_context=g) for n, g in plan.output_names()]
        except ImportError:  # releases where the option is a list of names (no context gathering)
            outputs = [n for n, _ in plan.output_names()]
        return SamplingParams(**plan.sampling_options(), logits_processor=TraceThenSuffix(plan), additional_model_outputs=outputs)

    def embed(self, items: list[Any], *, think: bool = True, max_trace_tokens: int | None = None) -> torch.Tensor:
        plans = [plan_request(self.planner, item, i, think=think, max_trace_tokens=max_trace_tokens) for i, item in enumerate(items)]
        prompts = [{"prompt": p.prompt_text, **({"multi_modal_data": {"image": p.images}} if p.images else {})} for p in plans]
        results = self.llm.generate(prompts, [self._sampling_params(p) for p in plans])
        d = self.launch["hidden_size"]
        rows, self.traces = [], []
        for plan, res in zip(plans, results):
            seq = res.outputs[0]
            self.traces.append(list(seq.token_ids))
            rows.append(pool_embedding(plan, seq.additional_context_outputs or {}, seq.additional_generation_outputs or {}, d, self.head))
        return torch.stack(rows)


def _cannot_run(path: Path) -> str | None:
    """Why the check cannot run here (one line), or None: checked before any weights load."""
    if not (path / LAUNCH_FILE).is_file():
        hint = f"; the export's trtllm/ folder is {path / 'trtllm'}" if (path / "trtllm" / LAUNCH_FILE).is_file() else ""
        return f"{path} is not a `tte-export --target trtllm` directory (no {LAUNCH_FILE}){hint}"
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed (this check runs on a GPU machine with tensorrt_llm importable)"
    if not torch.cuda.is_available():
        return "no CUDA device: TensorRT-LLM needs a GPU"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m tte_engine.export.trtllm_runtime DIR`: embed two items with TensorRT-LLM and with our engine, print the cosines."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tte_engine.export.trtllm_runtime EXPORT_DIR/trtllm", file=sys.stderr)
        return 2
    problem = _cannot_run(Path(argv[0]))
    if problem:
        print(f"trtllm_runtime: error: {problem}", file=sys.stderr)
        return 2
    from tte_engine import Engine

    items = ["a cat on a chair", "two dogs play with a ball in the park"]
    trt = TrtllmTTE(argv[0])
    ours = Engine(argv[0], device="cuda", dtype="bfloat16").embed(items)
    got = trt.embed(items)
    cos = torch.nn.functional.cosine_similarity(got, ours.embeddings.cpu(), dim=-1)
    print(json.dumps({"cosine_vs_tte_engine": cos.tolist(), "same_traces": [a[: len(b)] == b for a, b in zip(trt.traces, ours.trace_token_ids)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
