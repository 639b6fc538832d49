"""oneDNN-prepacked linears (tte_engine/model/cpu_linear.py) against the nn.Linear they replace."""

import pytest
import torch
import torch.nn as nn

from tte_engine import Engine
from tte_engine.model import cpu_linear
from tte_engine.model.cpu_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not cpu_linear.prepacking_available(), reason="this torch build has no oneDNN linear prepacking")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (33,)])
def test_packed_linear_matches_nn_linear(dtype, atol, bias, shape):
    torch.manual_seed(sum(shape) + bias)
    dense = nn.Linear(37, 53, bias=bias).to(dtype)
    packed = PackedLinear(dense)
    x = torch.randn(*shape, 37, dtype=dtype)
    with torch.inference_mode():
        want, got = dense(x), packed(x)
        strided = torch.randn(*shape, 2 * 37, dtype=dtype)[..., ::2]  # a non-contiguous input
        assert torch.allclose(packed(strided), dense(strided), atol=atol, rtol=1e-2)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.allclose(got, want, atol=atol, rtol=1e-2)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 19])
def test_linear_into_is_the_layer_bit_for_bit(packed, bias, dtype, rows):
    """`linear_into` (the LM head's call, no Module.__call__) gives `layer(x)` bit for bit, packed or
    not, into a fresh tensor or into a static buffer's first rows (the CUDA-graph path's)."""
    torch.manual_seed(rows + 2 * bias)
    layer = nn.Linear(45, 301, bias=bias).to(dtype)
    if packed:
        layer = PackedLinear(layer)
    assert cpu_linear.linear_dtype(layer) == dtype
    x = torch.randn(rows, 45, dtype=dtype)
    with torch.inference_mode():
        want = layer(x)
        buffer = torch.full((rows + 2, 301), float("nan"), dtype=dtype)  # larger than the batch, as a graph's
        into = cpu_linear.linear_into(layer, x, out=buffer[:rows])
        fresh = cpu_linear.linear_into(layer, x)
    assert torch.equal(fresh, want) and torch.equal(into, want)
    assert into.data_ptr() == buffer.data_ptr() and buffer[rows:].isnan().all()


def test_packed_linear_keeps_the_exact_weight():
    dense = nn.Linear(19, 23)
    packed = PackedLinear(dense)
    assert torch.equal(packed.weight, dense.weight)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], dense.weight) and torch.equal(state["bias"], dense.bias)


def test_pack_linears_threshold_and_tied_embedding():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 40)
            self.head = nn.Linear(40, 300, bias=False)
            self.head.weight = self.embed.weight  # tied
            self.small = nn.Linear(4, 4)
            self.block = nn.Sequential(nn.Linear(40, 400), nn.ReLU())

    model = Tiny()
    embed = model.embed.weight.detach().clone()
    assert pack_linears(model, min_elements=1000) == 2  # head (12,000) and block[0] (16,000); small (16) stays dense
    assert isinstance(model.head, PackedLinear) and isinstance(model.block[0], PackedLinear) and type(model.small) is nn.Linear
    assert torch.equal(model.embed.weight, embed)  # the embedding keeps its dense tensor
    with torch.inference_mode():
        ids = torch.tensor([3, 299])
        assert torch.allclose(model.head(model.embed(ids)), model.embed(ids) @ embed.T, atol=1e-4)


def test_engine_prepacks_on_cpu_by_default_and_not_when_told(make_checkpoint, monkeypatch):
    tiny_checkpoint = make_checkpoint("ckpt")
    monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    packed = Engine(tiny_checkpoint).stages[0].runner.model
    plain = Engine(tiny_checkpoint, prepack_weights=False).stages[0].runner.model
    assert isinstance(packed.layers[0].gate_up_proj, PackedLinear) and type(plain.layers[0].gate_up_proj) is nn.Linear
    # the state dict (what the exporters read) is the same either way
    want = plain.state_dict()
    got = packed.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_prepack_weights_is_for_cpu_engines():
    with pytest.raises(ValueError, match="prepack_weights"):
        Engine("tiny-random", device="cuda", prepack_weights=True)


def test_packed_state_dict_loads_back_and_weight_assignment_repacks():
    model = nn.Sequential(nn.Linear(13, 21), nn.Linear(21, 5, bias=False))
    fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    pack_linears(model, min_elements=0)
    model.load_state_dict(fresh)  # strict: the dense keys are the packed layers' keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"0.bias": fresh["0.bias"], "1.weight": fresh["1.weight"]})
    model[1].weight = torch.ones(5, 21)
    with torch.inference_mode():
        assert torch.allclose(model[1](torch.ones(2, 21)), torch.full((2, 5), 21.0))
    with pytest.raises(ValueError, match="shape"):
        model[1].weight = torch.ones(21, 5)


@pytest.mark.parametrize("value", [0, 1, 0.0, "yes"])
def test_prepack_weights_takes_only_a_bool_or_none(value):
    with pytest.raises(ValueError, match="prepack_weights"):
        Engine("tiny-random", prepack_weights=value)


def test_onnx_export_of_a_packed_engine(make_checkpoint, monkeypatch, tmp_path):
    """export_onnx traces the model: it swaps plain linears in for the trace and puts the packed ones back."""
    from tte_engine.export.onnx_export import export_onnx

    monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    engine = Engine(make_checkpoint("ckpt"))
    model = engine.stages[0].runner.model
    assert isinstance(model.layers[0].qkv_proj, PackedLinear)
    report = export_onnx(engine, tmp_path, graphs=("embed",))
    assert (tmp_path / "embed.onnx").exists() and report["graphs"]["embed.onnx"]["max_abs_error_vs_torch"] < 1e-4, report
    assert isinstance(model.layers[0].qkv_proj, PackedLinear)  # restored
