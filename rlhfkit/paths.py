"""Where rlhfkit finds the offline data and keeps its caches."""

from __future__ import annotations

from pathlib import Path

from rlhfkit import environment

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The offline data folder: $RLHFKIT_DATA_DIR, else ../shared/data beside the repository or the cwd."""
    env = environment.get("RLHFKIT_DATA_DIR")
    if env:
        return Path(env)
    for root in (_REPO_ROOT, Path.cwd()):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return _REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Cache for converted models: $RLHFKIT_CACHE_DIR, else ~/.cache/rlhfkit."""
    env = environment.get("RLHFKIT_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "rlhfkit"
    path.mkdir(parents=True, exist_ok=True)
    return path
