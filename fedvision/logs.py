"""One log format for fedvision's own messages, wherever they run (CLI, ServerApp, ClientApp actors)."""

import logging
import sys

PREFIX = "fedvision"


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one stderr handler to the ``fedvision`` logger (idempotent: Flower may import apps twice)."""
    logger = logging.getLogger(PREFIX)
    logger.setLevel(level)
    logger.propagate = False  # Flower's root handlers would print every line a second time
    if not any(getattr(h, "_fedvision", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler._fedvision = True
        logger.addHandler(handler)
