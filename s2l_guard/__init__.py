"""s2l-guard: audit text-to-image diffusion models for Shake-to-Leak privacy leakage."""

__version__ = "0.1.0"


def _quiet_library_progress_bars() -> None:
    """diffusers/transformers print a bar per save/load; ours already show the long work."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - both are hard dependencies
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
