"""A corrupt or inconsistent checkpoint fails at load with one CheckpointError naming the file (and field).

Each case corrupts a copy of a tiny random checkpoint and loads it with `Engine(path)` (tte-export
loads through the same code): never a raw SafetensorError / AttributeError / TypeError /
ZeroDivisionError, and never a load that succeeds and then fails every item.
"""

import json
import os
import re
import shutil

import pytest

from tte_engine import Engine
from tte_engine.config import HeadConfig, ModelConfig, TTEConfig
from tte_engine.engine_dir import EngineDir
from tte_engine.errors import CheckpointError


@pytest.fixture(scope="module")
def source(make_checkpoint):
    return make_checkpoint("ckerr")  # tiny-random: 4 layers, mhsa head (source_layer -2, 2 layers)


def _edit_json(name, edit):
    def apply(path):
        file = path / name
        file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    return apply


def _set(name, dotted, value):
    """Set `dotted` (a.b) in the JSON file `name`."""
    def edit(raw):
        *parents, key = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value
        return raw
    return _edit_json(name, edit)


def _write(name, data):
    def apply(path):
        (path / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return apply


def _truncate(name):
    def apply(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])
    return apply


def _remove(*names):
    def apply(path):
        for n in names:
            (path / n).unlink()
    return apply


