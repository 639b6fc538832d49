"""`tte-embed`: embed a text file or JSONL with a progress bar; resumable, with a trace/embedding cache.

    tte-embed queries.jsonl --checkpoint tiny-random --output out/queries   # out/queries.npy + .jsonl
    tte-embed corpus.jsonl --format parquet                                  # corpus.embeddings.parquet
    tte-embed --demo            # a few text and image queries on tiny-random, printed

A `.txt` input has one text per line; a `.jsonl` input has objects with `text`, `image` (a path,
relative to the file, or a data: URL), `images` (a list of them), `video` (a video file or a list
of frame images, paths relative to the file or data: URLs), `videos`, `video_options` (see
`tte_engine.video.VideoOptions`; `{"num_frames": 8}` is MMEB-V2's convention), `instruction` and
an optional `id` (default: the item's 0-based number among the file's non-blank lines, or "item N"
where another line gives that number as its id). Bad lines become error rows (NaN vectors) and are
counted at the end.

Resuming: each finished batch is written at once to `PREFIX.parts/` (a `.npy` shard and its
`.jsonl` records, each renamed into place whole); the final files are assembled from the shards
when every item is done. A killed run loses at most the batch in flight, and re-running the same
command skips the ids already written for the same item (each row records its item's digest, local
media files' size and modification time included: an id whose item changed is embedded again, and
rows of ids gone from the input are dropped). Batches are cut the same way on every run, and the
cache is written per finished batch, so a resumed run repeats exactly the computation the
interrupted one lost: its output is identical to an uninterrupted run's.

The run's settings (engine, checkpoint, think, trace budget, instruction) are recorded with the
results: `PREFIX.parts/manifest.json` while a run is partial, then `PREFIX.manifest.json` next to
`PREFIX.npy` / `PREFIX.jsonl`, or the metadata of `PREFIX.parquet`. A re-run with other settings is
refused (OutputConflict) rather than mixing vectors of different settings or models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError, TTEError
from .inputs import check_settings
from .vision import REMOTE_URL

MANIFEST = "manifest.json"
MEDIA_FIELDS = ("image", "video", "images", "videos")  # a .jsonl item's fields that may name files beside it
URL_PREFIXES = ("data:", *REMOTE_URL)  # media values that are no local file: never resolved nor stamped
MAX_NESTING = 32  # deepest a .jsonl line may nest (an item needs 3: the object, `videos`, a video's frames); deeper is an error row
PARQUET_MANIFEST_KEY = b"tte_engine.manifest"  # the Parquet schema metadata key of a finished run's manifest
SHARD_FILE = re.compile(r"(\d{6}\.(npy|jsonl)|manifest\.json)(\.tmp)?")  # the only names Shards writes in PREFIX.parts/


class OutputConflict(TTEError):
    """The output prefix holds a different run's partial results."""


@dataclass(frozen=True)
class MalformedLine:
    """An input line that is not a JSON object: it becomes an error row, never an engine item."""

    reason: str


