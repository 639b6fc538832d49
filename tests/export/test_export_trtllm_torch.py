"""The TensorRT-LLM PyTorch-backend target (`--target trtllm`): what can be checked without TensorRT-LLM.

- request planning: the prompt TensorRT-LLM's Qwen2-VL input processor would tokenize gives exactly our
  engine's token ids, and the per-request token rule reproduces our engine's trace + embed tail;
- the emitted-output contract: rows emitted like TensorRT-LLM's logits gather, accumulated like its
  executor's handle_additional_outputs, then pooled by the runner's code, give our engine's embedding;
- the written directory (HF checkpoint naming the variant, launch config) loads back into our engine.
The TensorRT-LLM calls themselves (trtllm_runtime.py) have never run; the import is lazy.
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from oracle import random_image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine import Engine
from tte_engine.export.onnx_export import VisionGraph, _decoder_layer, vision_graph_ids
from tte_engine.export.pipeline import ExportOptions, run_export
from tte_engine.export.trtllm_plan import (
    OUT_POOLED,
    OUT_SOURCE,
    VARIANT_ARCHITECTURE,
    HeadRunner,
    StepSimulator,
    TraceThenSuffix,
    plan_request,
    pool_embedding,
    sequence_positions,
)
from tte_engine.export.trtllm_runtime import emitted_rows
from tte_engine.kernels.norms import rms_norm_torch
from tte_engine.vision import ImageProcessorConfig


@pytest.fixture(scope="module", params=["mhsa", "last_token"])
def ckpt(request, make_checkpoint):
    return make_checkpoint(f"trt-torch-{request.param}", head=request.param, think_max_tokens=6)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(ckpt)


def _items():
    return ["a cat on a chair", {"text": "What is shown in this picture?", "image": random_image(60, 90, 1)},
            {"image": random_image(130, 50, 2), "instruction": "retrieval"}]


def _hf_processor_ids(ckpt, text: str, images) -> list[int]:
    """What Qwen2VLProcessor (TensorRT-LLM's input processor calls it) makes of text + images: each
    `<|image_pad|>` expanded to grid_thw.prod() / merge^2 pads by transformers' own image processor, then tokenized."""
    tok = AutoTokenizer.from_pretrained(ckpt)
    cfg = ImageProcessorConfig.load(ckpt)
    if images:
        grids = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)(images=images, return_tensors="pt")["image_grid_thw"]
        parts = text.split("<|image_pad|>")
        assert len(parts) == len(images) + 1
        text = parts[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p for g, p in zip(grids, parts[1:]))
    return tok(text, add_special_tokens=False).input_ids


def test_request_plan_sends_the_engines_token_ids(ckpt, engine):
    for i, item in enumerate(_items()):
        for think in (True, False):
            plan = plan_request(engine, item, i, think=think)
            seq = engine.make_sequence(item, i, think=think)
            assert plan.prompt_token_ids == seq.prompt.token_ids
            assert _hf_processor_ids(ckpt, plan.prompt_text, plan.images) == seq.prompt.token_ids, (i, think)
            assert torch.equal(plan.positions, seq.positions) and plan.rope_delta == seq.rope_delta
            opts = plan.sampling_options()
            assert opts["top_k"] == 1 and opts["end_id"] == engine.model_cfg.image_token_id
            assert opts["end_id"] in engine.prompts.suppressed_ids  # the sentinel can never be generated freely
            assert opts["max_tokens"] == (engine.tte.think.max_tokens if think else 0) + len(engine.prompts.think_end_ids) + len(engine.prompts.suffix_ids) + 1
            names = dict(plan.output_names())
            assert names == ({OUT_POOLED: False, OUT_SOURCE: True} if engine.tte.head.type == "mhsa" else {OUT_POOLED: False})


def _drive(rule: TraceThenSuffix, model_choices: list[int]) -> list[int]:
    """Greedy decoding as TensorRT-LLM would run it with the rule: the model proposes, the rule forces."""
    generated, free = [], iter(model_choices)
    for _ in range(rule.plan.max_tokens):
        forced = rule.forced(generated)
        generated.append(next(free) if forced is None else forced)
        if generated[-1] == rule.plan.end_id:
            break
    return generated


