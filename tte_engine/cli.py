"""`tte-embed`: embed a text file or JSONL with a progress bar; write `.npy` + a JSONL of traces.

    tte-embed queries.jsonl --checkpoint tiny-random --output out/queries
    tte-embed --demo            # a few text and image queries on tiny-random, printed

A `.txt` input has one text per line; a `.jsonl` input has objects with `text`, `image` (a path,
relative to the file, or a data: URL), `instruction` and an optional `id` that is carried to
the output. Bad lines become error rows (NaN vectors) and are counted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import TTEError


def read_items(path: Path) -> tuple[list, list]:
    """(items, ids) from a .txt or .jsonl file; malformed JSON lines become error strings."""
    items, ids = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("each line must be a JSON object")
            except ValueError as exc:
                items.append(f"line {n}: {exc}")
                ids.append(None)
                continue
            ids.append(obj.pop("id", None))
            image = obj.get("image")
            if isinstance(image, str) and not image.startswith("data:") and not Path(image).is_absolute():
                obj["image"] = str(path.parent / image)
            items.append(obj)
    else:
        items = [line for line in lines if line.strip()]
        ids = [None] * len(items)
    return items, ids


def demo_items() -> list:
    from PIL import Image, ImageDraw

    def picture(color, shape):
        img = Image.new("RGB", (112, 84), "white")
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)([20, 12, 92, 72], fill=color)
        return img

    return [
        "a red circle on a white background",
        "a blue square",
        {"image": picture("red", "circle")},
        {"text": "What shape is this?", "image": picture("blue", "square")},
    ]


def run_demo(engine) -> None:
    items = demo_items()
    res = engine.embed(items)
    labels = [it if isinstance(it, str) else (it.get("text") or "<image>") + (" +image" if it.get("image") else "") for it in items]
    print(f"checkpoint: {engine.checkpoint}  mode: {engine.tte.mode}  head: {engine.tte.head.type}  dim: {engine.embedding_dim}")
    for label, trace, vec, reason in zip(labels, res.traces, res.embeddings, res.stop_reasons):
        print(f"\n{label!r}\n  trace ({reason}): {trace!r}\n  |embedding| = {vec.norm():.6f}")
    sims = res.embeddings @ res.embeddings.T
    print("\npairwise cosine similarity:")
    for i, row in enumerate(sims.tolist()):
        print(f"  [{i}] " + " ".join(f"{v:+.4f}" for v in row))
    print(f"\nusage: {res.usage}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tte-embed", description="Think-Then-Embed: embed a .txt or .jsonl file.")
    parser.add_argument("input", nargs="?", type=Path, help=".txt (one text per line) or .jsonl (text/image/instruction/id)")
    parser.add_argument("--checkpoint", default="tiny-random", help="checkpoint directory or alias (default: tiny-random)")
    parser.add_argument("--output", type=Path, help="output prefix (writes PREFIX.npy and PREFIX.jsonl); default: next to the input")
    parser.add_argument("--demo", action="store_true", help="embed a few built-in text and image queries and print them")
    parser.add_argument("--no-think", action="store_true", help="skip the trace (plain last-token embedding)")
    parser.add_argument("--max-trace-tokens", type=int, help="trace budget (default: from tte_config.json)")
    parser.add_argument("--instruction", help="task instruction or a named instruction of the checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=256, help="items handed to the engine at a time")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.demo and args.input is None:
        parser.error("give an INPUT file or --demo")
    try:
        from .engine import Engine

        engine = Engine(args.checkpoint, device=args.device, dtype=args.dtype)
        if args.demo:
            run_demo(engine)
            return 0
        return embed_file(engine, args)
    except (TTEError, OSError) as exc:
        print(f"tte-embed: error: {exc}", file=sys.stderr)
        return 2


def embed_file(engine, args) -> int:
    from tqdm.auto import tqdm

    items, ids = read_items(args.input)
    prefix = args.output or args.input.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.full((len(items), engine.embedding_dim), np.nan, dtype=np.float32)
    failed = 0
    with open(f"{prefix}.jsonl", "w", encoding="utf-8") as out, tqdm(total=len(items), unit="item", desc="tte-embed") as bar:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start : start + args.batch_size]
            res = engine.embed(
                chunk, think=not args.no_think, max_trace_tokens=args.max_trace_tokens,
                instruction=args.instruction, errors="return", progress=bar.update,
            )
            vectors[start : start + len(chunk)] = res.embeddings.numpy()
            for j, item in enumerate(chunk):
                i = start + j
                error = res.errors[j]
                failed += error is not None
                record = {"index": i, "id": ids[i], "trace": res.traces[j], "error": error, "stop_reason": res.stop_reasons[j],
                          "prompt_tokens": len(res.prompt_token_ids[j]), "trace_tokens": len(res.trace_token_ids[j])}
                out.write(json.dumps(record) + "\n")
            bar.update(sum(e is not None for e in res.errors))
    np.save(f"{prefix}.npy", vectors)
    print(f"wrote {prefix}.npy ({len(items)} x {engine.embedding_dim}) and {prefix}.jsonl; {failed} item(s) failed", file=sys.stderr)
    return 1 if failed == len(items) and items else 0


if __name__ == "__main__":
    sys.exit(main())
