"""The decode step as a GPU sees it, checked on CPU (issue 8) — and memory it never wrote (issue 12).

- A dispatch mode around every decode step fails on any op that would synchronize a CUDA stream
  with the host or give a data-dependent shape. The one allowed device-to-host transfer is the
  sampled token ids, read by `runner.readback` exactly once per step.
- The CUDA-graph path's code (static buffers padded to a bucket, full-width block tables, fixed
  split counts) runs eagerly on CPU with `cuda_graphs=True` and must give what the plain eager
  path gives; its padded rows must write nothing but the scratch block.
- Every buffer the engine allocates but should not read (KV caches, the mhsa head's state cache,
  the scratch block) is poisoned with NaN or huge values before a run: results must not change.
"""

import contextlib

import numpy as np
import pytest
import torch
from oracle import cosine
from torch.utils._python_dispatch import TorchDispatchMode

from tte_engine import Engine, SamplingParams
from tte_engine import runner as runner_module
from tte_engine.model import cpu_linear

aten = torch.ops.aten

# Ops that make the host wait for the device, or whose output shape depends on tensor values.
# Under inference mode (where the engine's steps run) `.item()`, `int(t)`, `float(t)` and a tensor
# used as a slice bound reach a dispatch mode as `aten.item`, outside it as `_local_scalar_dense`;
# `torch.where(mask)` as `where.default`, elsewhere as `nonzero` (`test_the_detector_sees_every_sync`).
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), int(t), bool(t) outside inference mode
    aten.item.default,  # the same inside it
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.where.default,  # torch.where(mask): nonzero
    aten.masked_select.default,
    aten.masked_scatter.default,
    aten.masked_scatter_.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.allclose.default,
    aten.bincount.default,  # its output size is the largest value
}
# A tensor made from host data (a Python list, a numpy array): on a GPU a pageable host-to-device
# copy. (A Python scalar makes a 0-dim one, which a GPU op takes by value: not recorded.)
FRESH_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


class SyncDetector(TorchDispatchMode):
    """Records every op of `SYNCING`, boolean-mask indexing, and repeat_interleave without
    output_size; with `host_data`, also every tensor made from host data (`FRESH_FROM_HOST`)
    unless `allowed()` says the caller may."""

    def __init__(self, host_data: bool = False, allowed=lambda: False):
        super().__init__()
        self.found: list[str] = []
        self.host_data, self.allowed = host_data, allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.found.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.found.append(f"{func} with a boolean mask")
        elif func in REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
            self.found.append(f"{func} without output_size")
        elif func in FRESH_FROM_HOST and self.host_data and args[0].dim() > 0 and not self.allowed():
            self.found.append(f"{func}: a tensor made from host data")  # (a Python scalar, 0-dim, is passed by value)
        return func(*args, **kwargs)


# Tensor methods that copy a tensor's data to the host (no dispatch mode sees them on CPU, where
# they copy nothing): on a GPU each is a device-to-host transfer and a sync.
TO_HOST = ("tolist", "cpu", "numpy", "__array__")
# Factories that, called without `device=`, make a host tensor (a dispatch mode sees the device
# filled in): on a GPU, a host buffer that a `copy_` from the device would fill with a transfer.
FACTORIES = ("empty", "zeros", "ones", "full", "arange", "empty_strided", "rand", "randn", "randint")


def _names_a_device(args, kwargs) -> bool:
    """Whether a `Tensor.to` call names a device (`.to("cpu")`, `.to(device)`, `.to(other)`): on
    a GPU a transfer either way, since a step's tensors are on the device already; a dtype change
    names none. (At dispatch level `.to` of a CPU tensor to the CPU may not show at all, and
    `torch.as_tensor` of a tensor shows as one.)"""
    return kwargs.get("device") is not None or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


@contextlib.contextmanager
def host_reads(found: list[str], allowed=lambda: False):
    """Record in `found` every call of a TO_HOST method or of `Tensor.to` naming a device, and
    every FACTORIES call without `device=`, unless `allowed()` says the caller may."""
    methods = {name: getattr(torch.Tensor, name) for name in (*TO_HOST, "to")}
    factories = {name: getattr(torch, name) for name in FACTORIES}

    def recording_method(name):
        def method(self, *args, **kwargs):
            if (name != "to" or _names_a_device(args, kwargs)) and not allowed():
                found.append(f"Tensor.{name}")
            return methods[name](self, *args, **kwargs)

        return method

    def recording_factory(name):
        def factory(*args, **kwargs):
            if kwargs.get("device") is None and not allowed():
                found.append(f"torch.{name} without a device: a host tensor")
            return factories[name](*args, **kwargs)

        return factory

    for name in methods:
        setattr(torch.Tensor, name, recording_method(name))
    for name in FACTORIES:
        setattr(torch, name, recording_factory(name))
    try:
        yield
    finally:
        for name, original in methods.items():
            setattr(torch.Tensor, name, original)
        for name, original in factories.items():
            setattr(torch, name, original)


@contextlib.contextmanager
def watch_decode_steps(engine: Engine, transfers: bool = False):
    """Run every decode step of `engine` under a SyncDetector; yields a report dict. `transfers`:
    also record every host-to-device tensor (made from host data) and every device-to-host read
    outside the step's readback; for an engine set up as a GPU runs (`gpu_like`), where no CPU
    shortcut reads tensors through numpy."""
    report = {"decode_steps": 0, "readbacks": 0, "found": [], "in_decode": False, "in_readback": False}
    runners = [s.runner for s in engine.stages]
    originals = [r._run_decode for r in runners]
    real_readback = runner_module.readback

    def counting_readback(tokens):
        report["readbacks"] += report["in_decode"]
        report["in_readback"] = True
        try:
            return real_readback(tokens)
        finally:
            report["in_readback"] = False

    def allowed() -> bool:
        return report["in_readback"]

    def wrap(original):
        def run_decode(seqs):
            report["decode_steps"] += 1
            report["in_decode"] = True
            detector = SyncDetector(host_data=transfers, allowed=allowed)
            try:
                with detector, host_reads(detector.found, allowed) if transfers else contextlib.nullcontext():
                    out = original(seqs)
            finally:
                report["in_decode"] = False
            report["found"] += detector.found
            return out

        return run_decode

    runner_module.readback = counting_readback
    for r, original in zip(runners, originals):
        r._run_decode = wrap(original)
    try:
        yield report
    finally:
        runner_module.readback = real_readback
        for r, original in zip(runners, originals):
            r._run_decode = original


