"""Logging for the front ends (CLI, playground, app); library code only logs, it never configures logging."""

from __future__ import annotations

import logging

__all__ = ["configure_logging", "DropOpenClipChatter"]


class DropOpenClipChatter(logging.Filter):
    """Drops open_clip's own log lines (it logs download failures and random-init notices on the root
    logger), which front ends replace by their one-line messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/open_clip/" not in record.pathname.replace("\\", "/")


def configure_logging(verbose: bool = False) -> None:
    """Logging for the front ends (CLI, playground, app): warnings (info with ``verbose``) on stderr, and
    open_clip's root-logger messages hidden unless ``verbose``. Not for library use."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, DropOpenClipChatter) for f in handler.filters):
                handler.addFilter(DropOpenClipChatter())