def read_lines(path: Path) -> list[tuple[int, str | None]]:
    """(line number, text) per line of `path`: bytes split on "\n" only (a "\r" before it is dropped),
    a leading UTF-8 BOM removed, each line decoded on its own (None when it is not UTF-8). So
    U+2028, U+0085, form feeds and the like inside a record never split it."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    out = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            out.append((n, raw.removesuffix(b"\r").decode("utf-8")))
        except UnicodeDecodeError:
            out.append((n, None))
    if out and out[-1][1] == "":
        out.pop()  # the newline that ends the last line
    return out


def _media_paths(item: dict) -> list[tuple[list | dict, int | str, str]]:
    """Each local file path among an item's media fields, as (the list or item holding it, its index or
    key, the path): fields in MEDIA_FIELDS order, each value depth first. `image` is a path, `images` a
    list of them, `video` a path or a list of frame paths, `videos` a list of those, so a path may sit
    two lists deep; lists are walked at any depth (a value nested deeper is malformed, refused by the
    engine item by item) without recursion. data: and http(s) URLs, and values that are not strings,
    name no local file. The one walker both for resolving paths (`read_items`) and for stamping them
    (`_digest`)."""
    found = []
    stack = [(item, name) for name in reversed(MEDIA_FIELDS) if name in item]
    while stack:
        holder, key = stack.pop()
        value = holder[key]
        if isinstance(value, list):
            stack.extend((value, i) for i in reversed(range(len(value))))
        elif isinstance(value, str) and not value.startswith(URL_PREFIXES):
            found.append((holder, key, value))
    return found


def _nesting(obj) -> int:
    """How many levels of lists and objects `obj` nests (without recursion; stops counting past MAX_NESTING)."""
    depth, level = 0, [obj]
    while level and depth <= MAX_NESTING:
        depth += 1
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (list, dict))]
    return depth


def read_items(path: Path) -> tuple[list, list, list[str]]:
    """(items, ids, digests) from a .txt or .jsonl file; a line that is not UTF-8 (or, in .jsonl, not a
    JSON object) becomes a MalformedLine item naming its line number. Blank lines are skipped.

    An item's digest covers what its row is computed from (see `_digest`): a resumed run re-embeds
    an id whose digest changed."""
    items, ids = [], []
    jsonl = path.suffix.lower() == ".jsonl"
    for n, line in read_lines(path):
        if line is not None and not line.strip():
            continue
        ids.append(None)
        try:
            if line is None:
                raise ValueError("not valid UTF-8")
            if not jsonl:
                items.append(line)
                continue
            obj = json.loads(line, parse_constant=_not_json, parse_float=_finite_float)
            if not isinstance(obj, dict):
                raise ValueError("each line must be a JSON object")
            if _nesting(obj) > MAX_NESTING:  # the digest, and the engine, would recurse through it
                raise RecursionError
        except json.JSONDecodeError as exc:  # its own "line 1 column c" would count inside this one line
            items.append(MalformedLine(f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:  # also json's own limit on nesting, far deeper
            items.append(MalformedLine(f"line {n}: nested more than {MAX_NESTING} levels deep"))
            continue
        except ValueError as exc:
            items.append(MalformedLine(f"line {n}: {exc}"))
            continue
        ids[-1] = obj.pop("id", None)
        for holder, key, value in _media_paths(obj):  # relative paths name files beside the input file
            if not Path(value).is_absolute():  # made absolute: the digest is the same from any working directory
                holder[key] = str(path.parent.absolute() / value)
        items.append(obj)
    return items, ids, [_digest(item) for item in items]


def _not_json(name: str):
    """json.loads's hook for NaN, Infinity and -Infinity, which Python accepts and JSON (RFC 8259)
    does not: the line is malformed (else a NaN id would be written out as invalid JSON)."""
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """json.loads's hook for numbers with a fraction or exponent: one past float range (1e400) is refused, not read as inf."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _digest(item) -> str:
    """What an item's row depends on: its content as read (a bad line: its error, line number
    included), and each local media file's path, size and modification time (a file replaced under
    the same name is a new item; its bytes are not read here)."""
    if isinstance(item, MalformedLine):
        key = {"malformed": item.reason}
    elif isinstance(item, str):
        key = {"text": item}
    else:
        key = {"item": item, "files": [_stamp(p) for _, _, p in _media_paths(item)]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}: missing"
    except ValueError:  # a NUL or a lone surrogate: no file can have that name (the engine says so in the item's error row)
        return f"{path}: not a file name"
    return f"{path}: {st.st_size} bytes, mtime {st.st_mtime_ns}"


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


