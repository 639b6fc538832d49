"""The export pipeline behind `tte-export`: resolve, load, calibrate, write each target, report.

Everything is written into a hidden temporary directory next to the output and renamed into
place only at the very end, so a failed or interrupted export never leaves a directory that
`Engine()` would load (an engine directory is recognized by its `engine.json`, which is itself
written last within the temporary directory).
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import fingerprint, resolve_checkpoint
from ..config import MAX_POSITIONS, TTE_CONFIG_NAME, ModelConfig, read_json_object
from ..engine import Engine
from ..engine_dir import ENGINE_FILE, is_engine_dir
from ..errors import CheckpointError, ExportError
from ..inputs import as_query
from ..model.fp8 import decoder_linear_names, scaled_mm_supported
from ..random_checkpoint import ARCH_SPECS, SPECS, ensure_random_alias, ensure_random_checkpoint, random_checkpoint_bytes, tte_home
from .calibration import accuracy_report, calibration_items, run_calibration
from .native import copy_aux_files, exported_tte_config, write_engine_dir

logger = logging.getLogger("tte_engine")

TARGETS = ("native", "trtllm", "trtllm-legacy", "hf", "onnx", "all")
ALL_TARGETS = {"native", "trtllm", "hf", "onnx"}  # `all`: trtllm-legacy (TensorRT-LLM 1.x engines) is opt-in
CALIBRATION_TRACE_TOKENS = 64  # trace budget of the calibration run (the report's trace agreement covers this many)
DEFAULT_MAX_INPUT_LEN = 2048  # TensorRT-LLM targets: the longest prompt when --max-input-len is not given
# the integer options' ranges, [least, most] (tte-export's parser uses them too); beyond them a value is a typo, not a setting
INT_LIMITS = {"calibration": (0, 1024), "max_batch_size": (1, 65536), "max_input_len": (1, MAX_POSITIONS), "seed": (0, 2**32 - 1)}


@dataclass
class ExportOptions:
    checkpoint: str
    out: Path | None = None
    target: str = "native"
    fp8: bool = False
    fp8_vision: bool = False
    dtype: str = "auto"  # stored dtype of the float weights: auto = the checkpoint's (bf16 for hub models)
    random_init: bool = False
    calibration: int = 8
    force: bool = False
    device: str = "cpu"
    trtllm_fp8: str = "per-tensor"  # or "per-channel" (= the native scheme)
    kv_cache_fp8: bool = False
    max_batch_size: int = 32
    max_input_len: int | None = None  # None: DEFAULT_MAX_INPUT_LEN, or less where the model's context is shorter
    seed: int = 0


LONG_STEP_S = 10  # steps that took longer say so when they end


@dataclass
class Reporter:
    """What the pipeline tells its caller: a status line per step, and tqdm bars when `bars`."""

    say: Callable[[str], None] = lambda _msg: None
    bars: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def bar(self, total: int, desc: str, unit: str = "it", **kw):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.bars, leave=False, **kw)

    def step(self, name: str):
        reporter = self

        class _Timer:
            def __enter__(self):
                reporter.say(f"{name} ...")
                self.t = time.perf_counter()

            def __exit__(self, exc_type, *exc):
                reporter.timings[name] = round(time.perf_counter() - self.t, 3)
                if exc_type is None and reporter.timings[name] >= LONG_STEP_S:  # a log without bars still shows progress
                    reporter.say(f"{name} took {reporter.timings[name]:.0f}s")

        return _Timer()


# ---------------------------------------------------------------------------------------- checks
def validate(opts: ExportOptions) -> set[str]:
    """Option mixes that cannot work, refused before any work; returns the set of targets."""
    if opts.target not in TARGETS:
        raise ExportError(f"unknown target {opts.target!r}; choose one of {', '.join(TARGETS)}")
    targets = set(ALL_TARGETS) if opts.target == "all" else {opts.target}
    if opts.fp8_vision and not opts.fp8:
        raise ExportError("--fp8-vision needs --fp8")
    if opts.fp8 and targets == {"onnx"}:
        raise ExportError("--fp8 does not apply to --target onnx (its graphs are float32); "
                          "drop --fp8, or export an FP8 target (native, trtllm, trtllm-legacy, hf, or all)")
    if opts.trtllm_fp8 not in ("per-tensor", "per-channel"):
        raise ExportError(f"--trtllm-fp8 must be per-tensor or per-channel, got {opts.trtllm_fp8!r}")
    for name, (least, most) in INT_LIMITS.items():
        value = getattr(opts, name)
        if name == "max_input_len" and value is None:  # fitted to the model once it is loaded
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise ExportError(f"--{name.replace('_', '-')} must be an integer from {least} to {most}, got {value!r}")
    if str(opts.device).startswith("cuda") and not torch.cuda.is_available():  # else the load's ValueError, blamed on the checkpoint
        raise ExportError(f"--device {opts.device}: this torch build ({torch.__version__}) sees no CUDA device; use --device cpu")
    if opts.seed and not (opts.random_init and opts.checkpoint in ARCH_SPECS):
        raise ExportError(f"--seed applies to --random-init with an architecture alias ({', '.join(sorted(ARCH_SPECS))}) only")
    trt = targets & {"trtllm", "trtllm-legacy"}
    needs_stats = bool(trt) and ((opts.fp8 and opts.trtllm_fp8 == "per-tensor") or opts.kv_cache_fp8)
    if needs_stats and opts.calibration == 0:
        raise ExportError("per-tensor FP8 and --kv-cache-fp8 for TensorRT-LLM need activation statistics: use --calibration N > 0")
    if opts.kv_cache_fp8 and "trtllm-legacy" not in targets:
        raise ExportError("--kv-cache-fp8 applies to the legacy TensorRT-LLM target only (--target trtllm-legacy)")
    if "trtllm-legacy" in targets and opts.fp8 and opts.trtllm_fp8 == "per-channel":
        raise ExportError("--trtllm-fp8 per-channel cannot build for Qwen2-VL on TensorRT-LLM 1.x (its Fp8RowwiseAttention takes no "
                          "M-RoPE inputs): use --trtllm-fp8 per-tensor for trtllm-legacy, or --target trtllm (PyTorch backend)")
    if opts.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ExportError(f"--dtype must be auto, bfloat16, float16 or float32, got {opts.dtype!r}")
    if "onnx" in targets and not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime")):
        raise ExportError("the onnx target needs onnx and onnxruntime: pip install onnx onnxruntime (the [export] extra)")
    if opts.fp8 and "hf" in targets and not importlib.util.find_spec("compressed_tensors"):
        raise ExportError("--target hf with --fp8 writes the compressed-tensors layout: pip install compressed-tensors (the [export] extra)")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {opts.device}: CUDA is not available here")
    return targets


REPORT_FILE = "export_report.json"  # the summary, at the root of every export: what --force may replace


def default_out(name: str, fp8: bool) -> Path:
    base = Path(name).name if Path(name).is_dir() else name.replace("/", "--")
    return tte_home() / "engines" / (base + ("-fp8" if fp8 else ""))


def check_not_inside(source: Path, out: Path) -> None:
    """Refuse an output directory that holds the source checkpoint (replacing it would delete the
    source), or lies inside it (the export would become part of the checkpoint and change its
    fingerprint, so its cached results would no longer match)."""
    src, dst = source.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise ExportError(f"the checkpoint {source} lies inside the output directory {out}: choose another --out")
    if src in dst.parents:
        raise ExportError(f"the output directory {out} lies inside the checkpoint {source}: choose another --out")


def prepare_output(out: Path, force: bool) -> Path:
    """Refuse a taken output, make sure its parent is writable; returns the temporary directory to fill."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    cwd, resolved = Path.cwd().resolve(), out.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ExportError(f"the output directory {out} holds the current directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"output directory {out} exists and is not empty (pass --force to replace an earlier export)")
        if not (out / REPORT_FILE).is_file():  # --force replaces what tte-export wrote, never a folder of other files
            raise ExportError(f"output directory {out} is not empty and holds no earlier export (no {REPORT_FILE}): "
                              "--force replaces only an earlier tte-export output; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write the output directory {out}: {exc.strerror or exc}") from exc
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Move the finished export into place (replacing an old one only now, when the new one is complete)."""
    out = out.expanduser().absolute()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # put the previous export back: a failed export must not cost the old one
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- source
def resolve_source(opts: ExportOptions, reporter: Reporter) -> tuple[Path, bool]:
    """(checkpoint directory, built with random weights?) for --checkpoint / --random-init."""
    name = opts.checkpoint
    if not opts.random_init:
        try:
            path = resolve_checkpoint(name)
        except CheckpointError as exc:
            hint = f"; or pass --random-init to export {name}'s architecture with random weights" if name in ARCH_SPECS else ""
            raise CheckpointError(f"{exc}{hint}") from None
        if is_engine_dir(path):
            raise ExportError(f"{path} is already an exported engine directory: export from the checkpoint it came from")
        return path, name in SPECS
    if name in SPECS:
        return ensure_random_alias(name), True
    if name not in ARCH_SPECS:
        known = ", ".join(sorted({*SPECS, *ARCH_SPECS}))
        raise ExportError(f"--random-init needs an architecture alias ({known}), got {name!r}")
    path = tte_home() / "models" / "random" / f"{name}-seed{opts.seed}"
    if not (path / TTE_CONFIG_NAME).exists():
        spec = ARCH_SPECS[name]
        model_bytes, head_bytes = random_checkpoint_bytes(spec, 2)
        shards = max(1, math.ceil(model_bytes / (2 << 30)))
        reporter.say(f"building {name} with random weights (seed {opts.seed}, bfloat16, ~{(model_bytes + head_bytes) / 2**30:.1f} GiB) in {path}")
        ensure_random_checkpoint(path, spec, seed=opts.seed, dtype="bfloat16", shards=shards)
    return path, True


def _export_dtype(opts: ExportOptions, source: Path) -> torch.dtype:
    if opts.dtype != "auto":
        return getattr(torch, opts.dtype)
    stored = ModelConfig.from_hf(read_json_object(source / "config.json", required=True)).torch_dtype
    return getattr(torch, stored) if stored in ("float32", "bfloat16", "float16") else torch.bfloat16


def _files(root: Path) -> list[dict[str, Any]]:
    return [{"path": str(f.relative_to(root)), "bytes": f.stat().st_size} for f in sorted(root.rglob("*")) if f.is_file()]


# ---------------------------------------------------------------------------------------- run
def run_export(opts: ExportOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the whole export; returns the summary (also written to export_report.json in the output)."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    targets = validate(opts)
    with reporter.step("resolve"):
        source, random_weights = resolve_source(opts, reporter)
    out = (opts.out or default_out(opts.checkpoint, opts.fp8)).expanduser().absolute()
    check_not_inside(source, out)
    tmp = None
    try:
        with _signals_deferred(reporter, then="raise"):  # the temp dir exists only once `tmp` names it
            tmp = prepare_output(out, opts.force)
        summary = _export_into(tmp, out, source, random_weights, targets, opts, reporter)
        summary["seconds"] = dict(reporter.timings, total=round(time.perf_counter() - start, 3))
        summary["files"] = _files(tmp)
        summary["total_bytes"] = sum(f["bytes"] for f in summary["files"])
        (tmp / REPORT_FILE).write_text(json.dumps(summary, indent=2))
        with _signals_deferred(reporter, then="finish"):  # half a commit could hide the old export (--force)
            commit_output(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


@contextmanager
def _signals_deferred(reporter: Reporter, then: str):
    """SIGINT / SIGTERM wait until the block is done. then="raise": delivered after it (to the handler
    in place); "finish": the work is complete by then, so the signal is reported and dropped. Only
    the main thread can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught and then == "raise":
        signal.raise_signal(caught[0])
    elif caught:
        reporter.say(f"{signal.Signals(caught[0]).name} arrived while the export was moved into place; it was finished first")


