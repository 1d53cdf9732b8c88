"""Where a run happens and what it tells the user: the device and the log line."""

from __future__ import annotations

import torch

from .errors import ConfigError


def log(message: str) -> None:
    print(f"[s2l-guard] {message}", flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when torch sees it; naming an absent device is a config error."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "cpu")
    if not available.get(name, False):
        raise ConfigError(f"[run] device = {name!r} but torch sees no such device; use device = 'auto' or 'cpu'")
    return torch.device(name)