def run_demo(engine, *, think: bool = True, max_trace_tokens: int | None = None, instruction: str | None = None) -> None:
    """Embed the built-in demo items and print traces, norms and pairwise similarities."""
    items = demo_items()
    res = engine.embed(items, think=think, max_trace_tokens=max_trace_tokens, instruction=instruction)
    labels = [it if isinstance(it, str) else f"{it['text']} +image" if it.get("text") and it.get("image") else it.get("text") or "<image>"
              for it in items]
    print(f"checkpoint: {engine.checkpoint}  mode: {engine.tte.mode}  head: {engine.tte.head.type}  dim: {engine.embedding_dim}")
    for label, trace, vec, reason in zip(labels, res.traces, res.embeddings, res.stop_reasons):
        print(f"\n{label!r}\n  trace ({reason}): {trace!r}\n  |embedding| = {vec.norm():.6f}")
    sims = res.embeddings @ res.embeddings.T
    print("\npairwise cosine similarity:")
    for i, row in enumerate(sims.tolist()):
        print(f"  [{i}] " + " ".join(f"{v:+.4f}" for v in row))
    print(f"\nusage: {res.usage}")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, `PROG: error: MESSAGE` with exit 2 (not argparse's usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_between(least: int, most: int):
    """argparse type: an integer in [least, most] (one type for the numeric options with an upper bound)."""
    def parse(text: str) -> int:
        return int_within(text, least, most, f"an integer from {least} to {most}")

    return parse


def nonempty(text: str) -> str:
    """argparse type: a value that is not empty (`--checkpoint "$CKPT"` with CKPT unset would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def path_problem(path: Path, *, output: bool) -> str | None:
    """Why `path` cannot be read (output False: an existing regular file) or written (output True: a file
    created there, missing folders made), or None. Checked before the model loads."""
    try:
        if path.is_dir():
            return "is a directory"
        if not output:
            if not path.exists():
                return "no such file"
            if not path.is_file():
                return "is not a regular file (tte-embed reopens its input to resume a run: save a stream to a file first)"
            with open(path, "rb"):
                return None
        folder = path.parent
        while not folder.exists():  # the nearest folder that exists: the missing ones are made
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is not a directory"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write in {folder} (permission denied)"
    except OSError as exc:
        return exc.strerror.lower() if exc.strerror else str(exc)
    except ValueError:  # a NUL byte
        return "is not a valid path"
    return None


def output_prefix_path(text: str) -> Path:
    """argparse type of tte-embed's --output: a file prefix, never a folder: one that exists, or a name
    ending in a slash (Path would drop the slash, and the files land beside the folder, as `sub.npy`)."""
    path = Path(nonempty(text))
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder; give a file prefix in it, e.g. {text + 'embeddings'!r}")
    if path.is_dir() or path.name in ("", ".", ".."):  # (was written as DIR/..npy, DIR/..jsonl)
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file prefix in it, e.g. {str(path / 'embeddings')!r}")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return int_within(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return int_within(text, 0)


def int_within(text: str, least: int, most: int | None = None, what: str | None = None) -> int:
    """The core of an argparse integer type: `text` as an integer in [least, most] (most None: no
    upper bound), else ArgumentTypeError saying it must be `what` (default: "an integer >= least")."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"must be {what or f'an integer >= {least}'}, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (not nan, not inf)."""
    return float_within(text, 0.0, strict=False)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (not nan, not inf)."""
    return float_within(text, 0.0, strict=True)


def float_within(text: str, least: float, *, strict: bool) -> float:
    """The core of an argparse float type: `text` as a finite float > least (strict) or >= least,
    else ArgumentTypeError."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < least or (strict and value == least):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {least:g}, got {text!r}")
    return value


def existing_dir(text: str) -> Path:
    """argparse type: an existing directory, returned resolved (absolute, symlinks followed)."""
    try:
        path = Path(text).expanduser().resolve()
        ok = path.is_dir()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, an unknown ~user, a symlink loop
        ok = False
    if not text or not ok:
        raise argparse.ArgumentTypeError(f"must be an existing directory, got {text!r}")
    return path


def device_name(text: str) -> str:
    """argparse type: a torch device this engine runs on: cpu, cuda or cuda:N (N a visible GPU when CUDA is available)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"must name a visible GPU: {text!r}, but this machine has {torch.cuda.device_count()} "
                                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return text


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine flags tte-embed and tte-serve share (read back by `engine_switches`)."""
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: run every decode step eagerly (vLLM's flag)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="recompute every prompt instead of reusing cached prefix blocks")
    parser.add_argument("--suffix-wait-steps", type=nonnegative_int, metavar="N",
                        help="decode steps an ended trace's embed suffix may wait to be prefilled with others' (default: 8 with CUDA graphs, 0 without)")


def engine_switches(args) -> dict:
    """EngineConfig overrides of the flags `add_engine_flags` adds."""
    switches = {}
    if args.enforce_eager:
        switches["cuda_graphs"] = False
    if args.no_prefix_caching:
        switches["enable_prefix_caching"] = False
    if args.suffix_wait_steps is not None:
        switches["suffix_wait_steps"] = args.suffix_wait_steps
    return switches


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tte-embed", description="Think-Then-Embed: embed a .txt or .jsonl file.")
    parser.add_argument("input", nargs="?", type=Path, help=".txt (one text per line) or .jsonl (one JSON object per line: text, image, "
                        "images, video, videos, video_options, instruction, id)")
    parser.add_argument("--checkpoint", type=nonempty, help="checkpoint directory or alias (default: tiny-random, a random test checkpoint whose "
                        "vectors mean nothing; left to this default outside --demo, a warning says so)")
    parser.add_argument("--output", type=output_prefix_path, help="output prefix (PREFIX.npy + PREFIX.jsonl, or PREFIX.parquet); default: INPUT_STEM.embeddings next to the input")
    parser.add_argument("--format", choices=["npy", "parquet"], help="npy: PREFIX.npy + PREFIX.jsonl (default); parquet: PREFIX.parquet")
    parser.add_argument("--demo", action="store_true", help="embed a few built-in text and image queries and print them")
    parser.add_argument("--no-think", action="store_true", help="skip the trace (plain last-token embedding)")
    parser.add_argument("--max-trace-tokens", type=nonnegative_int, help="trace budget (default: from tte_config.json)")
    parser.add_argument("--instruction", help="task instruction or a named instruction of the checkpoint")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (default auto: float32 on CPU; on CUDA bfloat16, or the checkpoint's float16)")
    add_engine_flags(parser)
    parser.add_argument("--batch-size", type=positive_int, help="items handed to the engine at a time, and written together (default 256)")
    parser.add_argument("--cache", type=Path, help="SQLite trace/embedding cache (default: $TTE_HOME/cache.sqlite)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier (partial) results at the output prefix")
    parser.add_argument("--retry-errors", action="store_true", help="when resuming, run the items that failed before again")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the engine's progress and settings (INFO level)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.demo and args.input is None:
        parser.error("give an INPUT file or --demo")
    file_options = {"INPUT": args.input, "--output": args.output, "--format": args.format, "--batch-size": args.batch_size,
                    "--cache": args.cache, "--overwrite": args.overwrite or None, "--retry-errors": args.retry_errors or None}
    if args.demo and any(v is not None for v in file_options.values()):
        parser.error(f"--demo embeds its own queries and prints them: it takes no {' or '.join(k for k, v in file_options.items() if v is not None)}")
    if args.cache is not None and args.no_cache:
        parser.error("--cache and --no-cache contradict each other: give one")
    args.format, args.batch_size = args.format or "npy", args.batch_size or 256
    if args.input is not None:
        problem = path_problem(args.input, output=False)
        if problem:
            parser.error(f"INPUT {args.input}: {problem}")
        if args.input.suffix.lower() not in (".txt", ".jsonl"):
            parser.error(f"INPUT {args.input}: expected a .txt file (one text per line) or a .jsonl file (one JSON object per line), "
                         f"got {args.input.suffix or 'no extension'}")
    prefix = output_prefix(args) if args.input is not None else None
    outputs = _final_paths(prefix, args.format) if prefix is not None else []
    if args.input is not None and args.input.resolve() in [p.resolve() for p in outputs]:  # before the model loads, as every path check
        parser.error(f"the output {prefix}.jsonl would overwrite the input; pass another --output")
    for flag, path in [("--output" if args.output else "output", p) for p in outputs] + [("--cache", args.cache)]:
        problem = path is not None and path_problem(path, output=True)
        if problem:
            parser.error(f"{flag} {path}: {problem}")
    if prefix is not None and not args.overwrite:
        conflict = _settings_conflict(prefix, args)
        if conflict:
            parser.error(conflict)
    try:  # the call's settings, checked before any model work (a bad one would make every row an error row)
        check_settings(not args.no_think, args.max_trace_tokens, args.instruction, None, None, None)
    except InvalidInputError as exc:
        parser.error(f"--{exc.field.replace('_', '-')}: {exc.reason}")
    if args.format == "parquet" and not args.demo:
        try:
            import pyarrow  # noqa: F401  (checked before any model work, not after it)
        except ImportError:
            parser.error("--format parquet needs pyarrow: pip install pyarrow (or the [serve] extra)")
    if args.checkpoint is None:  # (after the argument errors: a wrong call gets its error alone)
        args.checkpoint = "tiny-random"
        if not args.demo:
            print("tte-embed: warning: no --checkpoint given: embedding with tiny-random, a random test checkpoint "
                  "(its vectors mean nothing)", file=sys.stderr)
    results, loaded = None, False  # loaded: the model is up (a failure after it may leave batches written)
    try:
        from .engine import Engine
        from .result_cache import ResultCache

        if not (args.demo or args.no_cache):  # opened first: an unusable cache file is reported before the model loads
            results = ResultCache(args.cache)
        if not args.demo:  # (a large checkpoint takes a while: say what is happening before the bar appears)
            print(f"tte-embed: loading {args.checkpoint} on {args.device} ...", file=sys.stderr)
        engine = Engine(args.checkpoint, device=args.device, dtype=args.dtype, **engine_switches(args))
        loaded = True
        engine.prompts.check_instruction(args.instruction)  # a vision token in it (the tokenizer knows them)
        if args.demo:
            run_demo(engine, think=not args.no_think, max_trace_tokens=args.max_trace_tokens, instruction=args.instruction)
            return 0
        return embed_file(engine, args, results)
    except (TTEError, OSError, ValueError) as exc:  # ValueError: an engine setting that cannot work (--device cuda without CUDA)
        print("tte-embed: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except Exception as exc:  # a failure during the run (a device error, a bug): one line (-v: the traceback too); finished batches are kept
        if args.verbose:
            traceback.print_exc()
        print(f"tte-embed: error: {type(exc).__name__}: {' '.join(str(exc).splitlines())}"
              + ("; the batches written are kept: run the same command again to resume" if loaded and not args.demo else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every finished batch is on disk already (the shards): one line, not a traceback
        print("\ntte-embed: interrupted" + ("" if args.demo else "; the batches written are kept: run the same command again to resume"),
              file=sys.stderr)
        return 130
    finally:
        if results is not None:
            results.close()


# ---------------------------------------------------------------------- resumable file embedding
def _key(item_id) -> str:
    return json.dumps(item_id)


def _row_ids(ids: list) -> list:
    """Each item's row id: its own `id`; else its 0-based number among the file's items, or, where
    that number is another item's own id (a bad line, or a line without an id, in a file of integer
    ids), the string "item N" (with a ' added while the file gives that too): a line that cannot
    say its id never takes another's row."""
    given = {_key(item_id) for item_id in ids if item_id is not None}

    def free(i: int):  # (suffixed further where the file gives "item N" itself)
        name = i if _key(i) not in given else f"item {i}"
        while _key(name) in given:
            name = f"{name}'"
        return name

    return [item_id if item_id is not None else free(i) for i, item_id in enumerate(ids)]


def _damaged(where: str, why: str) -> OutputConflict:
    return OutputConflict(f"{where}: damaged ({why}); pass --overwrite to start again, or another --output")


def _read_records(path: Path) -> list[dict]:
    """The row records of a shard's or a finished run's .jsonl; one that is not a JSON object with an
    id is an OutputConflict naming the file (nothing of it is used)."""
    try:
        records = [json.loads(line) for _, line in read_lines(path)]
    except (ValueError, TypeError) as exc:
        raise _damaged(str(path), f"a record is not JSON: {exc}") from exc
    if not all(isinstance(r, dict) and "id" in r for r in records):
        raise _damaged(str(path), "a record has no id")
    return records


def _check_rows(records: list[dict], vectors: np.ndarray, dim: int, where: str) -> None:
    """One `dim`-wide vector per record, or an OutputConflict naming `where`."""
    if vectors.shape != (len(records), dim):
        raise _damaged(where, f"{len(records)} records beside vectors of shape {vectors.shape}, expected ({len(records)}, {dim})")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Shards:
    """`PREFIX.parts/`: one `NNNNNN.npy` + `NNNNNN.jsonl` per finished batch (the .jsonl, written last, commits it)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._next: int | None = None  # the next shard's number (found by one listing, on the first write)

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("[0-9]*.jsonl") if (self.dir / f"{p.stem}.npy").exists())

    def records(self, name: str) -> list[dict]:
        return _read_records(self.dir / f"{name}.jsonl")

    def load(self, name: str, dim: int) -> tuple[list[dict], np.ndarray]:
        records, vectors = self.records(name), np.load(self.dir / f"{name}.npy", mmap_mode="r")
        _check_rows(records, vectors, dim, str(self.dir / name))
        return records, vectors

    def write(self, records: list[dict], vectors: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._next is None:
            names = self.names()
            self._next = int(names[-1]) + 1 if names else 0
        name = f"{self._next:06d}"
        self._next += 1
        _atomic_write(self.dir / f"{name}.npy", lambda f: np.save(f, vectors))
        _atomic_write(self.dir / f"{name}.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def _final_paths(prefix: Path, fmt: str) -> list[Path]:
    return [Path(f"{prefix}.parquet")] if fmt == "parquet" else [Path(f"{prefix}.npy"), Path(f"{prefix}.jsonl")]


def _final_manifest_path(prefix: Path) -> Path:
    """Where a finished npy run records its settings (a Parquet file carries them in its metadata)."""
    return Path(f"{prefix}.manifest.json")


def _final_files(prefix: Path, fmt: str) -> list[Path]:
    """A finished run's files: the outputs, and for npy the manifest beside them."""
    return _final_paths(prefix, fmt) + ([_final_manifest_path(prefix)] if fmt == "npy" else [])


def _read_final_manifest(prefix: Path, fmt: str) -> dict | None:
    """The settings a finished run recorded (None: the files carry none)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        raw = (pq.read_schema(f"{prefix}.parquet").metadata or {}).get(PARQUET_MANIFEST_KEY)
        return None if raw is None else json.loads(raw)
    path = _final_manifest_path(prefix)
    return _load_json(path) if path.exists() else None


def _load_json(path: Path):
    """A manifest's content; one that is not JSON is an OutputConflict naming it."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputConflict(f"{path} is not JSON ({exc}); pass --overwrite, or another --output") from exc


def _check_manifest(earlier: dict | None, manifest: dict, where: str) -> None:
    if earlier is None:
        raise OutputConflict(f"{where} records no settings (no manifest); pass --overwrite, or another --output")
    if not isinstance(earlier, dict):
        raise OutputConflict(f"{where}: its manifest is not a tte-embed manifest; pass --overwrite, or another --output")
    if earlier != manifest:
        raise OutputConflict(_other_settings(where, sorted(k for k in manifest if earlier.get(k) != manifest[k])))


def _other_settings(where: str, changed: list[str]) -> str:
    return (f"{where} holds a run with other settings ({', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'}); "
            "re-run with the same settings, or pass --overwrite")


def _read_final(prefix: Path, fmt: str) -> tuple[list[dict], np.ndarray]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(f"{prefix}.parquet")
        dim = table.schema.field("embedding").type.list_size
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, dim)
        records = table.drop_columns(["embedding"]).to_pylist()
        for r in records:
            r["id"] = json.loads(r["id"])
        return records, vectors
    return _read_records(Path(f"{prefix}.jsonl")), np.load(f"{prefix}.npy")