def gpu_like(engine: Engine, monkeypatch) -> None:
    """Turn off a CPU engine's numpy shortcuts in the decode step (suppression and argmax in
    numpy, the logits' numpy view, argmax and top-k / top-p's sort through numpy), so that it runs
    the ops a GPU runs; with `cuda_graphs=True` it then takes the graph path's code too (no host
    attention plan)."""
    from tte_engine import sampling
    from tte_engine.kernels import sampling as sampling_kernels

    for stage in engine.stages:
        runner = stage.runner
        runner.suppression.on_numpy = False
        runner.logits.numpy_view = False
        runner.logits._rows.clear()
    on_device = lambda logits: logits.argmax(dim=-1)  # noqa: E731  (kernels.sampling.greedy_ids off CPU)
    monkeypatch.setattr(sampling, "greedy_ids", on_device)
    monkeypatch.setattr(sampling_kernels, "greedy_ids", on_device)
    monkeypatch.setattr(sampling, "_sorted_descending", lambda x: x.sort(dim=-1, descending=True).values)  # its branch off CPU


# What no decode step may do, each of which the detector must see, in inference mode and out of it.
FORBIDDEN = {
    "item": lambda t, m: t.max().item(),
    "int": lambda t, m: int(t[0]),
    "float": lambda t, m: float(t.sum()),
    "bool": lambda t, m: bool(t[0] > 0),
    "slice bound": lambda t, m: t[: t[2].long()],
    "nonzero": lambda t, m: t.nonzero(),
    "where(mask)": lambda t, m: torch.where(m),
    "argwhere": lambda t, m: torch.argwhere(m),
    "boolean mask read": lambda t, m: t[m],
    "boolean mask write": lambda t, m: t.__setitem__(m, 0.0),
    "masked_select": lambda t, m: t.masked_select(m),
    "unique": lambda t, m: torch.unique(t),
    "repeat_interleave": lambda t, m: torch.repeat_interleave(t, m.long()),
    "Tensor.repeat_interleave": lambda t, m: t.repeat_interleave(m.long()),
    "list index": lambda t, m: t[[1, 2]],
    "tensor from a list": lambda t, m: torch.tensor([1, 2, 3]),
    "tensor from numpy": lambda t, m: torch.as_tensor(np.arange(3)),
    "tolist": lambda t, m: t.tolist(),
    "cpu": lambda t, m: t.cpu(),
    "numpy": lambda t, m: t.numpy(),
    "np.asarray": lambda t, m: np.asarray(t),
    "to the host": lambda t, m: t.to("cpu"),
    "to a device": lambda t, m: t.to(t.device),
    "into a host buffer": lambda t, m: torch.empty(3).copy_(t[:3]),
    "bincount": lambda t, m: torch.bincount(m.long()),
}


@pytest.mark.parametrize("inference", [True, False], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_the_detector_sees_every_sync(name, inference):
    """Each forbidden op, alone, is recorded (a torch upgrade that changes how one reaches a
    dispatch mode must not weaken the detector silently); the allowed ones (device-side ops,
    factories given the device, dtype changes) are not."""
    with torch.inference_mode() if inference else torch.no_grad():
        t, m = torch.arange(6.0), torch.tensor([True, False, True, True, False, True])
        detector = SyncDetector(host_data=True)
        with detector, host_reads(detector.found):
            FORBIDDEN[name](t, m)
        assert detector.found, name
        fine = SyncDetector(host_data=True)
        with fine, host_reads(fine.found):
            torch.where(m, t, 0.0).index_select(0, torch.arange(3, device=t.device)).argmax(-1)
            t.repeat_interleave(m.long(), output_size=4)
            t.to(torch.int32).add_(torch.zeros(6, dtype=torch.int32, device=t.device))
        assert fine.found == []


SAMPLINGS = {"greedy": None, "temperature": SamplingParams(temperature=0.8, seed=5), "seeded": SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5)}


