"""Parity with transformers' Qwen2-VL on the same weights (the correctness contract, DESIGN §5):
greedy trace tokens identical to generate(), embeddings cosine >= 0.99999 (fp32) against the
naive re-encode of prompt + trace + suffix."""

import pytest
import torch
import torch.nn.functional as F
from oracle import cosine, hf_forward, hf_generate, hf_model, hf_reencode
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRMSNorm

from tte_engine import Engine
from tte_engine.model import cpu_linear
from tte_engine.model.names import head_shapes

COS = 0.99999


def _stop_ids(eng):
    return eng.prompts.think_end_ids + eng.prompts.eos_ids


PREFIX_CACHING = pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])


def _embed_twice(eng: Engine, items, **kwargs):
    """Embed once to fill the prefix cache, then again: with prefix caching on, the second run reuses
    every cached full prompt block (and skips the vision tower for cached images)."""
    first = eng.embed(items, **kwargs)
    second = eng.embed(items, **kwargs)
    if eng.config.enable_prefix_caching:
        assert second.usage["cached_tokens"] > first.usage["cached_tokens"]
    else:
        assert second.usage["cached_tokens"] == 0
    return second


@pytest.mark.parametrize(
    "variant,prefix_caching",
    [("untied", True), ("untied", False), ("tied", True), ("stops_on_think_end", True), ("stops_on_eos", True), ("tied_prepacked", False)],
)
def test_think_traces_and_embeddings_match_transformers(make_checkpoint, boosted_checkpoint, mixed_items, variant, prefix_caching, monkeypatch):
    if variant == "tied_prepacked":  # every linear in oneDNN's layout (tiny weights stay dense by default)
        monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    if variant == "stops_on_think_end":
        path = boosted_checkpoint("</think>")
    elif variant == "stops_on_eos":
        path = boosted_checkpoint("<|im_end|>")
    else:
        path = make_checkpoint("parity", head="last_token", tie_word_embeddings=variant.startswith("tied"), think_max_tokens=12)
    eng = Engine(path, enable_prefix_caching=prefix_caching)
    if variant == "tied_prepacked":
        model = eng.stages[0].runner.model
        assert isinstance(model.lm_head, cpu_linear.PackedLinear) and isinstance(model.layers[0].qkv_proj, cpu_linear.PackedLinear)
        assert isinstance(model.visual.blocks[0].qkv, cpu_linear.PackedLinear)
    res = _embed_twice(eng, mixed_items)
    image_tok = eng.model_cfg.image_token_id
    assert res.errors == [None] * len(mixed_items)
    for i, item in enumerate(mixed_items):
        ref_trace = hf_generate(
            path, item, res.prompt_token_ids[i], max_new_tokens=12, stop_ids=_stop_ids(eng),
            suppress_ids=eng.prompts.suppressed_ids, image_token_id=image_tok,
        )
        assert res.trace_token_ids[i] == ref_trace, f"item {i}"
        full = res.prompt_token_ids[i] + res.trace_token_ids[i] + res.embed_token_ids[i]
        assert cosine(res.embeddings[i], hf_reencode(path, item, full, image_tok)) >= COS, f"item {i}"
    assert torch.allclose(res.embeddings.norm(dim=-1), torch.ones(len(mixed_items)), atol=1e-5)
    if variant.startswith("stops"):  # the early-stop paths really ran
        assert "stop" in res.stop_reasons


@PREFIX_CACHING
def test_no_think_matches_transformers(make_checkpoint, mixed_items, prefix_caching):
    path = make_checkpoint("parity", head="last_token", think_max_tokens=12)
    eng = Engine(path, enable_prefix_caching=prefix_caching)
    res = _embed_twice(eng, mixed_items, think=False)
    think_start = eng.prompts.think_start_ids
    for i, item in enumerate(mixed_items):
        assert res.trace_token_ids[i] == [] and res.traces[i] == ""
        assert res.prompt_token_ids[i][-len(think_start):] != think_start
        assert res.embed_token_ids[i] == eng.prompts.suffix_ids
        full = res.prompt_token_ids[i] + res.embed_token_ids[i]
        assert cosine(res.embeddings[i], hf_reencode(path, item, full, eng.model_cfg.image_token_id)) >= COS


def _mhsa_reference(path, eng, item, ids, num_layers):
    """The head rebuilt from transformers' own decoder layers, fed transformers' hidden states."""
    from safetensors.torch import load_file

    hf = hf_model(path)
    out = hf_forward(path, item, ids, eng.model_cfg.image_token_id, output_hidden_states=True)
    total = eng.model_cfg.text.num_layers
    h = out.hidden_states[total - num_layers]  # the stream entering backbone layer L - K
    weights = load_file(str(path / "embedding_head.safetensors"))
    assert set(weights) == set(head_shapes(eng.model_cfg, num_layers))
    text_cfg = hf.config.text_config
    layers = []
    for i in range(num_layers):
        layer = Qwen2VLDecoderLayer(text_cfg, layer_idx=i)
        prefix = f"layers.{i}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        layers.append(layer.eval())
    norm = Qwen2VLRMSNorm(text_cfg.hidden_size, eps=text_cfg.rms_norm_eps)
    norm.load_state_dict({"weight": weights["norm.weight"]})
    # the same M-RoPE positions transformers uses for this sequence
    ids_t = torch.tensor([ids])
    kw = {}
    if isinstance(item, dict) and item.get("image") is not None:
        from oracle import hf_image_inputs

        kw = hf_image_inputs(item, path, ids, eng.model_cfg.image_token_id)
        pos, _ = hf.model.get_rope_index(ids_t, mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
    else:
        pos = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = hf.model.language_model.rotary_emb(h, pos)
    with torch.no_grad():
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin))
        return F.normalize(norm(h)[0, -1], dim=-1)