# (id, corruption, file the message must name, text the message must hold)
CASES = [
    # weights
    ("weights-truncated", _truncate("model.safetensors"), "model.safetensors", "not a readable safetensors file"),
    ("weights-empty", _write("model.safetensors", b""), "model.safetensors", "not a readable safetensors file"),
    ("weights-random", _write("model.safetensors", os.urandom(4096)), "model.safetensors", "not a readable safetensors file"),
    ("head-weights-truncated", _truncate("embedding_head.safetensors"), "embedding_head.safetensors", "not a readable safetensors file"),
    ("index-not-object", _write("model.safetensors.index.json", [1, 2]), "model.safetensors.index.json", "JSON object"),
    ("index-no-weight-map", _write("model.safetensors.index.json", {"weight_map": 3}), "model.safetensors.index.json", "weight_map"),
    # tte_config.json: every field's type and range
    ("tte-array", _write("tte_config.json", [1, 2]), "tte_config.json", "JSON object"),
    ("tte-not-json", _write("tte_config.json", b"\xff\xfe{"), "tte_config.json", "cannot read"),
    # nested deeper than Python's parser recurses: a RecursionError traceback before
    ("config-nested", _write("config.json", b"[" * 100_000 + b"]" * 100_000), "config.json", "cannot read"),
    ("tte-nested", _write("tte_config.json", b"[" * 100_000 + b"]" * 100_000), "tte_config.json", "cannot read"),
    ("preproc-nested", _write("preprocessor_config.json", b"[" * 100_000 + b"]" * 100_000), "preprocessor_config.json", "cannot read"),

    ("tte-suffix-int", _set("tte_config.json", "embed_suffix", 5), "tte_config.json", "embed_suffix"),
    ("tte-format-version-str", _set("tte_config.json", "format_version", "1"), "tte_config.json", "format_version"),
    ("tte-mode-list", _set("tte_config.json", "mode", ["unified"]), "tte_config.json", "mode"),
    ("tte-normalize-str", _set("tte_config.json", "normalize", "yes"), "tte_config.json", "normalize"),
    ("tte-head-array", _set("tte_config.json", "head", [1]), "tte_config.json", "head"),
    ("tte-head-unknown", _set("tte_config.json", "head.colour", 1), "tte_config.json", "head.colour"),
    ("tte-head-type", _set("tte_config.json", "head.type", 3), "tte_config.json", "head.type"),
    ("tte-head-weights", _set("tte_config.json", "head.weights", None), "tte_config.json", "head.weights"),
    ("tte-source-layer-high", _set("tte_config.json", "head.source_layer", 99), "tte_config.json", "head.source_layer"),
    ("tte-source-layer-low", _set("tte_config.json", "head.source_layer", -5), "tte_config.json", "head.source_layer"),
    ("tte-source-layer-float", _set("tte_config.json", "head.source_layer", -2.0), "tte_config.json", "head.source_layer"),
    ("tte-head-layers-zero", _set("tte_config.json", "head.num_layers", 0), "tte_config.json", "head.num_layers"),
    ("tte-head-layers-high", _set("tte_config.json", "head.num_layers", 9), "tte_config.json", "head.num_layers"),
    ("tte-think-array", _set("tte_config.json", "think", "x"), "tte_config.json", "think"),
    ("tte-max-tokens-negative", _set("tte_config.json", "think.max_tokens", -5), "tte_config.json", "think.max_tokens"),
    ("tte-max-tokens-float", _set("tte_config.json", "think.max_tokens", 1.5), "tte_config.json", "think.max_tokens"),
    ("tte-max-tokens-bool", _set("tte_config.json", "think.max_tokens", True), "tte_config.json", "think.max_tokens"),
    ("tte-think-end-empty", _set("tte_config.json", "think.end", ""), "tte_config.json", "think.end"),
    ("tte-think-start-int", _set("tte_config.json", "think.start", 7), "tte_config.json", "think.start"),
    # a trace is cut where think.end appears: the marker that opened it cannot close it
    ("tte-think-end-is-start", _set("tte_config.json", "think.end", "<think>"), "tte_config.json", "think.end must be a marker other than think.start"),
    # a misspelt key silently gave the default before
    ("tte-unknown-key", _set("tte_config.json", "embed_sufix", "x"), "tte_config.json", "embed_sufix (did you mean embed_suffix?)"),
    ("tte-unknown-key-normalise", _set("tte_config.json", "normalise", False), "tte_config.json", "normalise (did you mean normalize?)"),
    # a vision placeholder as a marker: every item then failed (a placeholder without an image)
    ("tte-think-start-image-pad", _set("tte_config.json", "think.start", "<|image_pad|>"), "tte_config.json", "think.start holds the vision"),
    ("tte-think-end-vision-end", _set("tte_config.json", "think.end", "ok<|vision_end|>"), "tte_config.json", "think.end holds the vision"),
    ("tte-suffix-video-pad", _set("tte_config.json", "embed_suffix", "<|video_pad|>"), "tte_config.json", "embed_suffix holds the vision"),
    ("tte-instructions-list", _set("tte_config.json", "instructions", ["a"]), "tte_config.json", "instructions"),
    ("tte-instruction-int", _set("tte_config.json", "instructions.retrieval", 1), "tte_config.json", "instructions.retrieval"),
    # generation_config.json
    ("eos-str", _write("generation_config.json", {"eos_token_id": "x"}), "generation_config.json", "eos_token_id"),
    ("eos-list-str", _set("generation_config.json", "eos_token_id", [1, "x"]), "generation_config.json", "eos_token_id"),
    ("eos-out-of-vocab", _set("generation_config.json", "eos_token_id", 10**6), "generation_config.json", "eos_token_id"),
    ("eos-negative", _set("generation_config.json", "eos_token_id", [-1]), "generation_config.json", "eos_token_id"),
    ("eos-bool", _set("generation_config.json", "eos_token_id", True), "generation_config.json", "eos_token_id"),
    ("generation-array", _write("generation_config.json", [1]), "generation_config.json", "JSON object"),
    # preprocessor_config.json (sizes a ZeroDivisionError / empty grid would follow from)
    ("preproc-bad-sizes", _edit_json("preprocessor_config.json", lambda r: {**r, "min_pixels": -1, "max_pixels": 0, "patch_size": 0}),
     "preprocessor_config.json", "must be"),
    ("preproc-patch-zero", _set("preprocessor_config.json", "patch_size", 0), "preprocessor_config.json", "patch_size"),
    ("preproc-merge-zero", _set("preprocessor_config.json", "merge_size", 0), "preprocessor_config.json", "merge_size"),
    ("preproc-temporal-str", _set("preprocessor_config.json", "temporal_patch_size", "2"), "preprocessor_config.json", "temporal_patch_size"),
    ("preproc-min-over-max", _edit_json("preprocessor_config.json", lambda r: {**r, "min_pixels": 10**6, "max_pixels": 10**4}),
     "preprocessor_config.json", "min_pixels"),
    ("preproc-patch-mismatch", _set("preprocessor_config.json", "patch_size", 16), "preprocessor_config.json", "patch_size"),
    ("preproc-std-zero", _set("preprocessor_config.json", "image_std", [0.0, 0.2, 0.2]), "preprocessor_config.json", "image_std"),
    ("preproc-mean-short", _set("preprocessor_config.json", "image_mean", [0.5]), "preprocessor_config.json", "image_mean"),
    ("preproc-mean-str", _set("preprocessor_config.json", "image_mean", "grey"), "preprocessor_config.json", "image_mean"),
    # tokenizer files
    ("tokenizer-removed", _remove("tokenizer.json", "tokenizer_config.json"), "tokenizer.json", "tokenizer files are missing"),
    # config.json
    ("config-array", _write("config.json", [1, 2]), "config.json", "JSON object"),
    ("config-heads-zero", _set("config.json", "num_attention_heads", 0), "config.json", "num_attention_heads"),
    ("config-hidden-str", _set("config.json", "hidden_size", "128"), "config.json", "hidden_size"),
    ("config-image-token-out", _set("config.json", "image_token_id", 10**6), "config.json", "image_token_id"),
    # transformers filled in Qwen2-VL-7B's vision tower, and a later check blamed its sizes
    ("config-no-vision", _edit_json("config.json", lambda r: {k: v for k, v in r.items() if k != "vision_config"}),
     "config.json", "vision_config is missing"),
    ("config-text-only", _edit_json("config.json", lambda r: {k: v for k, v in r.items() if k not in ("vision_config", "model_type")}),
     "config.json", "vision_config is missing"),
    ("config-vision-partial", _edit_json("config.json", lambda r: {**r, "vision_config": {"depth": r["vision_config"]["depth"]}}),
     "config.json", "vision_config has no hidden_size"),
    ("config-trtllm-legacy", _write("config.json", {"architecture": "Qwen2VLForConditionalGeneration", "dtype": "float32"}),
     "config.json", "a TensorRT-LLM checkpoint"),
    ("config-no-mrope", _edit_json("config.json", lambda r: {k: v for k, v in r.items() if k != "rope_scaling"}),
     "config.json", "mrope_section (in rope_scaling / rope_parameters) is missing"),
    # blamed on the tokenizer before (transformers' AttributeError while it read config.json)
    ("config-quantization-str", _set("config.json", "quantization_config", "fp8"), "config.json", "quantization_config must be an object"),
]