def _export_into(tmp: Path, out: Path, source: Path, random_weights: bool, targets: set[str], opts: ExportOptions, rep: Reporter) -> dict[str, Any]:
    on_cpu = torch.device(opts.device).type == "cpu"
    dtype = _export_dtype(opts, source)
    items = calibration_items(opts.calibration)
    # FP8 exports are calibrated: the native accuracy report, the per-tensor variant's accuracy and its static scales
    calibrating = bool(items) and ((opts.fp8 and bool(targets - {"onnx"})) or opts.kv_cache_fp8)
    # CPU calibration and the ONNX graphs run in float32; otherwise the model is held in the export dtype
    load_dtype = torch.float32 if on_cpu and (calibrating or "onnx" in targets) else dtype
    with rep.step("load"):
        # plain weights: the exporters read, quantize and trace them (prepacked ones are a CPU runtime layout)
        try:
            ref = Engine(source, device=opts.device, dtype=str(load_dtype).replace("torch.", ""), prepack_weights=False)
        except ValueError as exc:  # settings of the checkpoint that cannot work (an embed suffix longer than the model's context)
            raise CheckpointError(f"{source}: {exc}") from None
    check_prompt_room(ref)
    max_input_len = trtllm_max_input_len(ref, opts.max_input_len) if targets & {"trtllm", "trtllm-legacy"} else None
    model = ref.stages[-1].runner.model
    runtime_dtype = str(ref.dtype).replace("torch.", "")
    summary: dict[str, Any] = {
        "checkpoint": opts.checkpoint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "random_init": random_weights,
        "out": str(out),
        "targets": sorted(targets),
        "dtype": str(dtype).replace("torch.", ""),
        "fp8": opts.fp8,
        "options": options_dict(opts),
        "accuracy": None,
    }
    source_info = {"name": opts.checkpoint, "checkpoint": str(source), "fingerprint": fingerprint(source), "random_init": random_weights}

    trace_tokens = min(ref.tte.think.max_tokens, CALIBRATION_TRACE_TOKENS)
    stats = None
    ref_run = None
    if calibrating:
        from .trtllm import ActivationStats

        stats = ActivationStats(model)
        with rep.step("calibrate (reference)"):
            ref_run = run_calibration(ref, items, trace_tokens, progress=rep.bars)
        stats.close()

    fp8_modules = decoder_linear_names(model, include_vision=opts.fp8_vision) if opts.fp8 else []
    if "native" in targets:
        with rep.step("write native engine"):
            total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            with rep.bar(total, "weights", unit="B", unit_scale=True) as bar:
                spec = write_engine_dir(ref, tmp, dtype=dtype, fp8_modules=fp8_modules, source=source_info, progress=bar.update)
        summary["native"] = {"dir": str(out), "quantized_modules": len(fp8_modules)}

    if "hf" in targets:
        from .hf_checkpoint import write_hf_checkpoint

        with rep.step("write Hugging Face checkpoint" + (" (FP8, compressed-tensors)" if opts.fp8 else "")):
            info = write_hf_checkpoint(ref, tmp / "hf", dtype=dtype, fp8="compressed-tensors" if opts.fp8 else None)
        summary["hf"] = dict(info, dir=str(out / "hf"))

    if "trtllm" in targets:
        from .hf_checkpoint import MODELOPT_ALGOS, write_hf_checkpoint
        from .trtllm_plan import VARIANT_ARCHITECTURE, launch_config, write_launch_config

        algo = MODELOPT_ALGOS[opts.trtllm_fp8] if opts.fp8 else None
        with rep.step("write TensorRT-LLM (PyTorch backend) checkpoint"):
            info = write_hf_checkpoint(ref, tmp / "trtllm", dtype=dtype, fp8="modelopt" if opts.fp8 else None,
                                       modelopt_algo=algo or "FP8_PER_CHANNEL_PER_TOKEN", input_amax=stats.inputs if stats else None)
            cfg_path = tmp / "trtllm" / "config.json"
            hf_cfg = json.loads(cfg_path.read_text())
            hf_cfg.update(architectures=[VARIANT_ARCHITECTURE], tte_source_layer=model.head_source_layer)
            cfg_path.write_text(json.dumps(hf_cfg, indent=2))
            max_seq = context_budget(ref, max_input_len) + 1
            write_launch_config(tmp / "trtllm", launch_config(ref, max_batch_size=opts.max_batch_size, max_seq_len=max_seq,
                                                             fp8=algo, kv_cache_fp8=False))
            (tmp / "trtllm" / "README.md").write_text(TRTLLM_TORCH_README)
        summary["trtllm"] = dict(info, dir=str(out / "trtllm"), backend="pytorch", quant_algo=algo, max_seq_len=max_seq,
                                 runtime="never run here (TensorRT-LLM is not installable on this machine)")

    per_tensor_dir = None
    spec_head_mhsa = ref.tte.head.type == "mhsa"
    if opts.fp8 and ref_run is not None and stats is not None:
        from .hf_checkpoint import write_hf_checkpoint

        # the per-tensor variant (static activation scales), measured below like the native one
        per_tensor_dir = tmp / ".per-tensor-check"
        write_hf_checkpoint(ref, per_tensor_dir, dtype=dtype, fp8="modelopt", modelopt_algo="FP8", input_amax=stats.inputs)

    if "trtllm-legacy" in targets:
        from .trtllm import build_command, write_build_files, write_checkpoint

        legacy = tmp / "trtllm-legacy"
        with rep.step("write TensorRT-LLM 1.x checkpoint"):
            fp8_mode = opts.trtllm_fp8 if opts.fp8 else None
            write_checkpoint(model, legacy, dtype=dtype, fp8=fp8_mode, stats=stats, kv_fp8=opts.kv_cache_fp8)
            (legacy / "tokenizer").mkdir()  # the HF config.json must not clobber TensorRT-LLM's
            copy_aux_files(source, legacy / "tokenizer")
            (legacy / "tokenizer" / TTE_CONFIG_NAME).write_text(json.dumps(exported_tte_config(ref), indent=2))
            merge = ref.model_cfg.vision.spatial_merge_size
            max_image_tokens = ref.image_cfg.max_pixels // (ref.image_cfg.patch_size * merge) ** 2
            context = context_budget(ref, max_input_len)
            cmd = build_command(max_batch_size=opts.max_batch_size, max_input_len=context, max_seq_len=context + 1,
                                max_multimodal_len=opts.max_batch_size * max_image_tokens, kv_fp8=opts.kv_cache_fp8)
            write_build_files(legacy, cmd, model_cfg=ref.model_cfg, tte=ref.tte, fp8=fp8_mode, kv_fp8=opts.kv_cache_fp8, head=ref.tte.head.type)
        summary["trtllm-legacy"] = {"dir": str(out / "trtllm-legacy"), "quant_algo": fp8_mode and "FP8",
                                    "kv_cache_quant_algo": "FP8" if opts.kv_cache_fp8 else None, "max_input_len": context,
                                    "built": False, "next": "bash build.sh on a machine with TensorRT-LLM 1.x (not run by tte-export)"}

    onnx_engine = None
    if "onnx" in targets:
        onnx_engine = ref if (on_cpu and ref.dtype == torch.float32) else Engine(source, device="cpu", dtype="float32", prepack_weights=False)

    if "onnx" in targets:
        from .onnx_export import export_onnx

        onnx_dir = tmp / "onnx"
        with rep.step("export ONNX graphs"):
            graphs = export_onnx(onnx_engine, onnx_dir)
            copy_aux_files(source, onnx_dir)
            (onnx_dir / TTE_CONFIG_NAME).write_text(json.dumps(exported_tte_config(ref), indent=2))
        summary["onnx"] = {"dir": str(out / "onnx"), "opset": graphs["opset"],
                           "max_abs_error_vs_torch": {k: v["max_abs_error_vs_torch"] for k, v in graphs["graphs"].items()}}

    if opts.fp8 and ref_run is not None:
        del ref, model, onnx_engine  # the reference results are in ref_run: free its weights before loading the FP8 engines
        gc.collect()
        tensor_cores = runtime_dtype == "bfloat16" and scaled_mm_supported(torch.device(opts.device))
        if "native" in targets:
            with rep.step("calibrate (fp8)"):
                test = Engine(tmp, device=opts.device, dtype=runtime_dtype)
                report = accuracy_report(ref_run, run_calibration(test, items, trace_tokens, progress=rep.bars, reference=ref_run))
                del test
            report.update(reference=f"{runtime_dtype} weights on {opts.device}", trace_tokens_max=trace_tokens,
                          activations="FP8 tensor cores, per-token scales" if tensor_cores else f"per-token E4M3, fake-quantized ({opts.device})")
            spec["accuracy"] = summary["accuracy"] = report
            (tmp / ENGINE_FILE).write_text(json.dumps(spec, indent=2))
        if per_tensor_dir is not None:
            with rep.step("calibrate (fp8 per-tensor)"):
                test = Engine(per_tensor_dir, device=opts.device, dtype=runtime_dtype)
                pt = accuracy_report(ref_run, run_calibration(test, items, trace_tokens, progress=rep.bars, reference=ref_run))
                del test
            pt.update(reference=f"{runtime_dtype} weights on {opts.device}", trace_tokens_max=trace_tokens,
                      activations="static per-tensor E4M3 (calibrated amax / 448), fake-quantized",
                      weights="per-tensor E4M3 (ModelOpt FP8 / TensorRT-LLM quant_algo FP8)",
                      head="the mhsa head stays float in Hugging Face-format checkpoints" if spec_head_mhsa else None)
            summary["accuracy_per_tensor"] = pt
            shutil.rmtree(per_tensor_dir)
    elif per_tensor_dir is not None:
        shutil.rmtree(per_tensor_dir)
    if opts.fp8:  # where FP8 stops, said in the summary and the report, not only in the docs
        notes = summary.setdefault("notes", [])
        if spec_head_mhsa and {"hf", "trtllm"} & set(targets):
            notes.append("hf/, trtllm/: the mhsa head's weight file stays float (FP8 covers the decoder there); their embeddings "
                         "differ from the native FP8 engine's by the head's quantization")
        if "onnx" in targets:
            notes.append("onnx/: float32 graphs (FP8 is not exported to ONNX; see onnx/README.md)")
    return summary