@pytest.mark.parametrize("head", ["last_token", "mhsa"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_decode_step_syncs_once(make_checkpoint, mixed_items, head, sampling, batch, graphs, monkeypatch):
    """One device-to-host transfer per decode step (the token ids) and no data-dependent shapes,
    for both heads, greedy and seeded sampling (temperature alone: no sort; with top-k and top-p),
    batch 1 and 7, eager and graph paths. The graph path runs set up as a GPU runs (`gpu_like`:
    suppression and argmax in torch's ops, where a CPU engine's fp32 logits otherwise go through
    numpy, which no dispatch mode sees), and there no tensor is made from host data and none is
    read to the host besides the readback: on a GPU, transfers."""
    overrides = dict(head="mhsa", head_layers=2) if head == "mhsa" else dict(head="last_token")
    engine = Engine(make_checkpoint("syncs", think_max_tokens=6, **overrides), cuda_graphs=graphs, max_model_len=512)
    if graphs:
        gpu_like(engine, monkeypatch)
    items = (mixed_items * 2)[:batch]
    with watch_decode_steps(engine, transfers=graphs) as report:
        engine.embed(items, sampling=SAMPLINGS[sampling])
    assert report["decode_steps"] >= 3
    assert report["found"] == []
    assert report["readbacks"] == report["decode_steps"]  # the single allowed sync of each step


@pytest.mark.parametrize("head", ["last_token", "mhsa"])
def test_triton_decode_step_syncs_once(make_checkpoint, mixed_items, head, monkeypatch):
    """The same on the Triton kernels (interpreted on CPU), which are what a GPU runs: the graph
    path's decode step, seeded sampling, set up as a GPU runs it. The wrappers around the kernels
    (split count, scratch, grid) must not read a tensor's value either: a split count taken from
    the longest context, say, would sync and break one graph for every context length."""
    pytest.importorskip("triton")
    overrides = dict(head="mhsa", head_layers=2) if head == "mhsa" else dict(head="last_token")
    # a few buckets: each is warmed up at capture, through the interpreter
    engine = Engine(make_checkpoint("syncs", think_max_tokens=6, **overrides), impl="triton", cuda_graphs=True, max_model_len=512,
                    max_num_seqs=4)
    gpu_like(engine, monkeypatch)
    # texts, and three decode steps only (all that runs is interpreted: the vision tower, the embed
    # suffix and pooling are not decode steps)
    for i, text in enumerate([mixed_items[0], mixed_items[3]]):
        engine.add_request(engine.make_sequence(text, i, sampling=SamplingParams(temperature=0.8, seed=5)))
    with watch_decode_steps(engine, transfers=True) as report:
        while report["decode_steps"] < 3:
            engine.step()
    engine.scheduler.abort_all()
    assert report["found"] == []
    assert report["readbacks"] == report["decode_steps"]


@pytest.mark.parametrize("head", ["last_token", "mhsa", "last_token_prepacked"])
def test_graph_path_matches_eager(make_checkpoint, mixed_items, head, monkeypatch):
    """Static buffers padded to buckets, full-width tables and fixed splits give the eager results;
    sampled steps sample from the logits the graph path left in its static buffer (written by the
    LM head's GEMM, or copied there from a oneDNN-packed LM head)."""
    overrides = dict(head="mhsa", head_layers=2) if head == "mhsa" else dict(head="last_token")
    if head == "last_token_prepacked":
        monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    path = make_checkpoint("syncs", think_max_tokens=6, **overrides)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=3)
    for params in (None, sampling):
        eager = Engine(path, cuda_graphs=False, max_model_len=512).embed(mixed_items, sampling=params)
        graphed_engine = Engine(path, cuda_graphs=True, max_model_len=512)
        lm_head = graphed_engine.stages[0].runner.model.lm_head
        assert isinstance(lm_head, cpu_linear.PackedLinear) == (head == "last_token_prepacked" and cpu_linear.prepacking_available())
        graphed = graphed_engine.embed(mixed_items, sampling=params)
        assert graphed.trace_token_ids == eager.trace_token_ids
        for i in range(len(mixed_items)):
            assert cosine(graphed.embeddings[i], eager.embeddings[i]) >= 0.99999


class _Copies(TorchDispatchMode):
    """Records each `copy_` (its non_blocking flag)."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.copy_.default:
            self.non_blocking.append(bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_step_inputs_reach_the_device_in_one_copy_per_step(make_checkpoint, mixed_items, graphs, monkeypatch):
    """Set up as on a GPU, where the staging buffer's host arrays are memory apart from its device
    buffer (on a CPU engine they are one, and `send` copies nothing): each decode step sends its
    inputs in exactly one copy, non-blocking, and no step reads the host buffers after it: they are
    poisoned right after every send, prefill's too, and the results are still the plain engine's."""
    from tte_engine.step_inputs import StagingBuffer

    path = make_checkpoint("syncs", think_max_tokens=6, head="last_token")
    sampling = SamplingParams(temperature=1.0, top_k=8, seed=4)
    want = [Engine(path, cuda_graphs=False, max_model_len=512).embed(mixed_items, sampling=s) for s in (None, sampling)]

    def apart(self, size):
        self.device_buffer = torch.empty(size, dtype=torch.int64, device=self.device)
        self.capacity = size
        self._host = [torch.empty(size, dtype=torch.int64) for _ in range(2)]
        self.host_arrays = [h.numpy() for h in self._host]

    copies_per_step, real_send, real_decode = [], StagingBuffer.send, runner_module.Runner._run_decode

    def send(self, size):
        with _Copies() as copies:
            real_send(self, size)
        self._host[self._turn].fill_(-(2**40))  # a step that read the host buffer now would read this
        if copies_per_step and copies_per_step[-1] is not None:
            copies_per_step[-1] += copies.non_blocking

    def run_decode(self, decode):
        copies_per_step.append([])
        try:
            return real_decode(self, decode)
        finally:
            copies_per_step.append(None)

    monkeypatch.setattr(StagingBuffer, "_grow", apart)
    monkeypatch.setattr(StagingBuffer, "send", send)
    monkeypatch.setattr(runner_module.Runner, "_run_decode", run_decode)
    engine = Engine(path, cuda_graphs=graphs, max_model_len=512)
    if graphs:
        gpu_like(engine, monkeypatch)
    for params, expected in zip((None, sampling), want):
        got = engine.embed(mixed_items, sampling=params)
        assert got.trace_token_ids == expected.trace_token_ids
        assert all(cosine(got.embeddings[i], expected.embeddings[i]) >= 0.99999 for i in range(len(mixed_items)))
    steps = [c for c in copies_per_step if c is not None]
    assert len(steps) >= 6 and all(c == [True] for c in steps), steps


def test_a_failed_capture_falls_back_to_plain_eager_with_one_warning(make_checkpoint, mixed_items, monkeypatch):
    """Capture is tried (as on CUDA) and fails (here: a CPU build has no CUDA stream): one
    RuntimeWarning says why, the runner drops its graphs (plain eager steps, not the padded
    graph-path code) and keeps the reason, and results are the eager engine's."""
    import warnings

    from tte_engine import cuda_graphs

    path = make_checkpoint("syncs", think_max_tokens=6, head="last_token")
    want = Engine(path, cuda_graphs=False, max_model_len=512).embed(mixed_items[:3])
    monkeypatch.setattr(cuda_graphs, "capture_refused", lambda device: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(path, cuda_graphs=True, max_model_len=512)
    said = [w for w in caught if issubclass(w.category, RuntimeWarning) and "CUDA graph capture failed" in str(w.message)]
    assert len(said) == 1 and "decode steps run eagerly" in str(said[0].message)
    runner = engine.stages[0].runner
    assert runner.graphs is None and runner.graphs_eager_reason.startswith("CUDA graph capture failed")
    got = engine.embed(mixed_items[:3])
    assert got.trace_token_ids == want.trace_token_ids
    assert torch.equal(got.embeddings, want.embeddings)


def test_logits_buffer_hands_out_rows_of_one_buffer():
    """`LogitsBuffer.rows(B)`: the first B rows, as a tensor and (fp32 on the CPU) a numpy array of
    the same memory, made once per batch size; it grows to the largest batch (doubling, at most
    max_rows), and `reserve` sizes it up front."""
    buf = runner_module.LogitsBuffer(max_rows=8, vocab=5, dtype=torch.float32, device=torch.device("cpu"), numpy_view=True)
    logits, array = buf.rows(3)
    assert logits.shape == (3, 5) and array.shape == (3, 5) and buf.rows(3)[0] is logits
    array[2, 4] = 7.0
    assert logits[2, 4].item() == 7.0 and logits.data_ptr() == buf.buffer.data_ptr()
    assert buf.rows(2)[0].data_ptr() == buf.buffer.data_ptr()
    buf.rows(4)  # past 3 rows: at least doubled (6), within max_rows
    assert len(buf.buffer) == 6 and buf.rows(3)[0] is not logits and buf.rows(3)[0].data_ptr() == buf.buffer.data_ptr()
    buf.rows(7)
    assert len(buf.buffer) == 8  # doubling stops at max_rows
    buf.reserve(2)
    assert len(buf.buffer) == 8
    half = runner_module.LogitsBuffer(max_rows=4, vocab=5, dtype=torch.bfloat16, device=torch.device("cpu"), numpy_view=False)
    assert half.rows(2)[1] is None and half.rows(2)[0].dtype == torch.bfloat16  # numpy has no bf16: torch's path


def test_decode_steps_write_their_logits_into_one_buffer(make_checkpoint, mixed_items, monkeypatch):
    """Eager decode steps of a batch write their logits into the runner's one `LogitsBuffer` (no
    fresh [B, V] tensor a step), and greedy ids come from those logits, suppressed."""
    engine = Engine(make_checkpoint("syncs", think_max_tokens=6, head="last_token"), cuda_graphs=False, max_model_len=512)
    runner = engine.stages[0].runner
    seen = []
    real = runner.decode_forward

    def forward(batch, *args, **kwargs):
        greedy, logits = real(batch, *args, **kwargs)
        seen.append((logits.data_ptr(), logits.shape, np.asarray(greedy).tolist(), logits.argmax(-1).tolist(),
                     logits[:, runner.suppression.index].max().item()))
        return greedy, logits

    monkeypatch.setattr(runner, "decode_forward", forward)
    engine.embed(mixed_items, max_trace_tokens=6)
    assert len(seen) >= 3
    assert {ptr for ptr, *_ in seen} == {runner.logits.buffer.data_ptr()}
    for _, shape, greedy, argmax, suppressed in seen:
        assert shape[0] == len(greedy) and greedy == argmax and suppressed == float("-inf")


def _poison(engine: Engine, value: float) -> None:
    """Fill every cache block with `value`, except blocks the prefix cache holds (memory that was
    written, and that a later prompt may rightly reuse)."""
    for stage in engine.stages:
        cache, keep = stage.runner.cache, list(stage.blocks.block_hash)
        for t in (cache.k, cache.v, cache.hidden):
            if t is not None:
                blocks = t if t is cache.hidden else t.transpose(0, 1)  # [num_blocks + 1, ...]
                saved = blocks[keep].clone()
                t.fill_(value)
                blocks[keep] = saved


ENGINES = {
    "last_token": dict(head="last_token"),
    "mhsa": dict(head="mhsa", head_layers=2),
}


@pytest.mark.parametrize("kind", ["last_token", "mhsa", "two_model"])
def test_never_written_memory_does_not_reach_results(make_checkpoint, mixed_items, kind):
    """Issue 12: caches full of NaN or huge values (never-written slots, block tails, padding, the
    scratch block, stale blocks) change nothing. Block size 16 with 11-token chunks leaves partial
    blocks everywhere; think on and off; graph path on, so padded rows are exercised too."""
    if kind == "two_model":
        reasoner = make_checkpoint("reasoner", seed=7, head="last_token", think_max_tokens=8)
        path = make_checkpoint("embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=8)
    else:
        path = make_checkpoint("poison", think_max_tokens=8, **ENGINES[kind])
    items = mixed_items[1:5]  # image + text, image only, long text, image + text + instruction
    settings = dict(max_num_batched_tokens=11, cuda_graphs=True, max_model_len=512)
    clean = Engine(path, **settings)
    _poison(clean, 0.0)
    want = {think: clean.embed(items, think=think) for think in (True, False)}
    dirty = Engine(path, **settings)
    for poison in (float("nan"), 3e38):
        for think in (True, False):
            _poison(dirty, poison)
            got = dirty.embed(items, think=think)
            assert got.trace_token_ids == want[think].trace_token_ids, (poison, think)
            assert got.embeddings.isfinite().all(), (poison, think)
            for i in range(len(items)):
                assert cosine(got.embeddings[i], want[think].embeddings[i]) >= 0.99999, (poison, think, i)


def test_padded_rows_write_only_the_scratch_block(make_checkpoint, mixed_items):
    """7 sequences decode in the bucket of 8: the padded row's k/v go to the scratch block, and no
    block that was never handed to a sequence is written. And it reads no real cache: the device
    step sees it with an empty context, through the padding row of the block tables (all scratch
    block), writing the scratch slot."""
    engine = Engine(make_checkpoint("poison", think_max_tokens=8, head="last_token"), cuda_graphs=True, max_model_len=512)
    blocks, runner = engine.stages[0].blocks, engine.stages[0].runner
    padded_steps, device_step = [], runner.decode_forward

    def checking_device_step(bucket, *args, **kwargs):
        decoding = len(engine.scheduler._decoding[0].seqs)
        view, pad = runner.decode_inputs(bucket), slice(decoding, bucket)
        assert (view["context_lens"][pad] == 0).all() and (view["table_rows"][pad] == runner.max_rows).all()
        assert (view["slot_mapping"][pad] == blocks.scratch_block * blocks.block_size).all()
        assert (runner.tables[runner.max_rows] == blocks.scratch_block).all()
        padded_steps.append(bucket - decoding)
        return device_step(bucket, *args, **kwargs)

    runner.decode_forward = checking_device_step
    handed_out: set[int] = set()
    grow, grow_by_one = blocks.grow, blocks.grow_by_one

    def recording_grow(seq, num_tokens):
        grow(seq, num_tokens)
        handed_out.update(seq.block_table)

    def recording_grow_by_one(seqs):
        grow_by_one(seqs)
        handed_out.update(b for seq in seqs for b in seq.block_table)

    blocks.grow, blocks.grow_by_one = recording_grow, recording_grow_by_one
    _poison(engine, float("nan"))
    engine.embed((mixed_items * 2)[:7])
    k = engine.stages[0].runner.cache.k
    written = {b for b in range(k.shape[1]) if not k[:, b].isnan().all()}
    assert blocks.scratch_block in written and max(padded_steps) >= 1  # padded rows did run
    assert written - handed_out == {blocks.scratch_block}


def test_decode_batch_follows_admissions_aborts_and_trace_ends(make_checkpoint, mixed_items, monkeypatch):
    """The scheduler reuses a pure decode step's batch arrays while its sequences stay the same. A
    request arriving mid-decode, an abort, traces ending at different lengths and a seeded sampled
    row must each still give every surviving sequence what it gets alone."""
    engine = Engine(make_checkpoint("syncs", think_max_tokens=12, head="last_token"), max_model_len=512)
    sampled = SamplingParams(temperature=1.0, top_k=8, seed=11)
    plan = [(0, 8, None), (1, 12, None), (2, 12, sampled), (3, 6, None)]  # (item, trace budget, sampling)
    alone = {i: engine.embed([mixed_items[i]], max_trace_tokens=n, sampling=s) for i, n, s in plan}
    seqs = {i: engine.make_sequence(mixed_items[i], i, max_trace_tokens=n, sampling=s) for i, n, s in plan}
    checked = _check_decode_inputs(engine, monkeypatch)
    for i in (0, 1, 2):
        engine.add_request(seqs[i])
    done = []
    for _ in range(3):  # prefill, then two pure decode steps: the batch is being reused
        done += engine.step()
    assert engine.scheduler._decoding[0] is not None and not done
    engine.add_request(seqs[3])  # arrives while the others decode: the next step takes its prompt
    done += engine.step()
    assert seqs[3].num_computed > 0
    done += engine.step()  # all four decode: a fresh batch, live for the next step
    assert engine.scheduler._decoding[0] is not None and not done
    assert engine.abort(seqs[1])
    aborted_at = len(seqs[1].trace_ids)
    while engine.has_unfinished():
        done += engine.step()
    assert len(seqs[1].trace_ids) == aborted_at  # an aborted sequence decodes no further
    assert {id(s) for s in done} == {id(seqs[i]) for i in (0, 2, 3)}
    assert seqs[1].stop_reason == "aborted" and checked[0] >= 5
    for i in (0, 2, 3):
        assert seqs[i].trace_ids == alone[i].trace_token_ids[0], i
        assert cosine(seqs[i].embedding, alone[i].embeddings[0]) >= 0.99999, i


@pytest.mark.parametrize("head", ["last_token", "mhsa"])
def test_kept_context_gives_what_gathering_gives(make_checkpoint, mixed_items, monkeypatch, head):
    """A CPU engine's decode steps keep each layer's gathered context from step to step
    (`attention.KeptContext`, from KEEP_MIN_ROWS rows up): kept from the first row, a run with
    traces ending at different steps (rows leave), a request arriving mid-decode (a mixed step)
    and a step failing between two layers, then retried, must give the traces and embeddings of
    a run that gathers at every step, bit for bit."""
    from tte_engine.kernels import attention
    from tte_engine.random_checkpoint import never_stop

    overrides = dict(head="mhsa", head_layers=2) if head == "mhsa" else dict(head="last_token")
    path = never_stop(make_checkpoint("long_trace", think_max_tokens=40, **overrides))
    budgets = [9, 30, 17, 4, 23]

    def run(keep_from: int, fail_at: int | None = None):
        monkeypatch.setattr(attention, "KEEP_MIN_ROWS", keep_from)
        engine = Engine(path, max_model_len=512, block_size=4)
        seqs = [engine.make_sequence(item, i, max_trace_tokens=n) for i, (item, n) in enumerate(zip(mixed_items, budgets))]
        for seq in seqs[:4]:
            engine.add_request(seq)
        real, calls, kept_steps = attention.decode_attention_torch, [0], [0]

        def attend(q, k_cache, v_cache, block_tables, context_lens, scale, plan=None):
            calls[0] += 1
            if calls[0] == fail_at:  # once, in the second layer of a step (the first has updated its kept context)
                raise RuntimeError("a layer failed")
            kept_steps[0] += plan is not None and plan.kept is not None and bool(plan.kept.layers)
            return real(q, k_cache, v_cache, block_tables, context_lens, scale, plan)

        monkeypatch.setattr(attention, "decode_attention_torch", attend)
        steps, failed = 0, 0
        while engine.has_unfinished():
            if steps == 6:
                engine.add_request(seqs[4])
            try:
                engine.step()
            except RuntimeError as exc:
                assert str(exc) == "a layer failed"
                failed += 1
            steps += 1
        assert failed == (fail_at is not None)
        return seqs, kept_steps[0]

    layers = len(Engine(path, max_model_len=512).stages[0].runner.model.layers)
    gathered, none_kept = run(keep_from=1 << 40)
    kept, kept_steps = run(keep_from=0, fail_at=12 * layers + 2)
    assert layers >= 2 and none_kept == 0 and kept_steps > 40
    for a, b in zip(gathered, kept, strict=True):
        assert a.trace_ids == b.trace_ids and len(a.trace_ids) > 0
        assert torch.equal(a.embedding, b.embedding)


def test_multi_token_stop_sequence_ends_a_decoding_trace(make_checkpoint, mixed_items):
    """A stop sequence of several tokens ends the trace on its last token (the decode step only
    looks closer at sequences whose newest token ends some stop sequence)."""
    engine = Engine(make_checkpoint("syncs", think_max_tokens=12, head="last_token"), max_model_len=512)
    free = engine.embed(mixed_items[:3], max_trace_tokens=12)
    trace = free.trace_token_ids[0]
    assert len(trace) >= 6, trace  # the checkpoint's first trace runs long enough to hold a stop pair
    stop = trace[4:6]  # two tokens the first item's trace produces at positions 4-5
    ends = [[t] for t in sorted(engine.scheduler.stop_tokens)] + engine.scheduler.stop_sequences
    assert stop[-1] not in engine.scheduler.stop_tokens
    engine.scheduler.set_stop_sequences(ends + [stop])
    stopped = engine.embed(mixed_items[:3], max_trace_tokens=12)
    first = next(k for k in range(1, len(trace)) if trace[k - 1 : k + 1] == stop)
    assert stopped.trace_token_ids[0] == trace[: first + 1]
    assert stopped.stop_reasons[0] == "stop"
    for i in (1, 2):  # the others stop there only if their own trace holds the sequence
        t = free.trace_token_ids[i]
        ends = [k for k in range(1, len(t)) if t[k - 1 : k + 1] == stop]
        assert stopped.trace_token_ids[i] == (t[: ends[0] + 1] if ends else t)


def test_decode_tokens_reach_each_sequence_on_flush(make_checkpoint, mixed_items):
    """A pure decode step records its tokens as one array row (`DecodeBatch.history`), not in each
    sequence: mid-run a decoding sequence lags, `scheduler.flush()` brings it up to date, and traces
    longer than the history's first 64 rows (it grows) end as an unbroken run's do."""
    from tte_engine.random_checkpoint import never_stop

    engine = Engine(never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token")), max_model_len=512)
    whole = engine.embed(mixed_items[:3], max_trace_tokens=75)
    assert [len(t) for t in whole.trace_token_ids] == [75] * 3  # a budget past the history's first 64 rows
    seqs = [engine.make_sequence(item, i, max_trace_tokens=75) for i, item in enumerate(mixed_items[:3])]
    for seq in seqs:
        engine.add_request(seq)
    while engine.scheduler._decoding[0] is None:
        engine.step()
    engine.scheduler.flush()  # the step that made the batch ran it once
    at_start = [len(s.trace_ids) for s in seqs]
    for _ in range(70):
        assert engine.step() == [] and engine.last_step_size == 3
    assert [len(s.trace_ids) for s in seqs] == at_start  # the hot path did not touch the sequences
    engine.scheduler.flush()
    for seq, trace, start in zip(seqs, whole.trace_token_ids, at_start):
        assert len(seq.trace_ids) == start + 70 and seq.trace_ids == trace[: start + 70]
        assert seq.num_computed == len(seq.token_ids) - 1  # the newest token is the next step's input
    done = []
    while engine.has_unfinished():
        done += engine.step()
    assert [s.trace_ids for s in seqs] == whole.trace_token_ids
    for seq, embedding in zip(seqs, whole.embeddings):
        assert cosine(seq.embedding, embedding) >= 0.99999


def test_a_long_lived_decode_batch_rebases_its_history(make_checkpoint, mixed_items, monkeypatch):
    """The decode batch lives as long as sequences decode: sequences join it (their prompt done) and
    leave it (trace over) without a new batch, and its history is flushed and restarted once it
    holds `_REBASE_AT` steps. Traces and embeddings are those of a run that never rebases."""
    from tte_engine import scheduler as sched
    from tte_engine.random_checkpoint import never_stop

    engine = Engine(never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token")), max_model_len=512, max_num_seqs=3)
    budgets = [30, 12, 25, 7, 18]  # 5 items, 3 at a time: later ones join while others decode

    def run():
        seqs = [engine.make_sequence(item, i, max_trace_tokens=b) for i, (item, b) in enumerate(zip(mixed_items[:5], budgets))]
        batches = set()
        for seq in seqs:
            engine.add_request(seq)
        while engine.has_unfinished():
            engine.step()
            if engine.scheduler._decoding[0] is not None:
                batches.add(id(engine.scheduler._decoding[0]))
        return seqs, len(batches)

    plain, _ = run()
    rebases = []
    real_rebase = sched.DecodeBatch._rebase
    monkeypatch.setattr(sched, "_HISTORY_ROWS", 2)
    monkeypatch.setattr(sched, "_REBASE_AT", 4)
    monkeypatch.setattr(sched.DecodeBatch, "_rebase", lambda self: rebases.append(self.steps) or real_rebase(self))
    checked = _check_decode_inputs(engine, monkeypatch)
    rebased, batches = run()
    assert len(rebases) >= 5 and batches <= 2  # rebased often; one batch while anything decoded (two if it emptied once)
    assert checked[0] >= 20  # pure decode steps whose inputs were checked
    for a, b in zip(plain, rebased):
        assert [len(a.trace_ids), a.trace_ids] == [len(b.trace_ids), b.trace_ids]
        assert a.stop_reason == b.stop_reason == "max_tokens"
        assert cosine(a.embedding, b.embedding) >= 0.99999


@pytest.mark.parametrize("steps_ahead", [16, 3])
def test_decode_inputs_worked_out_steps_ahead(make_checkpoint, mixed_items, monkeypatch, steps_ahead):
    """A decode batch works out the inputs of STEPS_AHEAD steps at once. With blocks of 4 tokens one
    window crosses several blocks (the slots past each crossing set when the block is gained), a
    window of 3 rolls over often and out of step with the blocks, and sequences join and leave
    mid-window: every pure decode step's inputs equal their from-scratch values, and traces and
    embeddings equal those of one step at a time (STEPS_AHEAD = 1: the add of one a step that the
    window replaced)."""
    from tte_engine import scheduler as sched
    from tte_engine.random_checkpoint import never_stop

    engine = Engine(never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token")), max_model_len=512, max_num_seqs=3,
                    block_size=4)
    budgets = [30, 12, 25, 7, 18]  # 5 items, 3 at a time: later ones join while others decode

    def run(ahead):
        monkeypatch.setattr(sched, "STEPS_AHEAD", ahead)
        seqs = [engine.make_sequence(item, i, max_trace_tokens=b) for i, (item, b) in enumerate(zip(mixed_items[:5], budgets))]
        engine.run(seqs)
        return seqs

    one_at_a_time = run(1)
    engine.reset_prefix_cache()  # the same work again, so the same bits
    checked = _check_decode_inputs(engine, monkeypatch)
    ahead = run(steps_ahead)
    assert checked[0] >= 20
    assert [len(seq.trace_ids) for seq in ahead] == budgets
    for a, b in zip(one_at_a_time, ahead):
        assert a.trace_ids == b.trace_ids and torch.equal(a.embedding, b.embedding)


def _check_decode_inputs(engine, monkeypatch) -> list[int]:
    """From now on, before every pure decode step, compare the step inputs the decode batch keeps
    step to step (`DecodeBatch.inputs`) with what they are, worked out from scratch: the newest
    token, position index + M-RoPE delta, the cache slot of index in the block table, context
    index + 1, the table row. Returns [steps checked], counted as they run."""
    from tte_engine.runner import Runner

    real, checked = Runner._fill_decode, [0]

    def fill(runner, host, decode, bucket):
        index, bs, steps = decode.index, runner.block_size, decode.steps
        newest = [int(decode.history[steps - 1, k]) if decode.flushed[k] < steps else seq.token_ids[-1] for k, seq in enumerate(decode.seqs)]
        rows = np.array([seq.row for seq in decode.seqs], dtype=np.int64)
        slots = runner.blocks.tables[rows, index // bs].astype(np.int64) * bs + index % bs
        assert decode.inputs.tolist() == [newest, (index + decode.rope_deltas).tolist(), slots.tolist(), (index + 1).tolist(), rows.tolist()]
        assert all(len(seq.block_table) * bs > i for seq, i in zip(decode.seqs, index.tolist()))  # each new token has its block
        checked[0] += 1
        return real(runner, host, decode, bucket)

    monkeypatch.setattr(Runner, "_fill_decode", fill)
    return checked


@pytest.mark.parametrize("free", [8, 3, 0], ids=["free_blocks", "then_evictions", "evictions_only"])
def test_grow_by_one_equals_grow_one_sequence_at_a_time(free):
    """A decode step's block growth in one pass (`BlockManager.grow_by_one`) leaves the block
    manager exactly as `grow` does sequence by sequence: the same blocks in the same order (free
    ones first, then the least recently released cached ones), tables, queued table updates,
    reference counts and reservations."""
    from copy import deepcopy
    from types import SimpleNamespace

    from tte_engine.cache import BlockManager

    bm = BlockManager(num_blocks=24, block_size=4, max_num_seqs=6, max_blocks_per_seq=5)
    seqs = [SimpleNamespace(row=None, block_table=[], reservation=0, num_registered=0) for _ in range(6)]
    for i, seq in enumerate(seqs):
        bm.admit(seq, worst_case_tokens=[8, 20, 4, 12, 16, 20][i])
        bm.grow(seq, [3, 9, 4, 1, 8, 5][i])  # 1-3 blocks each; the third holds no more reservation
    # blocks nobody holds, cached (findable), released in this order; the rest of the free list cut to `free`
    for k, block in enumerate(bm.free_blocks[-6:]):
        bm.free_blocks.remove(block)
        bm.cached[1000 + k], bm.block_hash[block] = block, 1000 + k
        bm.evictable[block] = None
    assert len(bm.free_blocks) == 8
    del bm.free_blocks[: 8 - free]
    bm.take_updates()
    growing = [seqs[i] for i in (4, 0, 2, 5, 1)]  # not in row order
    one_pass, one_by_one = deepcopy((bm, growing)), deepcopy((bm, growing))
    one_pass[0].grow_by_one(one_pass[1])
    for seq in one_by_one[1]:
        one_by_one[0].grow(seq, (len(seq.block_table) + 1) * bm.block_size)
    (a, a_seqs), (b, b_seqs) = one_pass, one_by_one
    assert (a.tables == b.tables).all() and a.take_updates() == b.take_updates()
    assert (a.free_blocks, list(a.evictable), a.cached, a.block_hash, a.ref_count, a.reserved) == \
        (b.free_blocks, list(b.evictable), b.cached, b.block_hash, b.ref_count, b.reserved)
    assert [(s.block_table, s.reservation) for s in a_seqs] == [(s.block_table, s.reservation) for s in b_seqs]
    assert all(len(s.block_table) == len(t.block_table) + 1 for s, t in zip(a_seqs, growing))


@pytest.mark.parametrize("graphs", [True, False], ids=["graph-path", "eager"])
def test_a_failed_step_loses_no_block_table_update(make_checkpoint, mixed_items, monkeypatch, graphs):
    """A step that fails after the runner took the block-table updates (here: its prompt's image
    encoder fails) must not lose them: on a GPU the device copy of the tables would keep stale
    entries for the blocks given in that step, which the retried step reads and writes through.
    The runner's copy is made a real copy here, as on CUDA (on CPU it shares the host array, and
    eager decode steps skip the updates); after the failure it equals the host's, and a caller
    that retries gets the results of a run that never failed (decode steps, eager or the graph
    path, read the runner's copy too: the updates they apply are checked here as well)."""
    from tte_engine.random_checkpoint import never_stop
    from tte_engine.runner import Runner

    path = never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token"))

    def engine():
        e = Engine(path, max_model_len=512, block_size=4, cuda_graphs=graphs)
        runner = e.stages[0].runner
        runner.tables, runner.tables_are_host = runner.tables.clone(), False
        runner.plan_on_host = False  # decode reads the runner's copy, as on a GPU (a CPU engine's plan reads the host's)
        return e

    items = [mixed_items[0], "a late question " * 12]  # the second: a prompt of several blocks
    alone = Engine(path, max_model_len=512, block_size=4).embed(items, max_trace_tokens=12)  # a CPU engine as it is: one table array
    e = engine()
    decoding, late = e.make_sequence(items[0], 0, max_trace_tokens=12), e.make_sequence(items[1], 1, max_trace_tokens=12)
    e.add_request(decoding)
    while e.scheduler._decoding[0] is None:
        e.step()
    e.add_request(late)
    with monkeypatch.context() as patch:
        patch.setattr(Runner, "_encode_images", lambda runner, seqs: (_ for _ in ()).throw(RuntimeError("encoder failed")))
        with pytest.raises(RuntimeError, match="encoder failed"):
            e.step()  # a mixed step: the decoding row and the late prompt's first chunk, its blocks given
    runner, blocks = e.stages[0].runner, e.stages[0].blocks
    assert (runner.tables.numpy() == blocks.tables).all() and not blocks.updates
    while e.has_unfinished():
        e.step()
    for i, seq in enumerate((decoding, late)):
        assert seq.trace_ids == alone.trace_token_ids[i]
        assert cosine(seq.embedding, alone.embeddings[i]) >= 0.99999


def test_an_interrupt_between_giving_and_noting_a_block_gives_it_once(make_checkpoint, mixed_items, monkeypatch):
    """A decode step gives a sequence whose next token starts a block that block, then notes it in
    the decode batch; Ctrl-C between the two must not make the retried step give it a second block
    (the token's k/v would go to one while the table maps its position to the other: the suffix
    read unwritten memory, NaN here)."""
    from tte_engine.random_checkpoint import never_stop
    from tte_engine.scheduler import DecodeBatch

    path = never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token"))
    alone = Engine(path, max_model_len=512, block_size=4).embed(mixed_items[:1], max_trace_tokens=20)
    e = Engine(path, max_model_len=512, block_size=4)
    _poison(e, float("nan"))
    seq = e.make_sequence(mixed_items[0], 0, max_trace_tokens=20)
    e.add_request(seq)
    real, armed = DecodeBatch.gained_blocks, [True]

    def gained_blocks(batch, rows, blocks):
        if armed[0] and len(rows):
            armed[0] = False
            raise KeyboardInterrupt
        return real(batch, rows, blocks)

    monkeypatch.setattr(DecodeBatch, "gained_blocks", gained_blocks)
    interrupted = False
    while e.has_unfinished():
        try:
            e.step()
        except KeyboardInterrupt:
            interrupted = True
    assert interrupted and not armed[0]
    assert seq.trace_ids == alone.trace_token_ids[0] and cosine(seq.embedding, alone.embeddings[0]) >= 0.99999
    assert e.stages[0].blocks.num_free == Engine(path, max_model_len=512, block_size=4).stages[0].blocks.num_free


def test_grow_by_one_changes_nothing_when_it_cannot_grow_them_all():
    """More sequences than free and evictable blocks (reservations make it a scheduler bug): it raises
    before taking any block, so no block is lost."""
    from types import SimpleNamespace

    from tte_engine.cache import BlockManager
    from tte_engine.errors import CapacityError

    bm = BlockManager(num_blocks=4, block_size=4, max_num_seqs=3, max_blocks_per_seq=4)
    seqs = [SimpleNamespace(row=None, block_table=[], reservation=0, num_registered=0) for _ in range(3)]
    for seq in seqs:
        bm.admit(seq, 4)
        bm.grow(seq, 4)
    before = (list(bm.free_blocks), bm.tables.copy(), [list(s.block_table) for s in seqs])
    with pytest.raises(CapacityError, match="scheduler bug"):
        bm.grow_by_one(seqs)  # 3 wanted, 1 free
    assert (bm.free_blocks, [s.block_table for s in seqs]) == (before[0], before[2]) and (bm.tables == before[1]).all()


def test_embed_suffixes_wait_to_be_prefilled_together(make_checkpoint, mixed_items):
    """`suffix_wait_steps`: the suffix of a trace that ended waits at most that many decode steps, so
    traces ending close together have their suffixes prefilled in one step and the steps between
    stay pure decode steps (with CUDA graphs, the ones that replay a graph). Traces and embeddings
    do not change, and a request decoding alone never waits."""
    from tte_engine.random_checkpoint import never_stop
    from tte_engine.runner import Runner

    path = never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token"))
    items = (mixed_items * 3)[:10]
    budgets = [5, 6, 7, 9, 12, 13, 17, 20, 21, 30]  # traces ending at different steps, some close together

    def run(wait: int, these=items):
        engine = Engine(path, max_model_len=512, suffix_wait_steps=wait, cuda_graphs=False)
        steps, ended, done = {"pure": 0, "all": 0}, {}, {}
        seqs = [engine.make_sequence(item, i, max_trace_tokens=b) for i, (item, b) in enumerate(zip(these, budgets))]
        for seq in seqs:
            engine.add_request(seq)
        real_decode, real_end = Runner._run_decode, engine.scheduler._end_trace

        def counted(runner, decode):
            steps["pure"] += 1
            return real_decode(runner, decode)

        def end_trace(seq, *args):
            ended[id(seq)] = engine.scheduler.steps_scheduled
            return real_end(seq, *args)

        engine.scheduler._end_trace = end_trace
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Runner, "_run_decode", counted)
            while engine.has_unfinished():
                for seq in engine.step():
                    done[id(seq)] = engine.scheduler.steps_scheduled
                steps["all"] += 1
        waited = max(done[i] - ended[i] for i in ended)  # steps from the one that ended the trace to the one that pooled
        return seqs, steps, waited

    at_once, steps0, waited0 = run(0)
    waiting, steps8, waited8 = run(8)
    assert [s.trace_ids for s in waiting] == [s.trace_ids for s in at_once] and all(len(s.trace_ids) == b for s, b in zip(waiting, budgets))
    for a, b in zip(waiting, at_once):
        assert cosine(a.embedding, b.embedding) >= 0.99999
    mixed0, mixed8 = steps0["all"] - steps0["pure"], steps8["all"] - steps8["pure"]
    assert waited0 == 1 and 1 < waited8 <= 9  # the next step; at most 8 decode steps between
    assert mixed8 < mixed0 - 2, (steps0, steps8)
    alone0, alone8 = run(0, items[:1])[1], run(8, items[:1])[1]
    assert alone0 == alone8  # nothing else decodes: the suffix goes at once


def test_suffix_wait_steps_is_checked():
    from tte_engine.config import EngineConfig

    for bad in (-1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="suffix_wait_steps"):
            EngineConfig(suffix_wait_steps=bad).check()
    EngineConfig(suffix_wait_steps=0).check()
    EngineConfig(suffix_wait_steps=None).check()


def test_suffixes_wait_by_default_only_with_cuda_graphs(make_checkpoint):
    from tte_engine.scheduler import SUFFIX_WAIT_WITH_GRAPHS

    path = make_checkpoint("syncs", think_max_tokens=12, head="last_token")
    assert Engine(path, max_model_len=512).scheduler.suffix_wait_steps == 0  # eager (CPU): no wait
    assert Engine(path, max_model_len=512, cuda_graphs=True).scheduler.suffix_wait_steps == SUFFIX_WAIT_WITH_GRAPHS
    assert Engine(path, max_model_len=512, cuda_graphs=True, suffix_wait_steps=3).scheduler.suffix_wait_steps == 3


@pytest.mark.parametrize("abort_other", [False, True])
def test_a_step_that_fails_while_scheduling_loses_no_prefill_work(make_checkpoint, mixed_items, monkeypatch, abort_other):
    """Scheduling a mixed step raises (here: Ctrl-C while its decoding rows are prepared) after it
    took an ended trace's suffix: a caller that goes on stepping gets that suffix prefilled at the
    next step, also when the other sequence is aborted first (nothing decodes then), and the
    results are those of a run that never failed."""
    from tte_engine.random_checkpoint import never_stop
    from tte_engine.scheduler import Scheduler

    engine = Engine(never_stop(make_checkpoint("long_trace", think_max_tokens=80, head="last_token")), max_model_len=512, suffix_wait_steps=0)
    alone = engine.embed(mixed_items[:1], max_trace_tokens=3)
    ended, other = engine.make_sequence(mixed_items[0], 0, max_trace_tokens=3), engine.make_sequence(mixed_items[1], 1, max_trace_tokens=20)
    engine.add_request(ended)
    engine.add_request(other)
    real, armed = Scheduler._prepare_decode, [True]

    def prepare_decode(scheduler, step):
        if armed[0] and step.num_decode < len(step.seqs):  # the mixed step that takes the suffix
            armed[0] = False
            raise KeyboardInterrupt("Ctrl-C while scheduling")
        return real(scheduler, step)

    monkeypatch.setattr(Scheduler, "_prepare_decode", prepare_decode)
    with pytest.raises(KeyboardInterrupt):
        while True:
            engine.step()
    assert ended.needs_prefill
    if abort_other:
        assert engine.abort(other)
    engine.step()
    assert ended.embedding is not None and ended.trace_ids == alone.trace_token_ids[0]
    assert cosine(ended.embedding, alone.embeddings[0]) >= 0.99999
    while engine.has_unfinished():
        engine.step()