# Raised inside transformers' AutoTokenizer or vision.py's ImageProcessorConfig.load unless
# Engine.__init__ checks the files first (checkpoint.check_checkpoint_files)
HOOK_CASES = [
    ("tokenizer-json-removed", _remove("tokenizer.json"), "tokenizer.json", "tokenizer files are missing"),
    ("preproc-array", _write("preprocessor_config.json", [1]), "preprocessor_config.json", "JSON object"),
    ("preproc-size-str", _set("preprocessor_config.json", "size", "big"), "preprocessor_config.json", "size"),
    ("preproc-not-json", _write("preprocessor_config.json", b"{"), "preprocessor_config.json", "cannot read"),
    # present but unusable: transformers' or jinja's own errors, wrapped (a second attack found these leaking)
    ("tokenizer-json-not-json", _write("tokenizer.json", b"{not json"), "tokenizer files", "cannot build prompts"),
    ("tokenizer-json-empty-object", _write("tokenizer.json", {}), "tokenizer files", "cannot build prompts"),
    ("tokenizer-config-array", _write("tokenizer_config.json", []), "tokenizer files", "cannot build prompts"),
    ("chat-template-syntax", _write("chat_template.jinja", b"{% if %}"), "chat template", "cannot build prompts"),
    ("config-rope-yarn", _set("config.json", "rope_scaling", {"type": "yarn", "factor": 4.0, "mrope_section": [2, 3, 3]}), "config.json", "yarn"),
    ("config-text-act", _set("config.json", "hidden_act", "gelu_pytorch_tanh"), "config.json", "hidden_act"),
    ("config-positions-huge", _set("config.json", "max_position_embeddings", 10**12), "config.json", "max_position_embeddings"),
]


def _params(cases, marks=()):
    return [pytest.param(corrupt, file, text, id=name, marks=marks) for name, corrupt, file, text in cases]


@pytest.mark.parametrize("corrupt, file, text", _params(CASES) + _params(HOOK_CASES))
def test_corrupt_checkpoint_fails_at_load(source, tmp_path, corrupt, file, text):
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    corrupt(path)
    with pytest.raises(CheckpointError, match=r"(^|[/\\ ])" + re.escape(file)) as info:
        Engine(path)
    message = str(info.value)
    assert text in message
    assert "\n" not in message  # one line