def test_mhsa_head_matches_transformers_layers(make_checkpoint, mixed_items):
    path = make_checkpoint("mhsa", head="mhsa", head_layers=2, think_max_tokens=10)
    eng = Engine(path)
    assert eng.tte.head.type == "mhsa"
    items = mixed_items[:4]
    res = _embed_twice(eng, items)  # the head also reads source states of cached prefix blocks
    for i, item in enumerate(items):
        ref_trace = hf_generate(
            path, item, res.prompt_token_ids[i], max_new_tokens=10, stop_ids=_stop_ids(eng),
            suppress_ids=eng.prompts.suppressed_ids, image_token_id=eng.model_cfg.image_token_id,
        )
        assert res.trace_token_ids[i] == ref_trace
        full = res.prompt_token_ids[i] + res.trace_token_ids[i] + res.embed_token_ids[i]
        ref = _mhsa_reference(path, eng, item, full, num_layers=2)
        assert cosine(res.embeddings[i], ref) >= COS, f"item {i}"
        # and it is not just the last-token head in disguise
        assert cosine(res.embeddings[i], hf_reencode(path, item, full, eng.model_cfg.image_token_id)) < 0.999


def test_two_model_matches_running_both_models_by_hand(make_checkpoint, mixed_items, tmp_path):
    reasoner = make_checkpoint("reasoner", seed=7, head="last_token", think_max_tokens=8)
    embedder = make_checkpoint("embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=8)
    eng = Engine(embedder)
    assert len(eng.stages) == 2
    items = mixed_items[:4]
    res = _embed_twice(eng, items)  # both models' caches serve cached prefixes
    image_tok = eng.model_cfg.image_token_id
    for i, item in enumerate(items):
        trace = hf_generate(
            reasoner, item, res.prompt_token_ids[i], max_new_tokens=8, stop_ids=_stop_ids(eng),
            suppress_ids=eng.prompts.suppressed_ids, image_token_id=image_tok,
        )
        assert res.trace_token_ids[i] == trace
        full = res.prompt_token_ids[i] + trace + res.embed_token_ids[i]
        assert cosine(res.embeddings[i], hf_reencode(embedder, item, full, image_tok)) >= COS
        # the trace really came from the reasoner: the embedder alone thinks differently
    solo = Engine(make_checkpoint("embedder-solo", seed=3, head="last_token", think_max_tokens=8)).embed(items)
    assert solo.trace_token_ids != res.trace_token_ids


def test_a_reasoner_with_more_vocabulary_rows_never_emits_them(make_checkpoint, mixed_items):
    """Qwen2-VL-7B has 152064 rows beside 2B's 151936: the reasoner's extra rows are padding, never a
    token the embedder could read (an id past its table crashed the whole batch). They are suppressed
    like vision tokens: traces equal transformers' generate() with those ids suppressed too."""
    reasoner = make_checkpoint("wide-reasoner", seed=1, head="last_token", vocab_size=1000, think_max_tokens=8)
    embedder = make_checkpoint("narrow-embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=8)
    eng = Engine(embedder)
    vocab = eng.model_cfg.text.vocab_size
    items = mixed_items[:3]
    res = eng.embed(items, errors="return")
    assert res.errors == [None] * len(items)
    for i, item in enumerate(items):
        trace = hf_generate(
            reasoner, item, res.prompt_token_ids[i], max_new_tokens=8, stop_ids=_stop_ids(eng),
            suppress_ids=eng.prompts.suppressed_ids + list(range(vocab, 1000)), image_token_id=eng.model_cfg.image_token_id,
        )
        assert res.trace_token_ids[i] == trace and max(trace) < vocab


def test_bfloat16_checkpoint_loads_exactly(make_checkpoint, mixed_items):
    """A bf16 checkpoint run in fp32 matches transformers loading the same file in fp32."""
    path = make_checkpoint("bf16", head="last_token", dtype="bfloat16", think_max_tokens=6)
    eng = Engine(path, dtype="float32")
    res = eng.embed(mixed_items[:3])
    for i, item in enumerate(mixed_items[:3]):
        trace = hf_generate(
            path, item, res.prompt_token_ids[i], max_new_tokens=6, stop_ids=_stop_ids(eng),
            suppress_ids=eng.prompts.suppressed_ids, image_token_id=eng.model_cfg.image_token_id,
        )
        assert res.trace_token_ids[i] == trace
        full = res.prompt_token_ids[i] + trace + res.embed_token_ids[i]
        assert cosine(res.embeddings[i], hf_reencode(path, item, full, eng.model_cfg.image_token_id)) >= COS
