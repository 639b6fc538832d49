"""FP8 in the formats other engines load, both ways.

Out: `--target hf --fp8` writes compressed-tensors (FP8 per output channel + dynamic per-token activations,
the native scheme, bit for bit), read here by a third party: transformers with the compressed-tensors
package, decompressing; `--target trtllm --fp8` writes ModelOpt's layout as TensorRT-LLM's loader reads it.
In: `Engine(...)` loads FP8 checkpoints as the ecosystem's tools write them (compressed-tensors' own
ModelCompressor, which llm-compressor saves with; ModelOpt's per-tensor layout with static activation scales).
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from oracle import random_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tte_engine import Engine
from tte_engine.errors import CheckpointError
from tte_engine.export.pipeline import ExportOptions, run_export
from tte_engine.model.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, fake_quantize_static
from tte_engine.model.loader import checkpoint_quantization

pytest.importorskip("compressed_tensors")


def _items():
    return ["a cat on a chair", {"text": "What is shown in this picture?", "image": random_image(60, 90, 1)}]


@pytest.fixture(scope="module")
def exported(make_checkpoint, tmp_path_factory):
    """(checkpoint, out) of `--fp8 --target all` on a last-token checkpoint (per-channel TensorRT-LLM FP8)."""
    ckpt = make_checkpoint("hf-fp8", head="last_token", think_max_tokens=8)
    out = tmp_path_factory.mktemp("hf") / "all"
    run_export(ExportOptions(checkpoint=str(ckpt), out=out, target="all", fp8=True, calibration=2, trtllm_fp8="per-channel"))
    return ckpt, out


@pytest.fixture(scope="module")
def native_fp8(exported):
    return Engine(exported[1])


def _fused_parts(native, layer):
    """hub name -> (native E4M3 rows, native scales) of one decoder layer's linears."""
    p = f"layers.{layer}."
    q, k = 128, 64  # tiny-random: 4 heads x 32, 2 kv heads
    qkv, qkv_s = native[p + "qkv_proj.weight"], native[p + "qkv_proj.weight_scale"]
    gu, gu_s = native[p + "gate_up_proj.weight"], native[p + "gate_up_proj.weight_scale"]
    h = gu.shape[0] // 2
    return {
        "self_attn.q_proj": (qkv[:q], qkv_s[:q]), "self_attn.k_proj": (qkv[q:q + k], qkv_s[q:q + k]),
        "self_attn.v_proj": (qkv[q + k:], qkv_s[q + k:]), "self_attn.o_proj": (native[p + "o_proj.weight"], native[p + "o_proj.weight_scale"]),
        "mlp.gate_proj": (gu[:h], gu_s[:h]), "mlp.up_proj": (gu[h:], gu_s[h:]),
        "mlp.down_proj": (native[p + "down_proj.weight"], native[p + "down_proj.weight_scale"]),
    }


