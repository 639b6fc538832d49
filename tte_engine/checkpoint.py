"""Finding a checkpoint: a directory path, or an alias resolved offline.

Aliases (`tiny-random`, `unified-2b`, ...) resolve to `$TTE_HOME/models/<alias>`; the random
aliases are generated there on first use. Named model aliases (and plain `org/name` repo ids)
are also looked up in the local Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`), offline.
Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import bad_field, is_int, is_number, read_json_object
from .errors import CheckpointError
from .random_checkpoint import SPECS, ensure_random_alias, tte_home

# Model aliases and the Hugging Face repos whose cached snapshots may stand for them.
HF_ALIASES: dict[str, tuple[str, ...]] = {
    "unified-2b": ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-2B"),
    "unified-7b": ("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-7B"),
}


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment on every call (no network, no
    import cost), absolute (as `tte_home`)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser().absolute() / "hub"


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` (the one refs/main points at, else the newest) with a config.json, or None."""
    root = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = root / "snapshots"
    ref = root / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if (pinned / "config.json").exists():
            return pinned
    if snapshots.is_dir():
        found = sorted((d for d in snapshots.iterdir() if (d / "config.json").exists()), key=lambda d: d.stat().st_mtime)
        if found:
            return found[-1]
    return None


def _holds_checkpoint(path: Path) -> bool:
    """A Hugging Face checkpoint (config.json) or an engine directory (engine.json)."""
    return (path / "config.json").exists() or (path / "engine.json").exists()


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not _holds_checkpoint(path):
            # tte-export writes its targets other than native into subfolders (hf/, trtllm/, ...)
            inside = sorted(d.name for d in path.iterdir() if d.is_dir() and _holds_checkpoint(d))
            hint = f"; checkpoints inside it: {', '.join(str(path / d) for d in inside)}" if inside else ""
            raise CheckpointError(f"{path} is not a checkpoint: it has no config.json (nor an engine.json){hint}")
        return path.resolve()
    name = str(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")):
        raise CheckpointError(
            f"checkpoint directory {path} does not exist: pass a Hugging Face Qwen2-VL checkpoint directory, "
            f"or an alias (built-in random: {', '.join(sorted(SPECS))}; others are looked up in {tte_home() / 'models'})"
        )
    if name in SPECS:
        return ensure_random_alias(name)
    local = tte_home() / "models" / name
    if (local / "config.json").exists() or (local / "engine.json").exists():
        return local
    repos = HF_ALIASES.get(name, (name,) if name.count("/") == 1 else ())
    for repo in repos:
        cached = find_in_hf_cache(repo)
        if cached is not None:
            return cached
    looked = f"{local}" + (f" and the Hugging Face cache {hf_cache_dir()} (repos {', '.join(repos)})" if repos else "")
    raise CheckpointError(
        f"checkpoint {name!r} not found: no directory {path.absolute()}, nor an alias or cached repo of that name; looked in {looked}. "
        f"Place a Hugging Face Qwen2-VL checkpoint directory at {local}, or pass a path; "
        f"built-in random aliases: {', '.join(sorted(SPECS))}"
    )


# What an export writes next to the engine that the runtime never loads: the export's own report
# (timings, the output path, the export time) and the other targets' folders. A fingerprint leaves
# them out, so re-exporting the same checkpoint with the same options gives the same fingerprint.
NOT_LOADED_FILES = ("export_report.json",)
NOT_LOADED_DIRS = ("onnx", "trtllm")


def fingerprint(path: str | Path, *, sample_bytes: int = 1 << 16, samples: int = 32, exclude: tuple[str, ...] = ()) -> str:
    """A content hash of a checkpoint directory, cheap enough to take on every load.

    Files up to 16 MiB are hashed whole; larger ones (weights) by their size plus `samples`
    evenly spaced windows of `sample_bytes`, which tells apart any two real or random checkpoints.
    `exclude` names files (relative paths) left out, e.g. the embedding head for a trace cache key;
    the export artefacts in NOT_LOADED_FILES and the top-level NOT_LOADED_DIRS are always left out.
    """
    import hashlib

    root = Path(path)

    def hashed(f: Path) -> bool:
        rel = f.relative_to(root)
        return (f.is_file() and rel.as_posix() not in exclude and rel.as_posix() not in NOT_LOADED_FILES
                and not (len(rel.parts) > 1 and rel.parts[0] in NOT_LOADED_DIRS))

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in root.rglob("*") if hashed(p)):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}\0{size}\0".encode())
        with open(f, "rb") as handle:
            if size <= 16 << 20:
                h.update(handle.read())
                continue
            for k in range(samples):
                handle.seek((size - sample_bytes) * k // (samples - 1))
                h.update(handle.read(sample_bytes))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- aux files
PREPROCESSOR_CONFIG = "preprocessor_config.json"
GENERATION_CONFIG = "generation_config.json"
# A tokenizer loads from any one of these sets of files (fast tokenizers.json; slow byte-level BPE; sentencepiece).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_tokenizer_files(checkpoint: str | Path) -> None:
    """Raise CheckpointError when `checkpoint` holds no complete set of tokenizer files (transformers would
    otherwise build a one-token tokenizer from config.json, or fail with its own message)."""
    checkpoint = Path(checkpoint)
    if any(all((checkpoint / name).is_file() for name in files) for files in TOKENIZER_FILE_SETS):
        return
    wanted = " or ".join(" + ".join(files) for files in TOKENIZER_FILE_SETS)
    present = [n for files in TOKENIZER_FILE_SETS for n in files if (checkpoint / n).is_file()]
    raise CheckpointError(f"{checkpoint}: the tokenizer files are missing (need {wanted}"
                          + (f"; found only {', '.join(present)}" if present else "") + ")")


def check_preprocessor_json(checkpoint: str | Path) -> None:
    """Type-check `preprocessor_config.json` (absent: defaults) so it parses; the values' ranges and their
    fit to the model are checked on the parsed config (`inputs.check_image_config`). Raises CheckpointError
    naming the file and the field."""
    path = Path(checkpoint) / PREPROCESSOR_CONFIG
    raw = read_json_object(path)
    if raw is None:
        return
    size = raw.get("size")
    if size is not None and not isinstance(size, dict):
        raise bad_field(str(path), "size", "an object", size)
    fields = [(k, raw.get(k)) for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")]
    fields += [(f"size.{k}", (size or {}).get(k)) for k in ("shortest_edge", "longest_edge", "min_pixels", "max_pixels")]
    for name, value in fields:
        if value is not None and (not is_int(value) or value < 1):
            raise bad_field(str(path), name, "a positive integer", value)
    for name in ("image_mean", "image_std"):
        value = raw.get(name)
        if value is not None and not (isinstance(value, list) and value and all(is_number(x) for x in value)):
            raise bad_field(str(path), name, "a list of numbers", value)


def check_checkpoint_files(checkpoint: str | Path) -> None:
    """Check the files read before the model (tokenizer, image-processor config) so that a missing or
    malformed one raises CheckpointError naming it, not transformers' or the parser's own error."""
    check_tokenizer_files(checkpoint)
    check_preprocessor_json(checkpoint)
