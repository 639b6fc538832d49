"""`tte-export`: turn a checkpoint into a native engine directory, FP8, TensorRT-LLM and ONNX exports.

    tte-export --checkpoint tiny-random --out engines/tiny
    tte-export --checkpoint unified-2b --random-init --fp8 --target all --out engines/2b-fp8

Errors are one line on stderr and a non-zero exit (2 for bad arguments and missing or unusable
checkpoints/outputs, 1 for failures during the export); nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"tte-export: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tte-export", description="Export a TTE checkpoint to an optimized engine (native, TensorRT-LLM, ONNX).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, alias (tiny-random, unified-2b, unified-7b, ...) or cached HF repo id")
    p.add_argument("--out", type=Path, help="output directory (default: $TTE_HOME/engines/<name>[-fp8])")
    p.add_argument("--target", default="native", choices=["native", "trtllm", "onnx", "all"], help="what to write (default: native)")
    p.add_argument("--fp8", action="store_true", help="E4M3 weights with per-channel scales for the decoder and head linears")
    p.add_argument("--fp8-vision", action="store_true", help="with --fp8: quantize the vision tower's linears too")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="dtype of the float weights (auto: the checkpoint's)")
    p.add_argument("--random-init", action="store_true", help="the alias's real architecture with seeded random weights (no download)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--calibration", type=int, default=8, metavar="N", help="built-in calibration items for the FP8 accuracy report (default 8; 0 skips it)")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty output directory")
    p.add_argument("--device", default="cpu", help="device to load and calibrate on (cpu, cuda, cuda:1)")
    p.add_argument("--trtllm-fp8", default="per-tensor", choices=["per-tensor", "per-channel"],
                   help="TensorRT-LLM FP8 flavour: per-tensor (quant_algo FP8, static activation scales) or per-channel (FP8_PER_CHANNEL_PER_TOKEN, = the native scheme)")
    p.add_argument("--kv-cache-fp8", action="store_true", help="TensorRT-LLM: FP8 KV cache (kv_cache_quant_algo FP8, calibrated scales)")
    p.add_argument("--max-batch-size", type=int, default=32, help="TensorRT-LLM build: max batch size (default 32)")
    p.add_argument("--max-input-len", type=int, default=2048, help="TensorRT-LLM build: max prompt tokens (default 2048)")
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
    print(f"\nexported {summary['checkpoint']} ({'random weights, ' if summary['random_init'] else ''}{summary['dtype']}"
          f"{', FP8' if summary['fp8'] else ''}) -> {summary['out']}")
    groups: dict[str, int] = {}
    for f in summary["files"]:
        top = f["path"].split("/")[0] if "/" in f["path"] else "."
        groups[top] = groups.get(top, 0) + f["bytes"]
    for f in summary["files"]:
        if f["bytes"] >= 1 << 20 or f["path"].endswith((".json", ".onnx", ".sh")):
            print(f"  {f['path']:<40} {_size(f['bytes']):>10}")
    print(f"  total {_size(summary['total_bytes'])} in {len(summary['files'])} files; "
          + ", ".join(f"{k}/ {_size(v)}" for k, v in sorted(groups.items()) if k != "."))
    print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items()))
    acc = summary.get("accuracy")
    if acc:
        print(f"  FP8 vs {acc['reference']} on {acc['items']} calibration items ({acc['activations']}):")
        for label, key in (("same traces", "cosine"), ("think=False", "cosine_no_think"), ("own traces", "cosine_end_to_end")):
            print(f"    embedding cosine, {label:<12} min {acc[key]['min']:.5f}  mean {acc[key]['mean']:.5f}")
        print(f"    traces identical {acc['trace_exact_match']:.0%}, token agreement {acc['trace_token_agreement']:.0%}"
              f" (first {acc['trace_tokens_max']} tokens); retrieval top-1 agreement {acc['retrieval_top1_agreement']:.0%}")
    elif summary["fp8"]:
        print("  FP8 accuracy report: not computed (needs --calibration > 0 and the native target)")
    if "trtllm" in summary:
        t = summary["trtllm"]
        print(f"  TensorRT-LLM: quant_algo {t['quant_algo']}, kv_cache_quant_algo {t['kv_cache_quant_algo']}")
        print(f"    {'engine built in ' + t['build']['engine_dir'] if t['build']['built'] else t['build']['reason']}")
    if "onnx" in summary:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in summary["onnx"]["max_abs_error_vs_torch"].items())
        print(f"  ONNX (opset {summary['onnx']['opset']}): max |onnxruntime - torch| {errs}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ..errors import TTEError
    from .pipeline import ExportOptions, Reporter, run_export

    opts = ExportOptions(
        checkpoint=args.checkpoint, out=args.out, target=args.target, fp8=args.fp8, fp8_vision=args.fp8_vision,
        dtype=args.dtype, random_init=args.random_init, calibration=args.calibration, force=args.force,
        device=args.device, trtllm_fp8=args.trtllm_fp8, kv_cache_fp8=args.kv_cache_fp8,
        max_batch_size=args.max_batch_size, max_input_len=args.max_input_len, seed=args.seed,
    )
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"tte-export: {msg}", flush=True))  # stderr is for errors and bars
    try:
        summary = run_export(opts, Reporter(say=say, bars=not args.quiet and sys.stderr.isatty()))
    except TTEError as exc:
        print("tte-export: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"tte-export: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tte-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