def test_compressed_tensors_layout_is_the_native_scheme_bit_for_bit(exported):
    _, out = exported
    qc = json.loads((out / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"], group["weights"]["strategy"]) == ("float", 8, "channel")
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert "lm_head" in qc["ignore"]
    hf, native = load_file(str(out / "hf" / "model.safetensors")), load_file(str(out / "weights.safetensors"))
    for layer in (0, 3):
        for name, (w, s) in _fused_parts(native, layer).items():
            stem = f"model.layers.{layer}.{name}"
            assert hf[stem + ".weight"].dtype == FP8_DTYPE and hf[stem + ".weight_scale"].shape == (w.shape[0], 1)
            assert torch.equal(hf[stem + ".weight"].view(torch.uint8), w.view(torch.uint8)), stem
            assert torch.equal(hf[stem + ".weight_scale"][:, 0], s), stem
    assert hf["model.embed_tokens.weight"].dtype == torch.float32 and not any(n.startswith("visual") and n.endswith("_scale") for n in hf)


@torch.inference_mode()
def test_transformers_with_compressed_tensors_reads_the_export(exported, native_fp8):
    """A third-party reader: transformers + compressed-tensors (decompressing) loads the export; its weights are
    exactly our dequantized E4M3 weights and, on prompt + trace + suffix, it gives our FP8 engine's embedding
    (both quantize activations per token)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils.quantization_config import CompressedTensorsConfig

    _, out = exported
    model = Qwen2VLForConditionalGeneration.from_pretrained(out / "hf", quantization_config=CompressedTensorsConfig(run_compressed=False),
                                                            dtype=torch.float32).eval()
    native = load_file(str(out / "weights.safetensors"))
    for layer in (0, 3):
        for name, (w, scale) in _fused_parts(native, layer).items():
            got = model.model.language_model.layers[layer].get_submodule(name).weight
            assert got.dtype == torch.float32 and torch.equal(got, w.float() * scale[:, None]), (layer, name)
    # End to end with the same pixels (our preprocessing; the parity tests cover transformers' own). Per-token FP8
    # rounding turns 1e-7 upstream differences (vision-tower sums; our token-by-token decode vs one pass) into
    # occasional one-step E4M3 flips: text without a trace is bit-level, the rest gets a bound such flips stay within.
    for think in (False, True):
        for i, item in enumerate(_items()):
            bound = 0.99999 if not think and isinstance(item, str) else 0.998
            res = native_fp8.embed([item], think=think)
            ids = res.prompt_token_ids[0] + res.trace_token_ids[0] + res.embed_token_ids[0]
            t = torch.tensor([ids])
            h = model.model(input_ids=t, attention_mask=torch.ones_like(t), **_our_pixels(native_fp8, item, t)).last_hidden_state[0, -1]
            cos = float(F.cosine_similarity(F.normalize(h.float(), dim=-1), res.embeddings[0], dim=0))
            print(f"transformers+compressed-tensors vs tte FP8 engine, think={think}, item {i}: cosine {cos:.6f}")
            assert cos >= bound, (think, i, cos)


def _our_pixels(engine, item, ids_t) -> dict:
    from tte_engine.inputs import as_query

    images = engine.prompts.build(as_query(item, 0), 0, think=False).images
    if not images:
        return {}
    return {"pixel_values": torch.cat([im.patches for im in images]).float(), "image_grid_thw": torch.tensor([list(im.grid_thw) for im in images]),
            "mm_token_type_ids": (ids_t == engine.model_cfg.image_token_id).int()}


def test_our_exports_load_back_like_the_native_engine(exported, native_fp8):
    _, out = exported
    want = native_fp8.embed(_items())
    for sub in ("hf", "trtllm"):
        assert checkpoint_quantization(out / sub)["activations"] == "dynamic"
        got = Engine(out / sub).embed(_items())
        assert got.trace_token_ids == want.trace_token_ids, sub
        assert F.cosine_similarity(got.embeddings, want.embeddings).min() >= 0.99999, sub


def test_modelopt_layout_as_tensorrt_llm_reads_it(exported):
    _, out = exported
    hq = json.loads((out / "trtllm" / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt" and hq["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert hq["quantization"]["exclude_modules"] == ["lm_head", "model.embed_tokens", "visual*"]  # as modelopt 0.47 writes it
    inline = json.loads((out / "trtllm" / "config.json").read_text())["quantization_config"]
    assert inline["quant_method"] == "modelopt" and inline["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    with safe_open(str(out / "trtllm" / "model.safetensors"), framework="pt") as f:
        w, s = f.get_tensor("model.layers.0.mlp.gate_proj.weight"), f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale")
        assert w.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (w.shape[0],)  # FP8RowwiseLinearMethod: [out]
        assert not any(n.endswith("input_scale") for n in f.keys())


def test_per_tensor_variant_and_its_accuracy_report(exported, tmp_path, float_engine_for):
    ckpt, out = exported
    report = json.loads((out / "export_report.json").read_text())
    pt = report["accuracy_per_tensor"]
    assert pt["items"] == 2 and 0.9 < pt["cosine"]["min"] <= 1.0 and "static per-tensor" in pt["activations"]
    assert not (out / ".per-tensor-check").exists()
    dst = tmp_path / "pt"
    run_export(ExportOptions(checkpoint=str(ckpt), out=dst, target="trtllm", fp8=True, calibration=2, trtllm_fp8="per-tensor"))
    hq = json.loads((dst / "trtllm" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "FP8"
    raw = load_file(str(dst / "trtllm" / "model.safetensors"))
    assert raw["model.layers.0.self_attn.q_proj.weight_scale"].shape == () and raw["model.layers.0.self_attn.q_proj.input_scale"].shape == ()
    eng = Engine(dst / "trtllm")
    qkv = eng.stages[0].runner.model.layers[0].qkv_proj
    assert isinstance(qkv, Fp8Linear) and qkv.input_scale is not None  # static scales kept, not dropped
    want = max(float(raw[f"model.layers.0.self_attn.{x}_proj.input_scale"]) for x in "qkv")
    assert float(qkv.input_scale) == pytest.approx(want)
    cos = F.cosine_similarity(eng.embed(_items(), think=False).embeddings, float_engine_for(ckpt).embed(_items(), think=False).embeddings)
    assert cos.min() >= 0.99


@pytest.fixture(scope="module")
def float_engine_for():
    cache = {}

    def get(path):
        if str(path) not in cache:
            cache[str(path)] = Engine(path)
        return cache[str(path)]

    return get


def test_engine_loads_a_compressed_tensors_checkpoint_written_by_its_own_library(exported, native_fp8, tmp_path):
    """FP8_DYNAMIC as llm-compressor saves it: transformers model + compressed-tensors' apply_quantization_config and
    ModelCompressor (float-quantized), transformers' own save_pretrained naming; loaded as is."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import Qwen2VLForConditionalGeneration

    ckpt, _ = exported
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
                                                        ignore=["lm_head", "re:.*visual.*"]))
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):  # what llm-compressor's min-max observer computes for a symmetric FP8 channel scale
            mod.weight_scale.data = (mod.weight.detach().abs().amax(dim=1, keepdim=True) / FP8_MAX).to(mod.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    eco = tmp_path / "eco"
    model.save_pretrained(eco)
    compressor.update_config(eco)
    for f in ckpt.iterdir():
        if not (eco / f.name).exists() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, eco / f.name)
    assert checkpoint_quantization(eco) == {"producer": "compressed-tensors", "activations": "dynamic"}
    got, want = Engine(eco).embed(_items()), native_fp8.embed(_items())
    assert got.trace_token_ids == want.trace_token_ids
    assert F.cosine_similarity(got.embeddings, want.embeddings).min() >= 0.99999


