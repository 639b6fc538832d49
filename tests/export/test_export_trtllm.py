"""The legacy TensorRT-LLM 1.x target (`trtllm-legacy`): config and tensor naming, the build command, the
defects an audit found (each has a test here), and a reader that loads the checkpoint back into our engine
(TensorRT-LLM itself is not installable here), which must reproduce traces and embeddings."""

import json

import pytest
import torch
from safetensors.torch import load_file

from export_fixtures import float_engine  # noqa: F401  (pytest fixtures)
from tte_engine import Engine
from tte_engine.export.pipeline import ExportOptions, run_export
from tte_engine.export.trtllm import read_checkpoint, to_engine_dir
from tte_engine.model.fp8 import FP8_DTYPE, FP8_MAX


def _row_cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _assert_same_engine(a: Engine, b: Engine, items):
    items = items[:4]  # text of two lengths and two image sizes
    ra, rb = a.embed(items), b.embed(items)
    assert ra.trace_token_ids == rb.trace_token_ids
    assert _row_cos(ra.embeddings, rb.embeddings).min() >= 0.99999


@pytest.fixture(scope="module", params=["untied-mhsa", "tied-last-token"])
def float_export(request, make_checkpoint, tmp_path_factory):
    """(checkpoint, native export dir whose `trtllm` is the `--target trtllm-legacy` output), float32, in process."""
    if request.param == "untied-mhsa":
        ckpt = make_checkpoint("trt-mhsa", head="mhsa", head_layers=2, think_max_tokens=8)
    else:
        ckpt = make_checkpoint("trt-tied", head="last_token", tie_word_embeddings=True, think_max_tokens=8)
    out = tmp_path_factory.mktemp("trt") / request.param
    run_export(ExportOptions(checkpoint=str(ckpt), out=out / "legacy", target="trtllm-legacy", calibration=0))
    run_export(ExportOptions(checkpoint=str(ckpt), out=out / "native", calibration=0))
    (out / "native" / "trtllm").symlink_to(out / "legacy" / "trtllm-legacy")  # the tests read out/trtllm next to the native dir
    return ckpt, out / "native"


def test_config_follows_the_trtllm_qwen2_vl_format(float_export):
    ckpt, out = float_export
    cfg = json.loads((out / "trtllm" / "config.json").read_text())
    hf = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "Qwen2VLForConditionalGeneration" and cfg["dtype"] == "float32"
    assert cfg["position_embedding_type"] == "mrope" and cfg["rotary_scaling"] == {"type": "mrope", "mrope_section": [4, 6, 6]}
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"])
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["quantization"]["quant_algo"] is None and cfg["quantization"]["kv_cache_quant_algo"] is None
    assert cfg["tie_word_embeddings"] == hf["tie_word_embeddings"]