def _settings(args) -> dict:
    """The manifest's fields that the arguments alone decide."""
    return {"think": not args.no_think, "max_trace_tokens": args.max_trace_tokens, "instruction": args.instruction}


def _manifest(engine, args) -> dict:
    return {"engine": engine.fingerprint, "checkpoint": str(engine.checkpoint), **_settings(args), "dim": engine.embedding_dim}


def _settings_conflict(prefix: Path, args) -> str | None:
    """Why the run at `prefix` (parts or a finished output) cannot be resumed with these arguments, told
    before the model loads (a 7B model's load takes minutes); the rest (the engine, damaged files) is
    checked by `_prepare_output` once it has loaded."""
    parts, finals = Path(f"{prefix}.parts") / MANIFEST, _final_paths(prefix, args.format)
    try:
        earlier = _load_json(parts) if parts.is_file() else _read_final_manifest(prefix, args.format) if all(p.exists() for p in finals) else None
    except (OSError, ValueError, ImportError, OutputConflict):  # damaged (pyarrow's errors are ValueErrors), or no pyarrow: told later
        return None
    if not isinstance(earlier, dict):
        return None
    changed = [k for k, v in _settings(args).items() if earlier.get(k, v) != v]
    return _other_settings(str(parts.parent) if parts.is_file() else ", ".join(map(str, finals)), changed) if changed else None