@pytest.mark.parametrize("case", ["gptq", "int4", "nvfp4", "block"])
def test_unsupported_quantization_is_refused(exported, tmp_path, case):
    ckpt, _ = exported
    dst = tmp_path / case
    shutil.copytree(ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if case == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    elif case == "int4":
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}
    elif case == "block":
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "g": {"weights": {"type": "float", "num_bits": 8, "strategy": "block"}, "input_activations": None}}}
    else:
        (dst / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}}))
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported|only FP8"):
        Engine(dst)


def _rewrite_tensors(path, edit):
    """Rewrite a safetensors file with `edit(dict of tensors)` applied (as a hand-edited checkpoint would be)."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("naming", ["hub", "transformers5"])
@pytest.mark.parametrize("sub", ["hf", "trtllm"])
@pytest.mark.parametrize("case", ["missing_scale", "no_scheme"])
def test_fp8_weights_are_never_read_without_their_scale(exported, tmp_path, case, sub, naming):
    """An FP8 weight whose weight_scale is gone, or FP8 / *_scale tensors in a checkpoint declaring no scheme, used to
    load as E4M3 codes cast to floats (cosine 0.04-0.40, no error); now one CheckpointError naming the tensor."""
    _, out = exported
    dst = tmp_path / sub
    shutil.copytree(out / sub, dst)
    prefix = "model.language_model." if naming == "transformers5" else "model."
    if naming == "transformers5":  # the in-memory transformers-5 layout (`model.language_model.layers.*`)
        _rewrite_tensors(dst / "model.safetensors", lambda t: t.update(
            {prefix + k[len("model."):]: t.pop(k) for k in list(t) if k.startswith("model.")}))
    if case == "missing_scale":
        gone = prefix + "layers.1.self_attn.o_proj.weight_scale"  # unfused: used to load with no error at all
        _rewrite_tensors(dst / "model.safetensors", lambda t: t.pop(gone))
        named = [gone]
    else:
        cfg = json.loads((dst / "config.json").read_text())
        del cfg["quantization_config"]  # trtllm/ declares its scheme twice: inline and hf_quant_config.json
        (dst / "config.json").write_text(json.dumps(cfg))
        (dst / "hf_quant_config.json").unlink(missing_ok=True)
        named = ["quantization_config", "hf_quant_config.json", prefix + "layers.0."]
    with pytest.raises(CheckpointError) as err:
        Engine(dst)
    msg = str(err.value)
    assert "\n" not in msg and str(dst / "model.safetensors") in msg
    assert all(n in msg for n in named), msg
    if case == "no_scheme":
        assert "float8_e4m3fn" in msg or "_scale" in msg


def test_static_activation_scale_rounds_and_clips():
    x = torch.tensor([[0.5, -3.0, 1000.0]])
    y = fake_quantize_static(x, torch.tensor(1.0 / FP8_MAX))  # representable range +-1
    assert torch.equal(y, torch.tensor([[0.5, -1.0, 1.0]]))
    lin = torch.nn.Linear(3, 2, bias=False)
    fp8 = Fp8Linear.from_linear(lin)
    fp8.input_scale = torch.tensor(1.0 / FP8_MAX)
    assert torch.allclose(fp8(x), F.linear(y, fp8.dequantized_weight(torch.float32)))
