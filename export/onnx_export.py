"""ONNX graphs of the parts of a TTE model that have a fixed dataflow: vision tower, embedding head,
and the `think=False` embed path (prompt -> embedding).

Our runtime modules are written for packed, paged batches (the vision tower loops over images,
the decoder reads and writes a paged KV cache through custom ops), which no exporter can trace.
The wrappers here reuse the same submodules and weights but compute attention densely over one
sequence (or a block-diagonal mask over several images), so they trace cleanly; the runtime's
numerics are untouched. Graphs are float32 (ONNX Runtime's CPU provider runs no FP8).

Not exportable, and why:
- the decode loop (trace generation): it is a data-dependent loop over a growing KV cache with
  sampling and stop rules; ONNX has no paged cache, and a loop-in-graph would re-run the whole
  prefix every step. TensorRT-LLM (`--target trtllm`) or our engine serves it.
- the `think=True` embedding as one graph, for the same reason: it needs the generated trace.
  Given a trace, feed prompt + trace + suffix ids to `embed.onnx` (it is a plain forward).
- batching several sequences into one call of `embed.onnx` / `head.onnx`: each call is one
  sequence (packing would need per-sequence causal masks; call it once per item).

Inputs are built by `prepare_inputs(engine, item)`, which uses the engine's own prompt building,
image preprocessing and M-RoPE positions, so what the graphs see matches what the engine sees.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TextConfig
from ..kernels.activations import swiglu_torch
from ..kernels.norms import rms_norm_torch
from ..model.cpu_linear import plain_linears
from ..model.decoder import DecoderLayer
from ..model.qwen2_vl import Qwen2VL
from ..model.rope import prompt_positions, text_inv_freq, vision_angles, vision_inv_freq, vision_position_ids
from ..model.vision_tower import rotate_fp32

logger = logging.getLogger("tte_engine")

OPSET = 18


# ---------------------------------------------------------------------------------------- pieces
class MRopeAngles(nn.Module):
    """cos/sin [T, head_dim] for M-RoPE positions [3, T]: each frequency follows its section's axis."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.register_buffer("inv_freq", text_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        axis = torch.repeat_interleave(torch.arange(3), torch.tensor(list(cfg.mrope_section)))
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = positions.index_select(0, self.axis).t().float()  # [T, half]
        freqs = pos * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def _decoder_layer(layer: DecoderLayer, h, residual, cos, sin):
    """One Qwen2 layer with dense causal attention over one sequence (same math as DecoderLayer)."""
    if residual is None:
        x, residual = rms_norm_torch(h, layer.input_norm, layer.eps), h
    else:
        residual = h + residual
        x = rms_norm_torch(residual, layer.input_norm, layer.eps)
    t = x.shape[0]
    nh, nkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = rotate_fp32(q.reshape(t, nh, hd), cos[:, None], sin[:, None])
    k = rotate_fp32(k.reshape(t, nkv, hd), cos[:, None], sin[:, None])
    v = v.reshape(t, nkv, hd)
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    attn = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True
    )[0].transpose(0, 1)
    h = layer.o_proj(attn.reshape(t, nh * hd))
    residual = h + residual
    x = rms_norm_torch(residual, layer.post_attention_norm, layer.eps)
    return layer.down_proj(swiglu_torch(layer.gate_up_proj(x))), residual


def _pool_last(h, residual, norm, eps):
    """Final RMSNorm at the last row, L2-normalized, fp32 (the last-token head)."""
    row = (h[-1:] + residual[-1:]) if residual is not None else h[-1:]
    row = rms_norm_torch(row, norm, eps).float()
    return (row / row.norm(dim=-1, keepdim=True).clamp_min(1e-12))[0]