def test_the_token_rule_reproduces_the_engines_trace_and_tail(engine):
    res = engine.embed(_items())
    for i, item in enumerate(_items()):
        plan = plan_request(engine, item, i)
        trace = res.trace_token_ids[i]
        assert _drive(TraceThenSuffix(plan), trace + [0] * 50) == trace + res.embed_token_ids[i] + [plan.end_id]
    p = engine.prompts
    plan = plan_request(engine, "a cat", 0, max_trace_tokens=5)
    filler = [t for t in range(100) if t not in p.suppressed_ids and [t] not in p.stop_sequences][:3]
    # an early think-end: no second marker, straight to the suffix; an EOS: the marker is added
    assert _drive(TraceThenSuffix(plan), filler[:1] + p.think_end_ids) == filler[:1] + p.think_end_ids + p.suffix_ids + [plan.end_id]
    eos = p.eos_ids[0]
    assert _drive(TraceThenSuffix(plan), [filler[0], eos]) == [filler[0], eos] + p.think_end_ids + p.suffix_ids + [plan.end_id]
    # the budget: five free tokens, then the marker
    assert _drive(TraceThenSuffix(plan), filler * 5) == (filler * 5)[:5] + p.think_end_ids + p.suffix_ids + [plan.end_id]
    plan0 = plan_request(engine, "a cat", 0, think=False)
    assert _drive(TraceThenSuffix(plan0), []) == p.suffix_ids + [plan0.end_id]


def test_the_logits_processor_edits_logits_in_place(engine):
    plan = plan_request(engine, "a cat", 0, max_trace_tokens=2)
    rule = TraceThenSuffix(plan)
    vocab = engine.model_cfg.text.vocab_size
    logits = torch.zeros(1, 1, vocab)
    rule(0, logits, [plan.prompt_token_ids + []], 0, None)
    assert torch.isinf(logits[..., plan.suppressed_ids]).all() and torch.isfinite(logits).sum() == vocab - len(set(plan.suppressed_ids))
    logits = torch.zeros(1, 1, vocab)
    rule(0, logits, [plan.prompt_token_ids + [5, 6]], 0, None)  # budget reached: the marker is forced
    assert torch.isfinite(logits).sum() == 1 and int(logits.argmax()) == engine.prompts.think_end_ids[0]


def _dense_states(engine, item, ids: list[int]):
    """Per-token (final-norm hidden [T, D], stream entering layer L-K [T, D]) by a dense causal pass on our model's weights."""
    model = engine.stages[0].runner.model
    prompt = engine.prompts.build(engine_query(item), 0, think=True)
    x = model.embed_tokens(torch.tensor(ids))
    if prompt.images:
        grids = [im.grid_thw for im in prompt.images]
        pos_ids, seg = vision_graph_ids(grids, model.cfg.vision.spatial_merge_size)
        img = VisionGraph(model)(torch.cat([im.patches for im in prompt.images]).float(), torch.from_numpy(pos_ids), torch.from_numpy(seg))
        mask = torch.tensor(ids) == model.cfg.image_token_id
        x[mask] = img
    plan = plan_request(engine, item, 0)
    from tte_engine.export.onnx_export import MRopeAngles

    cos, sin = MRopeAngles(model.cfg.text)(sequence_positions(plan, len(ids)))
    h, residual, source = x, None, None
    for i, layer in enumerate(model.layers):
        if model.head is not None and i == model.head.source_layer:
            source = h if residual is None else h + residual
        h, residual = _decoder_layer(layer, h, residual, cos, sin)
    final = rms_norm_torch(h + residual, model.norm, model.cfg.text.rms_norm_eps)
    return final, source


def engine_query(item):
    from tte_engine.inputs import as_query

    return as_query(item, 0)


