"""Weight names of a Qwen2-VL checkpoint, in the hub layout, and the mapping of other layouts onto it.

Two namings exist in the wild: the hub layout (`model.layers.*`, `model.embed_tokens`,
`visual.*`) and the in-memory transformers-5 layout (`model.language_model.*`,
`model.visual.*`). Everything here speaks the hub layout; `canonical_name` folds the other.
"""

from __future__ import annotations

from ..config import ModelConfig

_PREFIX_FOLDS = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),  # some older exports
    ("language_model.lm_head.", "lm_head."),
)


def canonical_name(name: str) -> str:
    for old, new in _PREFIX_FOLDS:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def decoder_layer_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    d, i = t.hidden_size, t.intermediate_size
    return {
        f"{prefix}self_attn.q_proj.weight": (q, d),
        f"{prefix}self_attn.q_proj.bias": (q,),
        f"{prefix}self_attn.k_proj.weight": (kv, d),
        f"{prefix}self_attn.k_proj.bias": (kv,),
        f"{prefix}self_attn.v_proj.weight": (kv, d),
        f"{prefix}self_attn.v_proj.bias": (kv,),
        f"{prefix}self_attn.o_proj.weight": (d, q),
        f"{prefix}mlp.gate_proj.weight": (i, d),
        f"{prefix}mlp.up_proj.weight": (i, d),
        f"{prefix}mlp.down_proj.weight": (d, i),
        f"{prefix}input_layernorm.weight": (d,),
        f"{prefix}post_attention_layernorm.weight": (d,),
    }


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2-VL checkpoint (hub layout) and its shape."""
    t, v = cfg.text, cfg.vision
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, t.hidden_size)}
    for i in range(t.num_layers):
        shapes.update(decoder_layer_shapes(cfg, f"model.layers.{i}."))
    shapes["model.norm.weight"] = (t.hidden_size,)
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    e, mlp = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    merged = e * v.spatial_merge_size**2
    shapes["visual.patch_embed.proj.weight"] = (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes.update(
            {
                f"{p}norm1.weight": (e,),
                f"{p}norm1.bias": (e,),
                f"{p}norm2.weight": (e,),
                f"{p}norm2.bias": (e,),
                f"{p}attn.qkv.weight": (3 * e, e),
                f"{p}attn.qkv.bias": (3 * e,),
                f"{p}attn.proj.weight": (e, e),
                f"{p}attn.proj.bias": (e,),
                f"{p}mlp.fc1.weight": (mlp, e),
                f"{p}mlp.fc1.bias": (mlp,),
                f"{p}mlp.fc2.weight": (e, mlp),
                f"{p}mlp.fc2.bias": (e,),
            }
        )
    shapes.update(
        {
            "visual.merger.ln_q.weight": (e,),
            "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (merged, merged),
            "visual.merger.mlp.0.bias": (merged,),
            "visual.merger.mlp.2.weight": (v.out_hidden_size, merged),
            "visual.merger.mlp.2.bias": (v.out_hidden_size,),
        }
    )
    return shapes


def head_shapes(cfg: ModelConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The `mhsa` head's weight file: K decoder layers (`layers.{i}.*`) and its final `norm.weight`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers):
        shapes.update(decoder_layer_shapes(cfg, f"layers.{i}."))
    shapes["norm.weight"] = (cfg.text.hidden_size,)
    return shapes
