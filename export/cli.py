"""`tte-export`: turn a checkpoint into a native engine directory, FP8, TensorRT-LLM and ONNX exports.

    tte-export --checkpoint tiny-random --out engines/tiny
    tte-export --checkpoint unified-2b --random-init --fp8 --target all --out engines/2b-fp8

Errors are one line on stderr and a non-zero exit: 2 for bad arguments and missing or unusable
checkpoints/outputs (every TTEError: ExportError, CheckpointError, ...; a checkpoint whose settings
cannot work is a CheckpointError), 1 for failures during the export (any other exception), 130 after
Ctrl-C, 143 after SIGTERM; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path


TRTLLM_TARGETS = ("trtllm", "trtllm-legacy", "all")


def _output_path(text: str) -> Path:
    """--out: an empty value (`--out "$OUT"` with OUT unset) would be the current directory."""
    from ..cli import nonempty

    return Path(nonempty(text))


def build_parser() -> argparse.ArgumentParser:
    from ..cli import OneLineParser, device_name, int_between, nonempty
    from .pipeline import INT_LIMITS

    p = OneLineParser(prog="tte-export", description="Export a TTE checkpoint to an optimized engine (native, TensorRT-LLM, ONNX).")
    p.add_argument("--checkpoint", required=True, type=nonempty, help="checkpoint directory, alias (tiny-random, unified-2b, unified-7b, ...) or cached HF repo id")
    p.add_argument("--out", type=_output_path, help="output directory (default: $TTE_HOME/engines/<name>[-fp8])")
    p.add_argument("--target", default="native", choices=["native", "trtllm", "trtllm-legacy", "hf", "onnx", "all"],
                   help="native engine dir; trtllm: HF checkpoint + launch config for TensorRT-LLM's PyTorch backend; trtllm-legacy: "
                        "TensorRT-LLM 1.x checkpoint + build.sh; hf: Hugging Face checkpoint (FP8: compressed-tensors); onnx; "
                        "all = native, trtllm, hf, onnx (default: native)"),
    p.add_argument("--fp8", action="store_true", help="E4M3 weights with per-channel scales for the decoder and head linears")
    p.add_argument("--fp8-vision", action="store_true", help="with --fp8: quantize the vision tower's linears too")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="dtype of the float weights (auto: the checkpoint's)")
    p.add_argument("--random-init", action="store_true", help="the alias's real architecture with seeded random weights (no download)")
    p.add_argument("--seed", type=int_between(*INT_LIMITS["seed"]), default=0,
                   help=f"seed for --random-init of an architecture alias, 0 to {INT_LIMITS['seed'][1]} (default 0)")
    p.add_argument("--calibration", type=int_between(*INT_LIMITS["calibration"]), default=8, metavar="N",
                   help=f"built-in calibration items for the FP8 accuracy report, at most {INT_LIMITS['calibration'][1]} (default 8; 0 skips it)")
    p.add_argument("--force", action="store_true", help="replace an earlier export at --out (never a folder of other files)")
    p.add_argument("--device", type=device_name, default="cpu", help="device to load and calibrate on (cpu, cuda, cuda:1)")
    p.add_argument("--trtllm-fp8", choices=["per-tensor", "per-channel"],
                   help="with --fp8 and a TensorRT-LLM target: per-tensor (quant_algo FP8, static activation scales; the default) or "
                        "per-channel (FP8_PER_CHANNEL_PER_TOKEN, = the native scheme; refused for trtllm-legacy)")
    p.add_argument("--kv-cache-fp8", action="store_true", help="trtllm-legacy: FP8 KV cache (kv_cache_quant_algo FP8, calibrated scales)")
    p.add_argument("--max-batch-size", type=int_between(*INT_LIMITS["max_batch_size"]),
                   help=f"TensorRT-LLM targets: max batch size, 1 to {INT_LIMITS['max_batch_size'][1]} (default 32)")
    p.add_argument("--max-input-len", type=int_between(*INT_LIMITS["max_input_len"]),
                   help="TensorRT-LLM targets: longest prompt in tokens (default 2048, or less where the model's context is shorter); the engine limits add the trace budget and the "
                        "embed tail, and must fit the model's max_position_embeddings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or step lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log tte_engine's INFO messages")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_summary(summary: dict) -> None:
    """One screen: what was written where, how big, how accurate, what was not done."""
    print(f"\nexported {summary['checkpoint']} ({'random weights, ' if summary['random_init'] else ''}{summary['dtype']}"
          f"{', FP8' if summary['fp8'] else ''}) -> {summary['out']}")
    groups: dict[str, list[int]] = {}
    for f in summary["files"]:
        top = f["path"].split("/")[0] if "/" in f["path"] else "."
        groups.setdefault(top, [0, 0])
        groups[top][0] += f["bytes"]
        groups[top][1] += 1
    what = {".": "native engine (Engine(path))", "trtllm": "TensorRT-LLM PyTorch backend: HF checkpoint + tte_trtllm.json",
            "trtllm-legacy": "TensorRT-LLM 1.x checkpoint + build.sh", "hf": "Hugging Face checkpoint", "onnx": "ONNX graphs"}
    for top, (nbytes, count) in sorted(groups.items()):
        label = what.get(top, top)
        if top == "hf" and summary.get("hf", {}).get("format") not in (None, "float"):
            label += f" ({summary['hf']['format']} FP8)"
        if top == "trtllm" and summary.get("trtllm", {}).get("quant_algo"):
            label += f" (ModelOpt {summary['trtllm']['quant_algo']})"
        print(f"  {top + '/':<15} {_size(nbytes):>10} in {count:>3} files  {label}")
    print(f"  {'./export_report.json':<36} this summary, with the accuracy figures")
    secs = summary["seconds"]
    slowest = sorted(((v, k) for k, v in secs.items() if k != "total"), reverse=True)[:2]
    print(f"  total {_size(summary['total_bytes'])} in {secs['total']:.1f}s (slowest: " + ", ".join(f"{k} {v:.1f}s" for v, k in slowest)
          + "; all steps in export_report.json)")
    acc, pt = summary.get("accuracy"), summary.get("accuracy_per_tensor")
    for name, a in (("FP8 per-channel (native)", acc), ("FP8 per-tensor (static scales)", pt)):
        if a:
            print(f"  {name} vs {a['reference']}, {a['items']} calibration items:")
            print(f"    embedding cosine min {a['cosine']['min']:.5f} mean {a['cosine']['mean']:.5f}; think=False min "
                  f"{a['cosine_no_think']['min']:.5f}; traces identical {a['trace_exact_match']:.0%}; "
                  f"top-1 agreement {a['retrieval_top1_agreement']:.0%}")
    if summary["random_init"] and (acc or pt):  # a new user read "traces identical 0%" as a broken export
        print("  (random weights: near-uniform logits, so greedy traces part at the first near-tie; trace agreement "
              "means something on trained weights only, and an item whose trace parts embeds a different text, so "
              "its cosine can fall well below these calibration items' minimum)")
    if summary["fp8"] and not acc and not pt:
        print("  FP8 accuracy: not measured (needs --calibration > 0)")
    if "trtllm" in summary:
        print("  trtllm/: NOT run here (TensorRT-LLM is not installed); load with tte_engine.export.trtllm_runtime.TrtllmTTE")
    if "trtllm-legacy" in summary:
        print("  trtllm-legacy/: engine NOT built; run trtllm-legacy/build.sh with TensorRT-LLM 1.x")
    if "onnx" in summary:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in summary["onnx"]["max_abs_error_vs_torch"].items())
        print(f"  onnx/ (opset {summary['onnx']['opset']}): max |onnxruntime - torch| {errs}")
    for note in summary.get("notes", []):
        print(f"  {note}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the export is, so that its temporary directory is removed on the way out."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    trt_only = {"--max-batch-size": args.max_batch_size, "--max-input-len": args.max_input_len, "--trtllm-fp8": args.trtllm_fp8}
    given = [flag for flag, value in trt_only.items() if value is not None]
    if given and args.target not in TRTLLM_TARGETS:
        parser.error(f"{given[0]} applies to the TensorRT-LLM targets only (--target trtllm, trtllm-legacy or all)")
    if args.trtllm_fp8 is not None and not args.fp8:
        parser.error("--trtllm-fp8 needs --fp8")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ..errors import TTEError
    from .pipeline import ExportOptions, Reporter, run_export

    opts = ExportOptions(
        checkpoint=args.checkpoint, out=args.out, target=args.target, fp8=args.fp8, fp8_vision=args.fp8_vision,
        dtype=args.dtype, random_init=args.random_init, calibration=args.calibration, force=args.force,
        device=args.device, kv_cache_fp8=args.kv_cache_fp8, seed=args.seed,
        **{k: v for k, v in (("trtllm_fp8", args.trtllm_fp8), ("max_batch_size", args.max_batch_size), ("max_input_len", args.max_input_len))
           if v is not None},
    )
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"tte-export: {msg}", flush=True))  # stderr is for errors and bars
    # timeout, docker stop, a CI cancel: clean up as for Ctrl-C (only the main thread can set a handler)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        summary = run_export(opts, Reporter(say=say, bars=not args.quiet and sys.stderr.isatty()))
    except TTEError as exc:
        print("tte-export: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except Exception as exc:  # a failure during the export (a full disk, a device error, a bug): one line (-v: the traceback too)
        if args.verbose:
            traceback.print_exc()
        print(f"tte-export: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"tte-export: {'terminated' if isinstance(exc, _Terminated) else 'interrupted'}; nothing was written", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
