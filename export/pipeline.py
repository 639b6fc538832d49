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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import fingerprint, resolve_checkpoint
from ..config import TTE_CONFIG_NAME, ModelConfig
from ..engine import Engine
from ..engine_dir import ENGINE_FILE, is_engine_dir
from ..errors import CheckpointError, ExportError
from ..model.fp8 import decoder_linear_names, scaled_mm_supported
from ..random_checkpoint import ARCH_SPECS, SPECS, ensure_random_alias, ensure_random_checkpoint, random_checkpoint_bytes, tte_home
from .calibration import accuracy_report, calibration_items, run_calibration
from .native import copy_aux_files, write_engine_dir

logger = logging.getLogger("tte_engine")

TARGETS = ("native", "trtllm", "onnx", "all")
CALIBRATION_TRACE_TOKENS = 64  # trace budget of the calibration run (the report's trace agreement covers this many)


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
    max_input_len: int = 2048
    seed: int = 0


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

            def __exit__(self, *exc):
                reporter.timings[name] = round(time.perf_counter() - self.t, 3)

        return _Timer()


# ---------------------------------------------------------------------------------------- checks
def validate(opts: ExportOptions) -> set[str]:
    """Option mixes that cannot work, refused before any work; returns the set of targets."""
    if opts.target not in TARGETS:
        raise ExportError(f"unknown target {opts.target!r}; choose one of {', '.join(TARGETS)}")
    targets = {"native", "trtllm", "onnx"} if opts.target == "all" else {opts.target}
    if opts.fp8_vision and not opts.fp8:
        raise ExportError("--fp8-vision needs --fp8")
    if opts.trtllm_fp8 not in ("per-tensor", "per-channel"):
        raise ExportError(f"--trtllm-fp8 must be per-tensor or per-channel, got {opts.trtllm_fp8!r}")
    if opts.calibration < 0:
        raise ExportError("--calibration must be >= 0")
    needs_stats = "trtllm" in targets and ((opts.fp8 and opts.trtllm_fp8 == "per-tensor") or opts.kv_cache_fp8)
    if needs_stats and opts.calibration == 0:
        raise ExportError("per-tensor FP8 and --kv-cache-fp8 for TensorRT-LLM need activation statistics: use --calibration N > 0")
    if opts.kv_cache_fp8 and "trtllm" not in targets:
        raise ExportError("--kv-cache-fp8 applies to the TensorRT-LLM target only (--target trtllm or all)")
    if opts.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ExportError(f"--dtype must be auto, bfloat16, float16 or float32, got {opts.dtype!r}")
    if targets & {"trtllm", "onnx"} and not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime")):
        raise ExportError("the trtllm and onnx targets need onnx and onnxruntime: pip install 'tte-engine[export]'")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {opts.device}: CUDA is not available here")
    return targets


def default_out(name: str, fp8: bool) -> Path:
    base = Path(name).name if Path(name).is_dir() else name.replace("/", "--")
    return tte_home() / "engines" / (base + ("-fp8" if fp8 else ""))


def check_not_inside(source: Path, out: Path) -> None:
    """Refuse an output directory that holds the source checkpoint (replacing it would delete the source)."""
    src, dst = source.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise ExportError(f"the checkpoint {source} lies inside the output directory {out}: choose another --out")