# ---------------------------------------------------------------------------------------- graphs
class VisionGraph(nn.Module):
    """patches [N, patch_dim], pos_ids [N, 2] (row, col), segment_ids [N] -> image embeds [N / merge^2, D].

    Several images (or frames) go in one call: attention is masked to equal segment ids.
    """

    def __init__(self, model: Qwen2VL):
        super().__init__()
        self.visual = model.visual
        c = model.visual.cfg
        self.register_buffer("inv_freq", vision_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def forward(self, patches: torch.Tensor, pos_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        v, c = self.visual, self.visual.cfg
        x = v.patch_embed(patches)
        cos, sin = vision_angles(pos_ids, self.inv_freq)
        cos, sin = cos[:, None], sin[:, None]
        mask = (segment_ids[:, None] == segment_ids[None, :])[None, None]
        n = x.shape[0]
        for block in v.blocks:
            q, k, val = block.qkv(block.norm1(x)).reshape(n, 3, block.num_heads, -1).unbind(1)
            q, k = rotate_fp32(q, cos, sin), rotate_fp32(k, cos, sin)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], val.transpose(0, 1)[None], attn_mask=mask
            )[0].transpose(0, 1)
            x = x + block.proj(attn.reshape(n, -1))
            x = x + block.fc2(block.act(block.fc1(block.norm2(x))))
        x = v.merger_norm(x).reshape(-1, c.embed_dim * c.spatial_merge_size**2)
        return v.merger_fc2(F.gelu(v.merger_fc1(x)))


class HeadGraph(nn.Module):
    """The mhsa head: source-layer states [T, D] + positions [3, T] of one sequence -> embedding [D]."""

    def __init__(self, model: Qwen2VL):
        super().__init__()
        self.head, self.angles = model.head, MRopeAngles(model.cfg.text)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.angles(positions)
        h, residual = hidden, None
        for layer in self.head.layers:
            h, residual = _decoder_layer(layer, h, residual, cos, sin)
        return _pool_last(h, residual, self.head.norm, self.head.eps)


class EmbedGraph(nn.Module):
    """The think=False path: token ids [T] (prompt + suffix), positions [3, T], image embeds [I, D] -> embedding [D]."""

    def __init__(self, model: Qwen2VL):
        super().__init__()
        self.model, self.angles = model, MRopeAngles(model.cfg.text)
        self.image_token_id = model.cfg.image_token_id

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        # image rows in token order; a zero row at the end keeps the gather valid when there are none
        padded = torch.cat([image_embeds.to(x.dtype), torch.zeros_like(x[:1])], dim=0)
        idx = torch.where(is_image, torch.cumsum(is_image.long(), 0) - 1, torch.full_like(input_ids, image_embeds.shape[0]))
        x = torch.where(is_image[:, None], padded.index_select(0, idx), x)
        cos, sin = self.angles(positions)
        h, residual = x, None
        stop = m.head.source_layer if m.head is not None else len(m.layers)
        for layer in m.layers[:stop]:
            h, residual = _decoder_layer(layer, h, residual, cos, sin)
        if m.head is None:
            return _pool_last(h, residual, m.norm, m.cfg.text.rms_norm_eps)
        stream = h if residual is None else h + residual
        h, residual = stream, None
        for layer in m.head.layers:
            h, residual = _decoder_layer(layer, h, residual, cos, sin)
        return _pool_last(h, residual, m.head.norm, m.head.eps)


