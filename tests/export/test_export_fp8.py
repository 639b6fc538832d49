"""FP8: the E4M3 linear layer, what `--fp8` quantizes, the accuracy report, and the FP8 engine on CPU."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from export_fixtures import float_engine, fp8_all_export  # noqa: F401  (pytest fixtures)
from tte_engine import Engine
from tte_engine.model.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, decoder_linear_names, quantize_rows


def test_quantize_rows_scales_each_output_channel():
    w = torch.randn(48, 64) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different magnitude
    q, scale = quantize_rows(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (48,)
    assert torch.equal(scale, w.abs().amax(1) / FP8_MAX)
    assert torch.equal(q.float().abs().amax(1), torch.full((48,), FP8_MAX))  # each row uses the full E4M3 range
    rel = ((q.float() * scale[:, None] - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < 0.04  # 3 mantissa bits: ~2-3% relative error per row, whatever its magnitude


def _cpu_scaled_mm_takes_row_scales() -> bool:
    """torch._scaled_mm on CPU with row-wise scales (what the GPU path calls): torch 2.13's CPU build
    runs it; 2.11's refuses any scale but a per-tensor one (an internal assert in mkldnn/Linear.cpp).
    CUDA builds on Hopper take row-wise scales from 2.11 on (the GPU check runs this path there)."""
    a = torch.zeros(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _fp8_pair():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True)
    return lin, Fp8Linear.from_linear(lin), torch.randn(7, 64).to(torch.bfloat16)


@pytest.mark.skipif(not _cpu_scaled_mm_takes_row_scales(), reason="this torch's CPU _scaled_mm takes per-tensor scales only (as 2.11's does; 2.13's takes row-wise ones)")
def test_fp8_linear_cpu_path_matches_the_tensor_core_path():
    """The dequantize + fake-quant path (CPU) against torch._scaled_mm with row-wise scales (the GPU path)."""
    _, fp8, x = _fp8_pair()
    fake = fp8(x)  # auto: not on FP8-capable CUDA -> dequantized, activations fake-quantized
    fp8.use_scaled_mm = True
    cores = fp8(x)
    assert fake.dtype == cores.dtype == torch.bfloat16 and fake.shape == (7, 96)
    assert torch.allclose(fake.float(), cores.float(), atol=0.02, rtol=0.02)


def test_fp8_linear_error_is_the_quantization_error():
    """Weights-only FP8 is closer to the float layer than weights + per-token activations, and both are close."""
    lin, fp8, x = _fp8_pair()
    fake = fp8(x)
    exact = lin(x.float())
    assert (fake.float() - exact).norm() / exact.norm() < 0.05
    fp8.use_scaled_mm, fp8.quantize_activations = False, False
    weight_only = fp8(x.float())
    assert (weight_only - exact).norm() / exact.norm() < (fake.float() - exact).norm() / exact.norm()


def test_quantized_modules_are_decoder_and_head_linears_only(float_engine):
    model = float_engine.stages[0].runner.model
    names = decoder_linear_names(model)
    per_layer = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert len(names) == 4 * (len(model.layers) + len(model.head.layers))
    assert {n.rsplit(".", 1)[1] for n in names} == per_layer
    assert all(n.startswith(("layers.", "head.layers.")) for n in names)
    with_vision = decoder_linear_names(model, include_vision=True)
    assert "visual.blocks.0.qkv" in with_vision and "visual.merger_fc2" in with_vision and "visual.patch_embed" not in with_vision


def test_fp8_engine_dir_stores_e4m3_with_per_channel_scales(fp8_all_export, float_engine):
    out, _ = fp8_all_export
    spec = json.loads((out / "engine.json").read_text())
    quant = spec["quantization"]
    assert quant["method"] == "fp8_e4m3_per_channel" and quant["vision"] is False
    assert sorted(quant["modules"]) == sorted(decoder_linear_names(float_engine.stages[0].runner.model))
    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        for module in quant["modules"]:
            w, s = f.get_tensor(module + ".weight"), f.get_tensor(module + ".weight_scale")
            assert w.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (w.shape[0],)
        for name in ("embed_tokens.weight", "lm_head.weight", "visual.blocks.0.qkv.weight", "visual.patch_embed.weight"):
            assert f.get_tensor(name).dtype == torch.float32, name
    # FP8 halves (here: quarters, from fp32) the decoder weights on disk
    assert (out / "weights.safetensors").stat().st_size < 0.8 * sum(t.numel() * 4 for t in float_engine.stages[0].runner.model.state_dict().values())


def test_accuracy_report(fp8_all_export):
    out, proc = fp8_all_export
    acc = json.loads((out / "engine.json").read_text())["accuracy"]
    assert acc == json.loads((out / "export_report.json").read_text())["accuracy"]
    assert acc["items"] == 4
    # numerics: the FP8 engine given the same traces, and without traces
    assert acc["cosine"]["mean"] >= 0.99 and acc["cosine_no_think"]["mean"] >= 0.99
    assert acc["cosine"]["min"] <= acc["cosine"]["mean"] < 1.0  # it really is a quantized model
    assert acc["cosine_no_think"]["min"] <= acc["cosine_no_think"]["mean"] < 1.0
    assert acc["cosine_end_to_end"]["min"] <= acc["cosine_end_to_end"]["mean"]
    for key in ("trace_exact_match", "retrieval_top1_agreement"):  # shares of the 4 items
        assert acc[key] * 4 == round(acc[key] * 4) and 0 <= acc[key] <= 1, (key, acc[key])
    # an identical trace agrees on every token, so token agreement is at least the exact-match share
    assert acc["trace_exact_match"] <= acc["trace_token_agreement"] <= 1
    if acc["trace_exact_match"] == 1:  # then "own traces" are the reference's traces
        assert acc["cosine_end_to_end"]["mean"] >= 0.99
    assert "FP8 per-channel (native)" in proc.stdout and "FP8 per-tensor (static scales)" in proc.stdout and "top-1 agreement" in proc.stdout
    # where FP8 stops is said on the summary screen (tiny-random's head is mhsa)
    assert "the mhsa head's weight file stays float" in proc.stdout and "onnx/: float32 graphs" in proc.stdout


def test_accuracy_report_figures_are_computed_from_the_runs():
    """Each figure of the report recomputed from the embeddings and traces it was given."""
    from tte_engine.export.calibration import CalibrationRun, accuracy_report

    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    ref = CalibrationRun(unit(4, 32), [[1, 2, 3], [4, 5], [6], []], unit(4, 32), None)
    ref.on_reference_traces = ref.embeddings
    noisy = lambda x: torch.nn.functional.normalize(x + 0.05 * torch.randn(x.shape, generator=gen), dim=-1)  # noqa: E731
    test = CalibrationRun(noisy(ref.embeddings), [[1, 2, 3], [4, 7], [6, 8], []], noisy(ref.plain), noisy(ref.embeddings))
    rep = accuracy_report(ref, test)
    cos = (ref.embeddings * test.on_reference_traces).sum(-1)
    assert rep["items"] == 4
    assert rep["cosine"] == {"min": float(cos.min()), "mean": float(cos.mean())}
    assert rep["cosine"]["min"] < rep["cosine"]["mean"] < 1.0
    assert rep["cosine_end_to_end"]["mean"] == float((ref.embeddings * test.embeddings).sum(-1).mean())
    assert rep["cosine_no_think"]["min"] == float((ref.plain * test.plain).sum(-1).min())
    assert rep["trace_exact_match"] == 0.5  # items 0 and 3 (both empty)
    assert rep["trace_token_agreement"] == (1 + 1 / 2 + 1 / 2 + 1) / 4
    top_ref, top_test = (ref.embeddings @ ref.plain.T).argmax(-1), (test.embeddings @ test.plain.T).argmax(-1)
    assert rep["retrieval_top1_agreement"] == float((top_ref == top_test).float().mean())


def test_fp8_linear_decides_the_matmul_path_once(monkeypatch):
    """The tensor-core check (a device capability query) runs on the first forward, not on every call."""
    import tte_engine.model.fp8 as fp8_mod

    calls = []

    def supported(device):
        calls.append(device)
        return False

    monkeypatch.setattr(fp8_mod, "scaled_mm_supported", supported)
    fp8 = Fp8Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    first = fp8(x)
    for _ in range(3):
        assert torch.equal(fp8(x), first)
    assert calls == [torch.device("cpu")]
    fp8(x.float())  # another dtype: decided for it (fp32 never takes the tensor cores: no device query needed)
    fp8(x)
    assert calls == [torch.device("cpu")]
    assert fp8._auto_scaled_mm == {(torch.device("cpu"), torch.bfloat16): False, (torch.device("cpu"), torch.float32): False}


def test_fp8_engine_runs_on_cpu_close_to_float(fp8_all_export, float_engine, mixed_items):
    out, _ = fp8_all_export
    eng = Engine(out)
    model = eng.stages[0].runner.model
    assert isinstance(model.layers[0].qkv_proj, Fp8Linear) and isinstance(model.head.layers[-1].down_proj, Fp8Linear)
    assert not isinstance(model.lm_head, Fp8Linear) and model.layers[0].qkv_proj.weight.dtype == FP8_DTYPE
    ref = float_engine.embed(mixed_items, think=False)
    got = eng.embed(mixed_items, think=False)
    cos = torch.nn.functional.cosine_similarity(got.embeddings, ref.embeddings, dim=-1)
    assert cos.mean() >= 0.99 and cos.max() < 0.99999  # close, and not secretly the float weights
    traced = eng.embed(mixed_items[:2])
    assert traced.errors == [None, None] and all(traced.trace_token_ids)


def test_fp8_vision_quantizes_the_vision_tower(tmp_path, mixed_items):
    from tte_engine.export.pipeline import ExportOptions, run_export

    out = tmp_path / "fp8v"
    run_export(ExportOptions(checkpoint="tiny-random", out=out, fp8=True, fp8_vision=True, calibration=0))
    quant = json.loads((out / "engine.json").read_text())["quantization"]
    assert quant["vision"] is True and "visual.blocks.1.fc2" in quant["modules"]
    eng = Engine(out)
    assert isinstance(eng.stages[0].runner.model.visual.blocks[0].qkv, Fp8Linear)
    assert eng.embed([mixed_items[1]], think=False).errors == [None]
