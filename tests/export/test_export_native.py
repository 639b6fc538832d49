"""The native engine directory: written by the CLI, loaded by Engine() without re-deriving anything,
and computing exactly what the source checkpoint computes."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from export_fixtures import cli, float_engine  # noqa: F401  (pytest fixtures)
from tte_engine import Engine
from tte_engine.checkpoint import fingerprint, resolve_checkpoint
from tte_engine.engine_dir import ENGINE_FORMAT_VERSION
from tte_engine.errors import CheckpointError


@pytest.fixture(scope="module")
def native_export(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "tiny"
    proc = cli("--checkpoint", "tiny-random", "--out", out, "--calibration", "0")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _row_cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_engine_json_describes_the_engine(native_export):
    out, proc = native_export
    spec = json.loads((out / "engine.json").read_text())
    assert spec["format"] == "tte-engine" and spec["format_version"] == ENGINE_FORMAT_VERSION
    assert spec["architecture"] == "Qwen2VLForConditionalGeneration"
    assert spec["dtype"] == "float32" and spec["quantization"] is None
    assert spec["model"]["text"]["hidden_size"] == 128 and spec["tte"]["head"]["type"] == "mhsa"
    source = resolve_checkpoint("tiny-random")
    assert spec["source"]["fingerprint"] == fingerprint(source) and spec["source"]["random_init"] is True
    assert spec["tokens"]["think_end_ids"] and spec["tokens"]["suffix_ids"] and spec["tokens"]["eos_ids"]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "tte_config.json", "weights.safetensors", "export_report.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("model*.safetensors")) and not (out / "embedding_head.safetensors").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only like safetensors' default
    assert "exported tiny-random" in proc.stdout and "native engine (Engine(path))" in proc.stdout


def test_weights_are_the_runtime_state_dict(native_export, float_engine):
    out, _ = native_export
    model = float_engine.stages[0].runner.model
    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name, tensor in model.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor), name
    assert names == set(model.state_dict())
    assert {"layers.0.qkv_proj.weight", "layers.0.gate_up_proj.weight", "visual.patch_embed.weight", "head.layers.0.qkv_proj.weight"} <= names


def test_engine_dir_loads_without_rederiving_and_matches_the_checkpoint(native_export, float_engine, mixed_items, monkeypatch):
    out, _ = native_export
    import tte_engine.engine as engine_mod

    def forbidden(*_a, **_k):
        raise AssertionError("an engine directory must not go through the checkpoint loader")

    monkeypatch.setattr(engine_mod, "load_checkpoint_weights", forbidden)
    monkeypatch.setattr(engine_mod.ModelConfig, "from_hf", forbidden)
    eng = Engine(out)
    assert eng.engine_dir is not None
    ref = float_engine.embed(mixed_items)
    got = eng.embed(mixed_items)
    assert got.trace_token_ids == ref.trace_token_ids
    assert _row_cos(got.embeddings, ref.embeddings).min() >= 0.99999


def test_newer_format_version_fails_clearly(native_export, tmp_path):
    import shutil

    out, _ = native_export
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    spec = json.loads((newer / "engine.json").read_text())
    spec["format_version"] = ENGINE_FORMAT_VERSION + 1
    (newer / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="newer tte-export.*upgrade tte_engine"):
        Engine(newer)


def test_an_engine_dir_is_not_a_source(native_export, tmp_path):
    from tte_engine.errors import ExportError
    from tte_engine.export.pipeline import ExportOptions, run_export

    with pytest.raises(ExportError, match="already an exported engine directory"):
        run_export(ExportOptions(checkpoint=str(native_export[0]), out=tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def _quantized(spec):  # a float export's engine.json made to claim FP8 modules
    spec["quantization"] = {"method": "fp8_e4m3_per_channel", "modules": ["model.layers.0.mlp.down_proj"]}
    return spec


@pytest.mark.parametrize("edit, says", [
    (lambda s: {**_quantized(s), "quantization": {**_quantized(s)["quantization"], "modules": ["nonexistent.mod"]}}, "names no linear layer"),
    (lambda s: {**_quantized(s), "quantization": {**_quantized(s)["quantization"], "modules": "abc"}}, "quantization.modules must be a list"),
    (lambda s: {**s, "tokens": {**s["tokens"], "suppressed_ids": None}}, "tokens.suppressed_ids must be a list of token ids"),
    (lambda s: {**s, "tokens": {**s["tokens"], "eos_ids": [1.5]}}, "tokens.eos_ids must be a list of token ids"),
    (lambda s: {**s, "model": {**s["model"], "text": {**s["model"]["text"], "num_layers": 100_000}}}, "model.text.num_layers is 100000, but"),
    (lambda s: {**s, "model": {**s["model"], "vision": {**s["model"]["vision"], "depth": 1}}}, "model.vision.depth is 1, but"),
], ids=["unknown-module", "modules-string", "suppressed-null", "eos-float", "layers-huge", "vision-depth"])
def test_a_tampered_engine_json_is_one_checkpoint_error(native_export, tmp_path, edit, says):
    """Found by an attacker: these were an AttributeError / TypeError traceback (exit 1 in the CLIs), or
    (a layer count the weights do not hold) a minute of building 100000 layers before the first tensor said so."""
    import shutil

    out, _ = native_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "engine.json").write_text(json.dumps(edit(json.loads((broken / "engine.json").read_text()))))
    with pytest.raises(CheckpointError, match="engine.json") as info:
        Engine(broken)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_missing_weight_file_fails_clearly(native_export, tmp_path):
    import shutil

    out, _ = native_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights.safetensors.*missing"):
        Engine(broken)


def test_two_model_export_keeps_its_reasoner(make_checkpoint, mixed_items, tmp_path):
    """The embedder becomes the engine directory; the reasoner stays a checkpoint, referenced by absolute path."""
    from tte_engine.export.pipeline import ExportOptions, run_export

    reasoner = make_checkpoint("exp-reasoner", seed=7, head="last_token", think_max_tokens=6)
    embedder = make_checkpoint("exp-embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=6)
    out = tmp_path / "two"
    run_export(ExportOptions(checkpoint=str(embedder), out=out, calibration=0))
    assert json.loads((out / "engine.json").read_text())["tte"]["reasoner"] == str(reasoner)
    eng, ref = Engine(out), Engine(embedder)
    assert len(eng.stages) == 2 and eng.stages[0].checkpoint == reasoner
    got, want = eng.embed(mixed_items[:3]), ref.embed(mixed_items[:3])
    assert got.trace_token_ids == want.trace_token_ids
    assert _row_cos(got.embeddings, want.embeddings).min() >= 0.99999


def test_an_exported_reasoner_path_is_absolute_even_when_found_relative(monkeypatch, tmp_path):
    """A reasoner found through a relative TTE_HOME or Hugging Face cache directory had a relative
    path, which an export wrote as it was: the engine then found it only from the export's working
    directory. Checkpoints resolve to absolute paths, so the export records one."""
    from types import SimpleNamespace

    from tte_engine.config import TTEConfig
    from tte_engine.export.native import exported_tte_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TTE_HOME", "relhome")
    monkeypatch.setenv("HF_HUB_CACHE", "relhf")
    for where in ("relhome/models/tiny-reasoner", "relhf/models--org--reasoner/snapshots/abc"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "config.json").write_text("{}")
    assert resolve_checkpoint("org/reasoner") == tmp_path / "relhf/models--org--reasoner/snapshots/abc"
    reasoner = resolve_checkpoint("tiny-reasoner")
    tte = TTEConfig.from_dict({"mode": "two_model", "reasoner": "tiny-reasoner"})
    engine = SimpleNamespace(tte=tte, stages=[SimpleNamespace(checkpoint=reasoner)])
    assert exported_tte_config(engine)["reasoner"] == str(tmp_path / "relhome/models/tiny-reasoner")


def test_two_model_export_of_every_target_finds_a_relative_reasoner(make_checkpoint, mixed_items, tmp_path):
    """A reasoner named relative to the checkpoint (tte_config `"reasoner": "reasoner"`) resolves from
    each target's output too: the hf target kept the relative name, which pointed nowhere there."""
    import shutil

    from tte_engine.export.pipeline import ExportOptions, run_export

    reasoner = make_checkpoint("exp-reasoner", seed=7, head="last_token", think_max_tokens=6)
    embedder = tmp_path / "embedder"
    shutil.copytree(make_checkpoint("exp-embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=6),
                    embedder)
    shutil.copytree(reasoner, embedder / "reasoner")
    config = json.loads((embedder / "tte_config.json").read_text())
    (embedder / "tte_config.json").write_text(json.dumps(dict(config, reasoner="reasoner")))
    out = tmp_path / "two"
    run_export(ExportOptions(checkpoint=str(embedder), out=out, target="hf", calibration=0))
    assert json.loads((out / "hf" / "tte_config.json").read_text())["reasoner"] == str(embedder / "reasoner")
    got, want = Engine(out / "hf").embed(mixed_items[:2]), Engine(embedder).embed(mixed_items[:2])
    assert got.trace_token_ids == want.trace_token_ids
    assert _row_cos(got.embeddings, want.embeddings).min() >= 0.99999


def test_bf16_export_halves_the_weights_and_still_runs(cli, native_export, float_engine, mixed_items, tmp_path):
    from tte_engine.export.pipeline import ExportOptions, run_export

    out = tmp_path / "bf16"
    summary = run_export(ExportOptions(checkpoint="tiny-random", out=out, dtype="bfloat16", calibration=0))
    assert summary["dtype"] == "bfloat16"
    fp32_size = (native_export[0] / "weights.safetensors").stat().st_size
    assert (out / "weights.safetensors").stat().st_size < 0.55 * fp32_size
    eng = Engine(out)  # CPU runs float32: the bf16 weights are upcast on load
    res = eng.embed(mixed_items, think=False)
    ref = float_engine.embed(mixed_items, think=False)
    assert _row_cos(res.embeddings, ref.embeddings).min() >= 0.999


def test_reexporting_gives_the_same_fingerprint(native_export, tmp_path):
    """Nothing run-specific goes into what the runtime loads: the same checkpoint and options give the same fingerprint."""
    from tte_engine.export.pipeline import ExportOptions, run_export

    first, _ = native_export  # tte-export --checkpoint tiny-random --calibration 0 (native target)
    again = tmp_path / "again"
    summary = run_export(ExportOptions(checkpoint="tiny-random", out=again, calibration=0))
    assert fingerprint(again) == fingerprint(first)
    assert "created" in summary and "created" not in json.loads((again / "engine.json").read_text())["producer"]
    # the export's report and the other targets' folders are not part of it; what the runtime loads is
    (again / "export_report.json").write_text("{}")
    (again / "onnx").mkdir()
    (again / "onnx" / "vision.onnx").write_bytes(b"graph")
    assert fingerprint(again) == fingerprint(first)
    (again / "tokenizer_config.json").write_text((again / "tokenizer_config.json").read_text() + " ")
    assert fingerprint(again) != fingerprint(first)