@torch.inference_mode()
def test_emitted_outputs_pool_to_the_engines_embedding(ckpt, engine):
    """The variant's contract, step by step as TensorRT-LLM runs the single request: one context step over the
    prompt, one generation step per trace/tail token; rows gathered like its logits and accumulated like its
    executor; pooled by the runner's code (HeadRunner for mhsa). Must equal our engine's embedding."""
    items = _items()
    res = engine.embed(items)
    head = HeadRunner.load(ckpt, engine.model_cfg, engine.tte.head) if engine.tte.head.type == "mhsa" else None
    for i, item in enumerate(items):
        plan = plan_request(engine, item, i)
        generated = res.trace_token_ids[i] + res.embed_token_ids[i] + [plan.end_id]
        ids = plan.prompt_token_ids + generated[:-1]  # the sentinel is produced, never fed
        final, source = _dense_states(engine, item, ids)
        sim = StepSimulator(plan.output_names())
        p = len(plan.prompt_token_ids)
        seq_lens = torch.tensor([p])
        rows_all = {OUT_POOLED: final[:p], OUT_SOURCE: source[:p] if source is not None else None}
        sim.context_step(rows_all, {OUT_POOLED: emitted_rows(final[:p], seq_lens, False)})
        for t in range(p, len(ids)):
            sim.generation_step({OUT_POOLED: emitted_rows(final[t:t + 1], torch.tensor([1]), False),
                                 OUT_SOURCE: source[t:t + 1] if source is not None else None})
        emb = pool_embedding(plan, sim.context_outputs, sim.generation_outputs, engine.model_cfg.text.hidden_size, head)
        assert F.cosine_similarity(emb, res.embeddings[i], dim=0) >= 0.99999, i
    with pytest.raises(ValueError, match="every prompt position"):
        plan = plan_request(engine, items[0], 0)
        if plan.head == "mhsa":
            pool_embedding(plan, {OUT_SOURCE: torch.zeros(1, engine.model_cfg.text.hidden_size)}, {OUT_SOURCE: torch.zeros(3, engine.model_cfg.text.hidden_size)},
                           engine.model_cfg.text.hidden_size, head)
        else:
            raise ValueError("every prompt position")  # last_token pools from generation rows only


def test_emitted_rows_follow_the_logits_gather():
    hidden = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(emitted_rows(hidden, torch.tensor([4, 1, 1]), False), hidden[[3, 4, 5]])
    assert torch.equal(emitted_rows(hidden, torch.tensor([4, 1, 1]), True), hidden)


def test_trtllm_directory_loads_back_and_names_the_variant(ckpt, engine, tmp_path):
    out = tmp_path / "x"
    run_export(ExportOptions(checkpoint=str(ckpt), out=out, target="trtllm", calibration=0, max_batch_size=8, max_input_len=512))
    trt = out / "trtllm"
    cfg = json.loads((trt / "config.json").read_text())
    assert cfg["architectures"] == [VARIANT_ARCHITECTURE] and cfg["model_type"] == "qwen2_vl"
    assert cfg["tte_source_layer"] == engine.stages[0].runner.model.head_source_layer
    launch = json.loads((trt / "tte_trtllm.json").read_text())
    tail = len(engine.prompts.think_end_ids) + len(engine.prompts.suffix_ids)
    assert launch["llm_args"]["max_seq_len"] == 512 + engine.tte.think.max_tokens + tail + 1
    assert launch["llm_args"]["max_batch_size"] == 8 and launch["tokens"]["end_id"] == engine.model_cfg.image_token_id
    # block reuse would leave reused prompt positions without source states: off for mhsa, on otherwise
    assert launch["llm_args"]["kv_cache_config"]["enable_block_reuse"] is (engine.tte.head.type != "mhsa")
    assert "never run" in launch["tested_against"] and "NEVER RUN" in (trt / "README.md").read_text()
    back = Engine(trt)
    a, b = back.embed(_items()), engine.embed(_items())
    assert a.trace_token_ids == b.trace_token_ids
    assert F.cosine_similarity(a.embeddings, b.embeddings).min() >= 0.99999


def test_the_runtime_check_says_in_one_line_why_it_cannot_run(ckpt, tmp_path, capsys):
    """`python -m tte_engine.export.trtllm_runtime DIR` (the README's check for a GPU machine) ends
    with one line and exit 2, before loading any weights, where it cannot run: it ended in a
    ModuleNotFoundError traceback without TensorRT-LLM. The export's root is pointed to its folder."""
    from tte_engine.export.trtllm_runtime import main

    out = tmp_path / "x"
    run_export(ExportOptions(checkpoint=str(ckpt), out=out, target="trtllm", calibration=0))
    cases = [(out, "the export's trtllm/ folder is"), (tmp_path / "missing", "is not a `tte-export --target trtllm` directory"),
             (out / "trtllm", "TensorRT-LLM is not installed")]
    for path, says in cases:
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trtllm_runtime: error: ") and says in err and err.count("\n") == 1, err


def test_tensorrt_llm_is_imported_lazily(ckpt, tmp_path):
    code = ("import sys; import tte_engine.export.trtllm_runtime as r, tte_engine.export.pipeline; "
            "assert 'tensorrt_llm' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    from tte_engine.export.trtllm_runtime import register_model

    with pytest.raises(ImportError):
        register_model()
