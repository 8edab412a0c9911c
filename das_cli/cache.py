"""Where converted models live between runs: $DAS_CLI_CACHE, else ~/.cache/das-cli."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("DAS_CLI_CACHE") or Path.home() / ".cache" / "das-cli"
    return Path(root)