def _prepare_output(prefix: Path, fmt: str, manifest: dict, args, shards: Shards) -> None:
    """Start fresh, or pick up earlier results: partial shards, or a finished run's final files."""
    finals = _final_paths(prefix, fmt)
    if args.overwrite:
        if shards.dir.is_dir():
            shutil.rmtree(shards.dir, ignore_errors=True)
        else:
            shards.dir.unlink(missing_ok=True)
        for p in _final_files(prefix, fmt):
            p.unlink(missing_ok=True)
    if shards.dir.is_dir() and (shards.dir / MANIFEST).exists():
        _check_manifest(_load_json(shards.dir / MANIFEST), manifest, str(shards.dir))
        return
    # what is there and is not a tte-embed run's is refused, never taken over (it would be replaced or deleted);
    # parts without a manifest whose files all carry a shard's name are a run's whose cleanup was cut short
    if shards.dir.exists() and not (shards.dir.is_dir() and all(SHARD_FILE.fullmatch(f.name) for f in shards.dir.iterdir())):
        raise OutputConflict(f"{shards.dir} exists and is not a tte-embed run's parts (no {MANIFEST}); pass --overwrite, or another --output")
    finished = all(p.exists() for p in finals)
    strays = [p for p in _final_files(prefix, fmt) if p.exists()] if not finished else []
    if strays:
        raise OutputConflict(f"{', '.join(map(str, strays))} exist(s) without the rest of a finished tte-embed output "
                             f"({', '.join(str(p) for p in finals)}); pass --overwrite, or another --output")
    if finished:  # checked before anything is written: a refused run leaves the output as it was
        _check_manifest(_read_final_manifest(prefix, fmt), manifest, ", ".join(str(p) for p in finals))
    shards.dir.mkdir(parents=True, exist_ok=True)
    (shards.dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if finished:  # a finished run: its rows become the first shard
        try:
            records, vectors = _read_final(prefix, fmt)
            _check_rows(records, vectors, manifest["dim"], ", ".join(str(p) for p in finals))
        except OutputConflict:
            shutil.rmtree(shards.dir)  # nothing of the finished run was moved yet: it stays as it is
            raise
        repeated = _repeated_ids([r["id"] for r in records])
        kept = [k for k in range(len(records)) if k not in repeated]  # an id's first row: the one embedded
        shards.write([records[k] for k in kept], np.ascontiguousarray(vectors[kept], dtype=np.float32))
        for p in _final_files(prefix, fmt):
            p.unlink(missing_ok=True)


def output_prefix(args) -> Path:
    """--output, or INPUT_STEM.embeddings beside the input."""
    return args.output or args.input.with_name(args.input.stem + ".embeddings")


def embed_file(engine, args, result_cache=None) -> int:
    """Embed `args.input` into its output files (resuming an earlier run there); `result_cache`:
    the ResultCache to read and fill (None: none). Returns the exit status."""
    from tqdm.auto import tqdm

    from .result_cache import EngineCache

    items, ids, digests = read_items(args.input)
    ids = _row_ids(ids)
    repeats = _repeated_ids(ids)
    prefix = output_prefix(args)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    shards = Shards(Path(f"{prefix}.parts"))
    _prepare_output(prefix, args.format, _manifest(engine, args), args, shards)
    if repeats:
        i, first = next(iter(repeats.items()))
        print(f"tte-embed: {len(repeats)} item(s) repeat an earlier item's id (e.g. the item at index {i} repeats id {ids[i]!r} of "
              f"index {first}): each is an error row, not embedded", file=sys.stderr)

    written: dict[str, str | None] = {}  # id -> digest of the item its latest row was computed for
    for name in shards.names():
        for r in shards.records(name):
            written[_key(r["id"])] = None if args.retry_errors and r.get("error") is not None else r.get("input_digest")
    pending = [i for i, item_id in enumerate(ids) if i not in repeats and written.get(_key(item_id)) != digests[i]]
    if written:
        changed = sum(1 for i in pending if written.get(_key(ids[i])) is not None)
        undated = sum(1 for i in pending if _key(ids[i]) in written and written[_key(ids[i])] is None and not args.retry_errors)
        gone = len(set(written) - {_key(i) for i in ids})
        print(f"tte-embed: resuming: {len(items) - len(repeats) - len(pending)} of {len(items) - len(repeats)} item(s) already written"
              + (f"; {changed} item(s) differ from the earlier run's and are embedded again" if changed else "")
              + (f"; {undated} earlier row(s) carry no input_digest (an older tte-embed) and are embedded again" if undated else "")
              + (f"; {gone} earlier row(s) whose ids are not in {args.input} are dropped" if gone else "")
              + (f"; {len(repeats)} repeated id(s): error rows" if repeats else ""), file=sys.stderr)

    cache = None if result_cache is None else EngineCache(result_cache, engine)
    stats = {"failed": 0, "embedding": 0, "trace": 0, "trace_tokens": 0}
    with tqdm(total=len(pending), unit="item", desc="tte-embed", dynamic_ncols=True, disable=not pending) as bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            results = _embed_batch(engine, [items[i] for i in batch], cache, args, bar.update)
            vectors = np.full((len(batch), engine.embedding_dim), np.nan, dtype=np.float32)
            records = []
            for j, (i, r) in enumerate(zip(batch, results)):
                if r.embedding is not None:
                    vectors[j] = r.embedding
                records.append({"index": i, "id": ids[i], "trace": engine.prompts.decode(r.trace_ids), "error": r.error,
                                "stop_reason": r.stop_reason, "prompt_tokens": r.prompt_tokens, "trace_tokens": len(r.trace_ids),
                                "cached": r.cached, "input_digest": digests[i]})
                stats["failed"] += r.error is not None
                stats["trace_tokens"] += r.trace_tokens
                if r.cached:
                    stats[r.cached] += 1
            shards.write(records, vectors)
    written = _assemble(prefix, args.format, shards, ids, engine.embedding_dim, repeats, digests)
    failed = sum(r["error"] is not None for r in written)
    print(f"tte-embed: wrote {', '.join(str(p) for p in _final_paths(prefix, args.format))} ({len(ids)} x {engine.embedding_dim}); "
          f"{failed} item(s) failed; this run: {len(pending)} item(s), {stats['trace_tokens']} trace tokens generated, "
          f"cache hits: {stats['embedding']} embedding(s), {stats['trace']} trace(s)", file=sys.stderr)
    return 1 if failed == len(ids) and ids else 0


def _embed_batch(engine, batch: list, cache, args, progress) -> list:
    from .result_cache import ItemResult, embed_items

    good = [i for i, item in enumerate(batch) if not isinstance(item, MalformedLine)]
    results = [ItemResult(None, [], None, 0, 0, 0, error=item.reason) if isinstance(item, MalformedLine) else None for item in batch]
    progress(len(batch) - len(good))
    # each batch starts from an empty prefix cache, so its output depends on its own items only and a
    # resumed run is byte-identical to an uninterrupted one (sharing inside the batch still applies)
    engine.reset_prefix_cache()
    done = embed_items(engine, [batch[i] for i in good], cache=cache, think=not args.no_think, max_trace_tokens=args.max_trace_tokens,
                       instruction=args.instruction, progress=progress)
    for i, r in zip(good, done):
        results[i] = r
    return results


def _repeated_ids(ids: list) -> dict[int, int]:
    """Items whose id an earlier item has: {item: the first item with that id}. Rows are found by id
    when a run resumes, so only the first is embedded; each repeat is an error row of its own."""
    first: dict[str, int] = {}
    return {i: j for i, item_id in enumerate(ids) if (j := first.setdefault(_key(item_id), i)) != i}


def _assemble(prefix: Path, fmt: str, shards: Shards, ids: list, dim: int, repeats: dict[int, int], digests: list[str]) -> list[dict]:
    """Merge the shards into the final files, rows in input order (a later shard's row for an id
    wins); `repeats` (`_repeated_ids`) get error rows (NaN vectors), not the first item's row."""
    position = {_key(item_id): i for i, item_id in enumerate(ids) if i not in repeats}  # an id's first item
    records: list[dict | None] = [None] * len(ids)
    tmp_npy = Path(f"{prefix}.npy.tmp")
    vectors = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(len(ids), dim))
    for i, first in repeats.items():
        records[i] = {"index": i, "id": ids[i], "trace": "", "error": f"id {ids[i]!r} repeats the id of the item at index {first}: ids must be "
                      "unique (a run's rows are found by id)", "stop_reason": None, "prompt_tokens": 0, "trace_tokens": 0, "cached": None,
                      "input_digest": digests[i]}
        vectors[i] = np.nan
    for name in shards.names():
        shard_records, shard_vectors = shards.load(name, dim)
        for record, vector in zip(shard_records, shard_vectors):
            i = position.get(_key(record["id"]))
            if i is not None:
                records[i] = dict(record, index=i)
                vectors[i] = vector
    missing = [ids[i] for i, r in enumerate(records) if r is None]
    if missing:
        raise OutputConflict(f"{len(missing)} item(s) have no result in {shards.dir} (e.g. id {missing[0]!r}); re-run to finish them")
    vectors.flush()
    manifest = json.loads((shards.dir / MANIFEST).read_text())
    if fmt == "parquet":
        _write_parquet(Path(f"{prefix}.parquet"), records, vectors, manifest)
        del vectors
        tmp_npy.unlink()
    else:
        del vectors
        _atomic_write(Path(f"{prefix}.jsonl"), lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
        os.replace(tmp_npy, f"{prefix}.npy")
        _atomic_write(_final_manifest_path(prefix), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    shutil.rmtree(shards.dir)  # last: until it is gone, the parts (and their manifest) are what a re-run resumes from
    return records


def _write_parquet(path: Path, records: list[dict], vectors: np.ndarray, manifest: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {k: [r.get(k) for r in records] for k in dict.fromkeys(k for r in records for k in r)}  # rows of an older run may lack a field
    columns["id"] = [json.dumps(v) for v in columns.get("id", [])]  # ids may mix ints and strings: stored as JSON text
    types = {"error": pa.string(), "trace": pa.string(), "stop_reason": pa.string(), "cached": pa.string(), "input_digest": pa.string()}
    dim = vectors.shape[1]
    table = pa.table({**{k: pa.array(v, type=types.get(k)) for k, v in columns.items()},
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors).reshape(-1)), dim)})
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_MANIFEST_KEY: json.dumps(manifest).encode()})
    _atomic_write(path, lambda f: pq.write_table(table, f))


if __name__ == "__main__":
    sys.exit(main())