def check_prompt_room(engine) -> None:
    """Refuse an export no item could run on, before anything is written: the shortest prompt (a
    one-word text with the default instruction), the think end and the embed suffix longer than the
    model's context (the native runtime shortens a trace to what the context leaves, so the trace
    budget is not counted). Raises CheckpointError (exit 2: a configuration problem)."""
    limit, tail = engine.max_model_len, engine.prompts.closing_tokens
    shortest = _shortest_prompt(engine)
    if shortest + tail > limit:
        raise CheckpointError(f"{engine.prompts.tte_source}: the default instruction leaves no room: a one-word text's prompt takes "
                              f"{shortest} tokens, with the think end and embed suffix ({tail}) more than the model's {limit} "
                              "(max_position_embeddings); shorten instructions.default")


def trtllm_max_input_len(engine, given: int | None) -> int:
    """The TensorRT-LLM targets' longest prompt: `given` (--max-input-len), or DEFAULT_MAX_INPUT_LEN
    lowered to what the model's context leaves after the trace budget, the think end, the embed
    suffix and the end token (a TensorRT-LLM engine is sized for the whole budget). Raises
    ExportError for a `given` shorter than the shortest prompt or whose context does not fit the
    model, CheckpointError where not even the shortest prompt fits beside the budget (exit 2)."""
    config, limit, tail, budget = engine.prompts.tte_source, engine.max_model_len, engine.prompts.closing_tokens, engine.tte.think.max_tokens
    shortest, room = _shortest_prompt(engine), limit - context_budget(engine, 0) - 1
    if given is None:
        if shortest > room:
            raise CheckpointError(f"{config}: for TensorRT-LLM the model's context of {limit} tokens leaves {room} for a prompt after the "
                                  f"trace budget ({budget}), the think end and embed suffix ({tail}) and the end token; the shortest "
                                  f"prompt takes {shortest}: lower think.max_tokens or shorten embed_suffix")
        return min(DEFAULT_MAX_INPUT_LEN, room)
    if shortest > given:
        raise ExportError(f"--max-input-len {given} holds no prompt: the shortest one (a one-word text with the default "
                          f"instruction of {config}) takes {shortest} tokens")
    if given > room:
        raise ExportError(f"--max-input-len {given}: with the trace budget ({budget}), the think end and embed suffix ({tail}) and the "
                          f"end token a context takes {context_budget(engine, given) + 1} tokens, more than the model's {limit} "
                          f"(max_position_embeddings); give --max-input-len {room} at the most, or shorten embed_suffix / "
                          f"think.max_tokens in {config}")
    return given