def prepare_output(out: Path, force: bool) -> Path:
    """Refuse a taken output, make sure its parent is writable; returns the temporary directory to fill."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} exists and is not empty (pass --force to replace it)")
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
    try:
        stored = ModelConfig.from_hf(json.loads((source / "config.json").read_text())).torch_dtype
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {source / 'config.json'}: {exc}") from exc
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
    tmp = prepare_output(out, opts.force)
    try:
        summary = _export_into(tmp, out, source, random_weights, targets, opts, reporter)
        summary["seconds"] = dict(reporter.timings, total=round(time.perf_counter() - start, 3))
        summary["files"] = _files(tmp)
        summary["total_bytes"] = sum(f["bytes"] for f in summary["files"])
        (tmp / "export_report.json").write_text(json.dumps(summary, indent=2))
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _export_into(tmp: Path, out: Path, source: Path, random_weights: bool, targets: set[str], opts: ExportOptions, rep: Reporter) -> dict[str, Any]:
    on_cpu = torch.device(opts.device).type == "cpu"
    dtype = _export_dtype(opts, source)
    items = calibration_items(opts.calibration)
    needs_stats = "trtllm" in targets and ((opts.fp8 and opts.trtllm_fp8 == "per-tensor") or opts.kv_cache_fp8)
    calibrating = bool(items) and (needs_stats or (opts.fp8 and "native" in targets))
    # CPU calibration and the ONNX graphs run in float32; otherwise the model is held in the export dtype
    load_dtype = torch.float32 if on_cpu and (calibrating or targets & {"trtllm", "onnx"}) else dtype
    with rep.step("load"):
        ref = Engine(source, device=opts.device, dtype=str(load_dtype).replace("torch.", ""))
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

        stats = ActivationStats(model) if needs_stats else None
        with rep.step("calibrate (reference)"):
            ref_run = run_calibration(ref, items, trace_tokens, progress=rep.bars)
        if stats:
            stats.close()

    fp8_modules = decoder_linear_names(model, include_vision=opts.fp8_vision) if opts.fp8 else []
    if "native" in targets:
        with rep.step("write native engine"):
            total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            with rep.bar(total, "weights", unit="B", unit_scale=True) as bar:
                spec = write_engine_dir(ref, tmp, dtype=dtype, fp8_modules=fp8_modules, source=source_info, progress=bar.update)
        summary["native"] = {"dir": str(out), "quantized_modules": len(fp8_modules)}

    onnx_engine = None
    if targets & {"trtllm", "onnx"}:
        onnx_engine = ref if (on_cpu and ref.dtype == torch.float32) else Engine(source, device="cpu", dtype="float32")

    if "trtllm" in targets:
        from .onnx_export import export_onnx
        from .trtllm import build_command, try_build, write_build_files, write_checkpoint

        trt = tmp / "trtllm"
        with rep.step("write TensorRT-LLM checkpoint"):
            fp8_mode = opts.trtllm_fp8 if opts.fp8 else None
            write_checkpoint(model, trt, dtype=dtype, fp8=fp8_mode, stats=stats, kv_fp8=opts.kv_cache_fp8)
            (trt / "tokenizer").mkdir()  # the HF config.json must not clobber TensorRT-LLM's
            copy_aux_files(source, trt / "tokenizer")
            (trt / "tokenizer" / TTE_CONFIG_NAME).write_text(json.dumps(ref.tte.to_dict(), indent=2))
        with rep.step("export vision tower / head to ONNX (TensorRT-LLM)"):
            graphs = export_onnx(onnx_engine, trt, graphs=("vision", "head"))
        merge = ref.model_cfg.vision.spatial_merge_size
        max_image_tokens = ref.image_cfg.max_pixels // (ref.image_cfg.patch_size * merge) ** 2
        max_seq = opts.max_input_len + ref.tte.think.max_tokens + 16
        cmd = build_command(max_batch_size=opts.max_batch_size, max_input_len=opts.max_input_len, max_seq_len=max_seq,
                            max_multimodal_len=opts.max_batch_size * max_image_tokens, kv_fp8=opts.kv_cache_fp8)
        write_build_files(trt, cmd, model_cfg=ref.model_cfg, tte=ref.tte, fp8=fp8_mode, kv_fp8=opts.kv_cache_fp8, head=ref.tte.head.type)
        with rep.step("trtllm-build"):
            build = try_build(trt)
        summary["trtllm"] = {"dir": str(out / "trtllm"), "quant_algo": fp8_mode and {"per-tensor": "FP8", "per-channel": "FP8_PER_CHANNEL_PER_TOKEN"}[fp8_mode],
                             "kv_cache_quant_algo": "FP8" if opts.kv_cache_fp8 else None, "build": build,
                             "onnx_max_abs_error": {k: v["max_abs_error_vs_torch"] for k, v in graphs["graphs"].items()}}

    if "onnx" in targets:
        from .onnx_export import export_onnx

        onnx_dir = tmp / "onnx"
        with rep.step("export ONNX graphs"):
            graphs = export_onnx(onnx_engine, onnx_dir)
            copy_aux_files(source, onnx_dir)
            (onnx_dir / TTE_CONFIG_NAME).write_text(json.dumps(ref.tte.to_dict(), indent=2))
        summary["onnx"] = {"dir": str(out / "onnx"), "opset": graphs["opset"],
                           "max_abs_error_vs_torch": {k: v["max_abs_error_vs_torch"] for k, v in graphs["graphs"].items()}}

    if "native" in targets and opts.fp8 and ref_run is not None:
        del ref, model, onnx_engine  # the reference results are in ref_run: free its weights before loading the FP8 engine
        gc.collect()
        tensor_cores = runtime_dtype == "bfloat16" and scaled_mm_supported(torch.device(opts.device))
        with rep.step("calibrate (fp8)"):
            test = Engine(tmp, device=opts.device, dtype=runtime_dtype)
            report = accuracy_report(ref_run, run_calibration(test, items, trace_tokens, progress=rep.bars, reference=ref_run))
            del test
        report.update(reference=f"{runtime_dtype} weights on {opts.device}", trace_tokens_max=trace_tokens,
                      activations="FP8 tensor cores, per-token scales" if tensor_cores else f"per-token E4M3, fake-quantized ({opts.device})")
        spec["accuracy"] = summary["accuracy"] = report
        (tmp / ENGINE_FILE).write_text(json.dumps(spec, indent=2))
    return summary


def options_dict(opts: ExportOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