def test_negative_source_layer_counts_from_the_end(source, tmp_path):
    """-L .. -1 are Python-style indices from the end (DESIGN §4 writes source_layer -8): -4 loads on a 4-layer model."""
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    _set("tte_config.json", "head.source_layer", -4)(path)
    engine = Engine(path, cache_memory=8 << 20)
    assert engine.stages[-1].runner.model.head_source_layer == 0


def test_tte_config_from_dict_names_the_field():
    TTEConfig.from_dict({})  # all defaults
    with pytest.raises(CheckpointError, match=r"^src: think.max_tokens must be an integer >= 0, got -1$"):
        TTEConfig.from_dict({"think": {"max_tokens": -1}}, source="src")
    with pytest.raises(CheckpointError, match="src: unknown field.*think.colour"):
        TTEConfig.from_dict({"think": {"colour": 1}}, source="src")
    with pytest.raises(CheckpointError, match="src: reasoner"):
        TTEConfig.from_dict({"mode": "two_model", "reasoner": 3}, source="src")


def test_mhsa_head_refuses_out_of_range_layers(source):
    from tte_engine.model.heads import MHSAHead

    text = ModelConfig.from_hf(json.loads((source / "config.json").read_text())).text
    with pytest.raises(CheckpointError, match=r"tte_config\.json: head\.source_layer"):
        MHSAHead(text, HeadConfig(type="mhsa", source_layer=text.num_layers, num_layers=2))
    with pytest.raises(CheckpointError, match=r"tte_config\.json: head\.num_layers"):
        MHSAHead(text, HeadConfig(type="mhsa", source_layer=-2, num_layers=text.num_layers + 1))


def test_engine_json_model_is_checked(source, tmp_path):
    cfg = ModelConfig.from_hf(json.loads((source / "config.json").read_text()))
    spec = {"format": "tte-engine", "format_version": 1, "model": cfg.to_dict(), "tte": TTEConfig().to_dict(),
            "dtype": "float32", "weights": [], "tokens": {}}
    spec["model"]["text"]["num_heads"] = 0
    (tmp_path / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"engine\.json: num_attention_heads must be a positive integer, got 0"):
        EngineDir.open(tmp_path)
    spec["model"] = [1]
    (tmp_path / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"engine\.json: malformed"):
        EngineDir.open(tmp_path)


def test_a_folder_holding_checkpoints_names_them(source, tmp_path):
    """`tte-export --target hf --out DIR` writes DIR/hf/: `Engine(DIR)` says where the checkpoint is."""
    shutil.copytree(source, tmp_path / "out" / "hf")
    (tmp_path / "out" / "logs").mkdir()
    with pytest.raises(CheckpointError, match="no config.json") as info:
        Engine(tmp_path / "out")
    assert str(info.value).endswith(f"checkpoints inside it: {tmp_path / 'out' / 'hf'}")
    with pytest.raises(CheckpointError) as info:
        Engine(tmp_path / "out" / "logs")
    assert "inside" not in str(info.value)


