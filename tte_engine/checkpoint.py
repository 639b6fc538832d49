"""Finding a checkpoint: a directory path, or an alias resolved offline.

Aliases (`tiny-random`, `unified-2b`, ...) resolve to `$TTE_HOME/models/<alias>`; the random
aliases are generated there on first use. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .random_checkpoint import SPECS, ensure_random_alias, tte_home


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a checkpoint: it has no config.json")
        return path.resolve()
    name = str(name_or_path)
    if name in SPECS:
        return ensure_random_alias(name)
    local = tte_home() / "models" / name
    if (local / "config.json").exists():
        return local
    raise CheckpointError(
        f"checkpoint {name!r} not found: it is not a directory and not in {local.parent} "
        f"(place a Hugging Face Qwen2-VL checkpoint directory at {local}, or pass a path; "
        f"built-in random aliases: {', '.join(sorted(SPECS))})"
    )


def fingerprint(path: str | Path, *, sample_bytes: int = 1 << 16, samples: int = 32) -> str:
    """A content hash of a checkpoint directory, cheap enough to take on every load.

    Files up to 16 MiB are hashed whole; larger ones (weights) by their size plus `samples`
    evenly spaced windows of `sample_bytes`, which tells apart any two real or random checkpoints.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        with open(f, "rb") as handle:
            if size <= 16 << 20:
                h.update(handle.read())
                continue
            for k in range(samples):
                handle.seek((size - sample_bytes) * k // (samples - 1))
                h.update(handle.read(sample_bytes))
    return h.hexdigest()
