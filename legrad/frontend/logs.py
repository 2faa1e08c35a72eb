"""Logging for the front ends (CLI, playground, app); library code only logs, it never configures logging."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure_logging", "DropOpenClipChatter", "quiet_third_party_progress"]


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


def quiet_third_party_progress() -> None:
    """Turns off the model libraries' progress bars for this process (a front end's ``-q``): Hugging Face
    Hub downloads, transformers' weight loading, and any other tqdm bar. Not for library use (it sets
    process-wide environment variables and library switches)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub (and transformers) at import
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 takes TQDM_* variables as argument defaults
    # Libraries imported already have read the variables: switch them off directly (no new imports).
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