def _rescale_text(width):
    """config.json's text width changed consistently (heads, M-RoPE sections, the merger's output): valid, but not the weights' width."""
    def edit(raw):
        raw["vision_config"]["hidden_size"] = raw["hidden_size"] = width
        raw["rope_scaling"]["mrope_section"] = [width // 32, 3 * width // 64, 3 * width // 64]
        return raw
    return _edit_json("config.json", edit)


def _edit_tensors(name, edit):
    """Rewrite the safetensors file `name` with `edit(tensors)` (a dict of name -> tensor)."""
    def apply(path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / name)
        save_file(edit(tensors), path / name)
    return apply


def _transposed(name, key):
    return _edit_tensors(name, lambda t: {**t, key: t[key].t().contiguous()})


def _stray(name, key):
    return _edit_tensors(name, lambda t: {**t, key: t["model.norm.weight"].clone()})


# (id, corruption, text the message must hold): a config.json (or tte_config.json head) whose sizes the
# weights do not hold; refused from the safetensors headers before a model of its size is allocated
MISFIT_CASES = [
    ("layers-huge", _set("config.json", "num_hidden_layers", 100_000), "config.json: num_hidden_layers is 100000, but"),
    ("layers-fewer", _set("config.json", "num_hidden_layers", 3), "num_hidden_layers is 3, but"),
    ("hidden-size", _rescale_text(256), "config.json: hidden_size = 256 does not match the weights"),
    ("intermediate-size", _set("config.json", "intermediate_size", 10**6), "intermediate_size = 1000000 does not match"),
    ("vocab-size", _set("config.json", "vocab_size", 10**6), "vocab_size = 1000000 does not match"),
    ("kv-heads", _set("config.json", "num_key_value_heads", 4), "num_key_value_heads x (hidden_size / num_attention_heads) = 128 does not match"),
    ("vision-depth", _set("config.json", "vision_config.depth", 1000), "vision_config.depth is 1000, but"),
    ("vision-width", _set("config.json", "vision_config.embed_dim", 128), "vision_config.embed_dim = 128 does not match"),
    ("head-layers", _set("tte_config.json", "head.num_layers", 3), "tte_config.json: head.num_layers is 3, but"),
    # found by an attacker: a square-free matrix stored transposed loaded (reshaped) as wrong weights, cosine 0.66-0.99
    ("down-proj-transposed", _transposed("model.safetensors", "model.layers.1.mlp.down_proj.weight"),
     "model.layers.1.mlp.down_proj.weight has shape (256, 128), but"),
    ("lm-head-transposed", _transposed("model.safetensors", "lm_head.weight"), "lm_head.weight has shape (128, "),
    ("head-down-proj-transposed", _transposed("embedding_head.safetensors", "layers.0.mlp.down_proj.weight"),
     "layers.0.mlp.down_proj.weight has shape (256, 128), but"),
    # one stray tensor of layer 999999999 is named, not counted as a billion layers
    ("stray-layer", _stray("model.safetensors", "model.layers.999999999.x"),
     "model.safetensors holds model.layers.999999999.* beyond model.layers.3"),
]


@pytest.mark.parametrize("corrupt, text", [pytest.param(c, t, id=n) for n, c, t in MISFIT_CASES])
def test_config_the_weights_do_not_hold_fails_before_the_model_is_built(source, tmp_path, monkeypatch, corrupt, text):
    import tte_engine.engine as engine_mod

    def build_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against the weights")

    monkeypatch.setattr(engine_mod, "build_model", build_model)
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    corrupt(path)
    with pytest.raises(CheckpointError) as info:
        Engine(path)
    message = str(info.value)
    assert text in message and ("model.safetensors" in message or "embedding_head.safetensors" in message)
    assert "\n" not in message


def test_think_markers_that_tokenize_alike_are_refused(source, tmp_path, monkeypatch):
    """Two different strings the tokenizer makes the same tokens cannot tell a trace's end from its start."""
    import tte_engine.inputs as inputs_mod

    real = inputs_mod._single_or_sequence
    monkeypatch.setattr(inputs_mod, "_single_or_sequence", lambda tok, text: real(tok, "<think>" if text == "<THINK>" else text))
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    _set("tte_config.json", "think.end", "<THINK>")(path)
    with pytest.raises(CheckpointError, match=r"tte_config\.json: think\.end '<THINK>' gives the same tokens"):
        Engine(path)


def test_tte_config_keys_beginning_with_underscore_are_free():
    """Forward room: "_comment" and other "_"-keys are neither refused nor read, at the top level and in head/think."""
    tte = TTEConfig.from_dict({"_comment": "x", "head": {"type": "last_token", "_note": 1}, "think": {"_why": "y", "max_tokens": 3}})
    assert tte.head.type == "last_token" and tte.think.max_tokens == 3
    with pytest.raises(CheckpointError, match=r"^src: unknown field\(s\) head\.typ \(did you mean head\.type\?\)"):
        TTEConfig.from_dict({"head": {"typ": "mhsa"}}, source="src")


def test_quantization_config_must_be_an_object(source, tmp_path):
    from tte_engine.model.loader import checkpoint_quantization

    shutil.copytree(source, tmp_path / "ckpt")
    _set("config.json", "quantization_config", "fp8")(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config must be an object naming the FP8 scheme.*got 'fp8'"):
        checkpoint_quantization(tmp_path / "ckpt")