# ---------------------------------------------------------------------------------------- inputs
def vision_graph_ids(grids: list[tuple[int, int, int]], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(pos_ids [N, 2], segment_ids [N]) for packed patches, in the block-major order of the preprocessing."""
    frames = [h * w for t, h, w in grids for _ in range(t)]
    seg = torch.repeat_interleave(torch.arange(len(frames)), torch.tensor(frames))
    return vision_position_ids(grids, merge).numpy(), seg.numpy()


def prepare_inputs(engine, item: Any, *, instruction: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The inputs of each graph for one item, think=False: {"vision": {...} or absent, "embed": {...}}.

    `embed["image_embeds"]` is left empty when the item has an image: fill it with the vision
    graph's output (see `run_pipeline`).
    """
    from ..inputs import as_query

    prompt = engine.prompts.build(as_query(item, 0), 0, think=False, instruction=instruction)
    cfg = engine.model_cfg
    ids = list(prompt.token_ids) + list(engine.prompts.suffix_ids)
    pos, delta = prompt_positions(prompt.token_ids, [i.grid_thw for i in prompt.images], cfg.image_token_id, cfg.vision.spatial_merge_size)
    tail = torch.arange(len(prompt.token_ids), len(ids)) + delta
    positions = torch.cat([pos, tail.expand(3, -1)], dim=1)
    out: dict[str, dict[str, np.ndarray]] = {}
    if prompt.images:
        grids = [i.grid_thw for i in prompt.images]
        pos_ids, seg = vision_graph_ids(grids, cfg.vision.spatial_merge_size)
        out["vision"] = {
            "patches": torch.cat([i.patches for i in prompt.images]).numpy().astype(np.float32),
            "pos_ids": pos_ids,
            "segment_ids": seg,
        }
    out["embed"] = {
        "input_ids": np.asarray(ids, dtype=np.int64),
        "positions": positions.numpy().astype(np.int64),
        "image_embeds": np.zeros((0, cfg.text.hidden_size), dtype=np.float32),
    }
    return out


def run_pipeline(onnx_dir: Path, inputs: dict[str, dict[str, np.ndarray]], sessions: dict | None = None) -> np.ndarray:
    """Run vision.onnx (if the item has an image) then embed.onnx with onnxruntime on CPU; returns the embedding."""
    sessions = sessions if sessions is not None else {}

    def session(name):
        if name not in sessions:
            import onnxruntime as ort

            sessions[name] = ort.InferenceSession(str(Path(onnx_dir) / name), providers=["CPUExecutionProvider"])
        return sessions[name]

    feed = dict(inputs["embed"])
    if "vision" in inputs:
        feed["image_embeds"] = session("vision.onnx").run(None, inputs["vision"])[0]
    return session("embed.onnx").run(None, feed)[0]


# ---------------------------------------------------------------------------------------- export
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weight bytes keep them outside the .onnx file (protobuf's 2 GiB limit)


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], output: str, dynamic: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export with named dynamic axes; a large graph keeps its weights in ONE external file, `<name>.onnx.data`.

    The TorchScript exporter writes one loose file per tensor (hundreds for a 2B vision tower), so
    a large graph is exported into a scratch directory and re-saved with onnx's
    `all_tensors_to_one_file`.
    """
    import tempfile

    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        target = Path(scratch) / path.name if big else path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter is chatty about deprecations we cannot act on
            torch.onnx.export(
                module,
                args,
                str(target),
                input_names=names,
                output_names=[output],
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: ~50x faster here than dynamo, and its graphs pass onnx.checker
                do_constant_folding=True,
                external_data=big,
            )
        if big:
            import onnx

            graph = onnx.load(str(target), load_external_data=True)
            onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)


def _check_and_compare(path: Path, module: nn.Module, feeds: dict[str, np.ndarray]) -> float:
    """onnx.checker on the file, then max |onnxruntime - torch| on `feeds`."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.inference_mode():
        want = module(*(torch.from_numpy(v) for v in feeds.values())).float().numpy()
    return float(np.abs(got - want).max())


def export_onnx(engine, out: Path, *, graphs: tuple[str, ...] = ("vision", "embed", "head"), progress=None) -> dict[str, Any]:
    """Write vision.onnx, embed.onnx, head.onnx (mhsa only) — those named in `graphs` — plus onnx.json and README.md.

    `engine` must run on CPU in float32 (the graphs are fp32). Each graph is checked with
    onnx.checker and run with onnxruntime against its torch wrapper; the errors are returned.
    """
    model: Qwen2VL = engine.stages[-1].runner.model
    if model.norm.dtype != torch.float32 or model.norm.device.type != "cpu":
        raise ValueError("export_onnx needs a float32 CPU engine")
    with plain_linears(model):  # a trace needs plain weights: a CPU engine holds oneDNN-packed ones
        return _export_graphs(engine, model, out, graphs, progress)


def _export_graphs(engine, model: Qwen2VL, out: Path, graphs: tuple[str, ...], progress) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    example = {"text": "an example", "image": Image.new("RGB", (56, 84), (120, 30, 200))}
    inputs = prepare_inputs(engine, example)
    vis_in = inputs["vision"]
    report: dict[str, Any] = {"opset": OPSET, "graphs": {}}
    steps = [("vision.onnx", VisionGraph(model), vis_in, "image_embeds",
              {"patches": {0: "num_patches"}, "pos_ids": {0: "num_patches"}, "segment_ids": {0: "num_patches"}})]
    with torch.inference_mode():
        image_embeds = VisionGraph(model)(*(torch.from_numpy(v) for v in vis_in.values())).numpy()
    embed_in = dict(inputs["embed"], image_embeds=image_embeds)
    steps.append(("embed.onnx", EmbedGraph(model), embed_in, "embedding",
                  {"input_ids": {0: "num_tokens"}, "positions": {1: "num_tokens"}, "image_embeds": {0: "num_image_tokens"}}))
    if model.head is not None:
        t = embed_in["input_ids"].shape[0]
        head_in = {"hidden": np.random.default_rng(0).standard_normal((t, model.cfg.text.hidden_size)).astype(np.float32),
                   "positions": embed_in["positions"]}
        steps.append(("head.onnx", HeadGraph(model), head_in, "embedding", {"hidden": {0: "num_tokens"}, "positions": {1: "num_tokens"}}))
    steps = [s for s in steps if s[0].removesuffix(".onnx") in graphs]
    for name, module, feeds, output, dynamic in steps:
        module.eval()
        path = out / name
        with torch.no_grad():
            _export(module, tuple(torch.from_numpy(v) for v in feeds.values()), path, list(feeds), output, dynamic)
        err = _check_and_compare(path, module, feeds)
        report["graphs"][name] = {"inputs": {k: list(v.shape) for k, v in feeds.items()}, "output": output,
                                  "dynamic_axes": dynamic, "max_abs_error_vs_torch": err}
        logger.info("onnx: wrote %s (max |ort - torch| = %.2e)", path, err)
        if progress:
            progress(name)
    (out / "onnx.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(ONNX_README)
    return report


ONNX_README = """# ONNX graphs (written by tte-export)

All graphs are float32, opset {opset}, with dynamic axes; one sequence per call.

| graph | inputs | output |
|---|---|---|
| `vision.onnx` | `patches` [N, 3*2*14*14] float32, `pos_ids` [N, 2] int64 (patch row, col), `segment_ids` [N] int64 (image of each patch) | `image_embeds` [N/4, D] |
| `embed.onnx` | `input_ids` [T] int64 (prompt + embed suffix), `positions` [3, T] int64 (M-RoPE), `image_embeds` [I, D] float32 (rows for the image tokens, in order; [0, D] without images) | `embedding` [D], L2-normalized |
| `head.onnx` (mhsa head only) | `hidden` [T, D] (the residual stream entering backbone layer L-K), `positions` [3, T] | `embedding` [D] |

`embed.onnx` is the `think=False` embedding (VLM2Vec-style); with a trace, feed prompt + trace +
suffix ids. Build inputs with `tte_engine.export.onnx_export.prepare_inputs(engine, item)` and run
the chain with `run_pipeline(dir, inputs)`; `onnx.json` lists the shapes and the export-time error
against our torch engine.

Not exported: the decode loop (trace generation) — a data-dependent loop over a paged KV cache with
sampling and stop rules, which ONNX cannot express efficiently; use our engine or the TensorRT-LLM
target for it.
""".replace("{opset}", str(OPSET))
