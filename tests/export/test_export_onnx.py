"""The ONNX target: vision tower, embedding head and the think=False embed path, checked with onnx.checker
and run with onnxruntime against our torch engine (max abs error <= 1e-4, fp32), at several shapes."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export_fixtures import float_engine, fp8_all_export  # noqa: F401  (pytest fixtures)
from tte_engine.inputs import as_query
from tte_engine.export.onnx_export import HeadGraph, prepare_inputs, run_pipeline

TOL = 1e-4


def test_graphs_are_valid_with_dynamic_axes(fp8_all_export):
    out, _ = fp8_all_export
    onnx_dir = out / "onnx"
    report = json.loads((onnx_dir / "onnx.json").read_text())
    assert report["opset"] >= 17
    for name, axis_input in (("vision.onnx", "patches"), ("embed.onnx", "input_ids"), ("head.onnx", "hidden")):
        model = onnx.load(str(onnx_dir / name))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version >= 17
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert isinstance(dims[axis_input][0], str), (name, dims)  # a named, dynamic axis
        assert report["graphs"][name]["max_abs_error_vs_torch"] <= TOL
    assert "decode loop" in (onnx_dir / "README.md").read_text()


def test_onnx_pipeline_matches_the_engine(fp8_all_export, float_engine, mixed_items):
    """vision.onnx -> embed.onnx on every item (texts of several lengths, images of several sizes) vs Engine.embed(think=False).

    The ONNX graphs come from the float weights even in an --fp8 export.
    """
    out, _ = fp8_all_export
    ref = float_engine.embed(mixed_items, think=False)
    sessions = {}
    sizes = set()
    for i, item in enumerate(mixed_items):
        inputs = prepare_inputs(float_engine, item)
        assert list(inputs["embed"]["input_ids"]) == ref.prompt_token_ids[i] + ref.embed_token_ids[i]
        got = run_pipeline(out / "onnx", inputs, sessions)
        assert np.abs(got - ref.embeddings[i].numpy()).max() <= TOL, i
        sizes.add((len(inputs["embed"]["input_ids"]), inputs.get("vision", {}).get("patches", np.zeros((0,))).shape[0]))
    assert len(sizes) >= 4  # the graphs really ran at several shapes


def test_vision_graph_packs_several_images(fp8_all_export, float_engine, mixed_items):
    out, _ = fp8_all_export
    a, b = (prepare_inputs(float_engine, mixed_items[i])["vision"] for i in (1, 2))
    packed = {"patches": np.concatenate([a["patches"], b["patches"]]), "pos_ids": np.concatenate([a["pos_ids"], b["pos_ids"]]),
              "segment_ids": np.concatenate([a["segment_ids"], b["segment_ids"] + 1])}
    got = ort.InferenceSession(str(out / "onnx" / "vision.onnx"), providers=["CPUExecutionProvider"]).run(None, packed)[0]
    model = float_engine.stages[0].runner.model
    grids = [float_engine.prompts.build(as_query(mixed_items[i], i), i, think=False).images[0].grid_thw for i in (1, 2)]
    with torch.inference_mode():
        want = model.encode_images(torch.from_numpy(packed["patches"]), grids).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= TOL


def test_head_graph_matches_the_runtime_head(fp8_all_export, float_engine):
    """head.onnx against the runtime's MHSAHead (packed, per-sequence attention) on random source states."""
    out, _ = fp8_all_export
    model = float_engine.stages[0].runner.model
    sess = ort.InferenceSession(str(out / "onnx" / "head.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for t in (3, 17, 40):
        hidden = torch.randn(t, model.cfg.text.hidden_size, generator=gen)
        positions = torch.arange(t).expand(3, -1).clone()
        positions[1, 2:] += 1  # non-trivial M-RoPE: the axes differ
        with torch.inference_mode():
            want = model.pool_mhsa(hidden, positions, torch.tensor([0, t], dtype=torch.int32))[0]
            wrapper = HeadGraph(model)(hidden, positions)
        got = sess.run(None, {"hidden": hidden.numpy(), "positions": positions.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= TOL and torch.allclose(wrapper, want, atol=TOL)


def test_large_graphs_keep_their_weights_in_one_external_file(float_engine, tmp_path, monkeypatch):
    """The TorchScript exporter writes one loose file per tensor (391 for the 2B vision tower): re-saved as ONE
    `<graph>.onnx.data` per graph, which onnx.checker and onnxruntime load."""
    import tte_engine.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)  # every graph counts as large
    report = ox.export_onnx(float_engine, tmp_path / "g", graphs=("vision", "head"))
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert files == sorted(["head.onnx", "head.onnx.data", "vision.onnx", "vision.onnx.data", "onnx.json", "README.md"]), files
    for name in ("vision.onnx", "head.onnx"):
        assert report["graphs"][name]["max_abs_error_vs_torch"] <= TOL
        inits = onnx.load(str(tmp_path / "g" / name), load_external_data=False).graph.initializer
        big = [t for t in inits if np.prod(t.dims) * 4 >= 1024]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)  # the weights live in the one .data file