def _shortest_prompt(engine) -> int:
    """Tokens of the shortest prompt an item can have: a one-word text with the default instruction, thinking."""
    return len(engine.prompts.build(as_query("a", 0), 0, think=True).token_ids)


def context_budget(engine, max_prompt: int) -> int:
    """Longest context a TensorRT-LLM engine must take: prompt + trace budget + think-end + embed suffix."""
    return max_prompt + engine.tte.think.max_tokens + engine.prompts.closing_tokens


TRTLLM_TORCH_README = """# TensorRT-LLM (PyTorch backend) export, written by tte-export

This directory is a Hugging Face Qwen2-VL checkpoint (config.json names the TTE model variant in
`architectures`; transformers still reads it as `qwen2_vl`), FP8 in ModelOpt's layout when
exported with `--fp8` (`hf_quant_config.json`), plus `tte_config.json`, the mhsa head's weights
when the model has one, and `tte_trtllm.json` (the launch configuration).

Run it where TensorRT-LLM is installed (a GPU machine):

    from tte_engine.export.trtllm_runtime import TrtllmTTE
    tte = TrtllmTTE("path/to/this/dir")
    vectors = tte.embed(["a cat on a chair", {"text": "what is this?", "image": "cat.jpg"}])

or check it against tte_engine: `python -m tte_engine.export.trtllm_runtime path/to/this/dir`.

One request per item generates the trace and pools from the same KV cache: a per-request logits
processor applies tte_engine's stop rules, forces the embed tail (think-end if missing, then the
suffix) and a sentinel end token; the model variant returns the final-norm state of each step
(`tte_pooled`) and, for the mhsa head, the layer L-K stream (`tte_source`) as additional model
outputs. NEVER RUN: written against TensorRT-LLM's source (see tte_engine/export/trtllm_runtime.py
for the files read); the request plan, weight layout and output contract are tested on CPU.
"""


def options_dict(opts: ExportOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