def test_tensor_names_and_the_gate_up_swap(float_export):
    """attention.qkv = [q; k; v], mlp.fc = gate_proj, mlp.gate = up_proj, as TensorRT-LLM's Qwen converter maps them."""
    ckpt, out = float_export
    hf = load_file(str(ckpt / "model.safetensors"))
    trt = load_file(str(out / "trtllm" / "rank0.safetensors"))
    p, h = "transformer.layers.1.", "model.layers.1."
    qkv = torch.cat([hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(trt[p + "attention.qkv.weight"], qkv)
    assert torch.equal(trt[p + "attention.qkv.bias"], torch.cat([hf[h + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(trt[p + "attention.dense.weight"], hf[h + "self_attn.o_proj.weight"])
    assert torch.equal(trt[p + "mlp.fc.weight"], hf[h + "mlp.gate_proj.weight"])
    assert torch.equal(trt[p + "mlp.gate.weight"], hf[h + "mlp.up_proj.weight"])
    assert torch.equal(trt[p + "mlp.proj.weight"], hf[h + "mlp.down_proj.weight"])
    assert torch.equal(trt[p + "input_layernorm.weight"], hf[h + "input_layernorm.weight"])
    assert torch.equal(trt[p + "post_layernorm.weight"], hf[h + "post_attention_layernorm.weight"])
    assert torch.equal(trt["transformer.vocab_embedding.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(trt["transformer.ln_f.weight"], hf["model.norm.weight"])
    assert torch.equal(trt["lm_head.weight"], hf.get("lm_head.weight", hf["model.embed_tokens.weight"]))  # a copy when tied
    assert not any(n.startswith(("visual", "head")) for n in trt)


def test_reader_reproduces_the_original_engine(float_export, mixed_items, tmp_path):
    ckpt, out = float_export
    back = to_engine_dir(out / "trtllm", out, tmp_path / "from-trtllm")
    _assert_same_engine(Engine(back), Engine(ckpt), mixed_items)


def test_build_files_and_the_audited_defects(float_export):
    """--kv_cache_type paged (not the ignored --paged_kv_cache), max_input_len covering prompt + trace + tail, no vision
    ONNX whose signature TensorRT-LLM's builder does not take, the run-time inputs documented, no pretend build."""
    ckpt, out = float_export
    trt = out / "trtllm"
    script = (trt / "build.sh").read_text()
    assert "trtllm-build" in script and "--use_paged_context_fmha enable" in script and "--kv_cache_type paged" in script
    assert "--paged_kv_cache" not in script
    assert "--max_multimodal_len" in script and (trt / "build.sh").stat().st_mode & 0o111
    tte = json.loads((ckpt / "tte_config.json").read_text())
    eng = Engine(ckpt)
    tail = len(eng.prompts.think_end_ids) + len(eng.prompts.suffix_ids)
    words = script.split()
    flags = dict(zip(words, words[1:]))
    assert int(flags["--max_input_len"]) == 2048 + tte["think"]["max_tokens"] + tail
    assert int(flags["--max_seq_len"]) == int(flags["--max_input_len"]) + 1
    readme = (trt / "README.md").read_text()
    for needed in ("mrope_rotary_cos_sin", "mrope_position_deltas", "input_token_extra_ids", "rotary_pos_emb", "NOT run"):
        assert needed in readme, needed
    assert not list(trt.glob("*.onnx")) and (trt / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((trt / "tokenizer" / "config.json").read_text())["model_type"] == "qwen2_vl"
    report = json.loads((out.parent / "legacy" / "export_report.json").read_text())["trtllm-legacy"]
    assert report["built"] is False and report["max_input_len"] == int(flags["--max_input_len"])


def test_per_channel_is_refused_for_qwen2_vl(float_engine, tmp_path):
    from tte_engine.errors import ExportError
    from tte_engine.export.trtllm import write_checkpoint

    with pytest.raises(ValueError, match="mrope_params"):
        write_checkpoint(float_engine.stages[0].runner.model, tmp_path / "x", dtype=torch.float32, fp8="per-channel")
    with pytest.raises(ExportError, match="per-channel cannot build"):
        run_export(ExportOptions(checkpoint="tiny-random", out=tmp_path / "y", target="trtllm-legacy", fp8=True, trtllm_fp8="per-channel"))
    assert not (tmp_path / "y").exists()


def test_fp8_per_tensor_and_kv_cache_scales(tmp_path, float_engine, mixed_items, monkeypatch):
    """quant_algo FP8: per-tensor weights_scaling_factor and static activation_scaling_factor, plus FP8 KV scales."""
    import tte_engine.export.trtllm as trtllm

    recorded = []  # the calibration's statistics, as the export collected them

    class RecordingStats(trtllm.ActivationStats):
        def __init__(self, model):
            super().__init__(model)
            recorded.append(self)

    monkeypatch.setattr(trtllm, "ActivationStats", RecordingStats)
    out = tmp_path / "pt"
    run_export(ExportOptions(checkpoint="tiny-random", out=out, target="trtllm-legacy", fp8=True, kv_cache_fp8=True, calibration=2))
    [stats] = recorded
    assert not (out / "engine.json").exists()  # trtllm-legacy only: no native engine at the root
    trt = out / "trtllm-legacy"
    cfg = json.loads((trt / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8" and cfg["quantization"]["kv_cache_quant_algo"] == "FP8"
    # an explicit exclude list replaces TensorRT-LLM's default: ln_f and the embeddings must stay in it
    assert {"lm_head", "*ln_f", "*vocab_embedding"} <= set(cfg["quantization"]["exclude_modules"])
    assert load_file(str(trt / "rank0.safetensors"))["transformer.ln_f.weight"].dtype == torch.float32
    assert "--use_fp8_context_fmha enable" in (trt / "build.sh").read_text()
    raw = load_file(str(trt / "rank0.safetensors"))
    model = float_engine.stages[0].runner.model
    gate, up = model.layers[0].gate_up_proj.weight.chunk(2)
    for name, weight in (("attention.qkv", model.layers[0].qkv_proj.weight), ("mlp.fc", gate), ("mlp.gate", up)):
        p = f"transformer.layers.0.{name}."
        scale = raw[p + "weights_scaling_factor"]
        assert scale.shape == (1,) and torch.equal(scale, (weight.abs().amax() / FP8_MAX).reshape(1))
        assert raw[p + "weight"].dtype == FP8_DTYPE
        assert raw[p + "activation_scaling_factor"].shape == (1,) and raw[p + "activation_scaling_factor"] > 0
    model_linears = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert set(stats.inputs) == {f"layers.{i}.{a}" for i in range(len(model.layers)) for a in model_linears}
    assert set(stats.kv) == set(range(len(model.layers)))
    for i in range(len(model.layers)):
        p = f"transformer.layers.{i}."
        for name, attr in (("attention.qkv", "qkv_proj"), ("attention.dense", "o_proj"), ("mlp.fc", "gate_up_proj"),
                           ("mlp.gate", "gate_up_proj"), ("mlp.proj", "down_proj")):
            amax = stats.inputs[f"layers.{i}.{attr}"]
            assert amax > 0 and torch.equal(raw[p + name + ".activation_scaling_factor"], torch.tensor([amax / FP8_MAX])), (i, name)
        assert stats.kv[i] > 0 and torch.equal(raw[p + "attention.kv_cache_scaling_factor"], torch.tensor([stats.kv[i] / FP8_MAX])), i
    assert raw["transformer.layers.1.attention.kv_cache_scaling_factor"] > 0
    _, ours = read_checkpoint(trt)
    fc_scale, gate_scale = raw["transformer.layers.0.mlp.fc.weights_scaling_factor"], raw["transformer.layers.0.mlp.gate.weights_scaling_factor"]
    half = gate.shape[0]
    assert torch.equal(ours["layers.0.gate_up_proj.weight_scale"], torch.cat([fc_scale.expand(half), gate_scale.expand(half)]))
    assert torch.equal(ours["layers.0.qkv_proj.weight"].view(torch.uint8), raw["transformer.layers.0.attention.qkv.weight"].view(torch.uint8))
    # loaded into our engine (on a float base for the parts TensorRT-LLM does not hold), it embeds like the float model
    base = tmp_path / "base"
    run_export(ExportOptions(checkpoint="tiny-random", out=base, calibration=0))
    eng = Engine(to_engine_dir(trt, base, tmp_path / "pt-back"))
    cos = _row_cos(eng.embed(mixed_items, think=False).embeddings, float_engine.embed(mixed_items, think=False).embeddings)
    assert cos.mean() >= 0.99
