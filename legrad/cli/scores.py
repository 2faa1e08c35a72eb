"""``OUT/scores.csv`` of ``legrad explain``: one row per overlay in the folder, merged across runs."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from legrad.io.files import atomic_writer, read_regular_file

#: Columns, in file order; files of earlier versions lack ``overlay``.
COLUMNS = ("image", "prompt", "similarity", "probability", "overlay")
_REQUIRED = COLUMNS[:4]
_MAX_BYTES = 1 << 30


class ScoresFile:
    """The rows of ``scores.csv``: those already there, updated by this run's, written atomically.

    A new row replaces the old one of the same overlay file (the overlay was redrawn). Old rows whose overlay
    file is gone are dropped (they describe nothing); rows of files written before overlays were recorded
    (no ``overlay`` column) are replaced by a new row of the same ``(image, prompt)`` pair. All other old
    rows stay, since their overlays stay too: ``scores.csv`` describes exactly the overlays in the folder.

    Args:
        path: the CSV file (it need not exist).

    Raises:
        ValueError: if ``path`` exists but is not a readable scores file (checked before any work, so
            that a file of someone else's is never overwritten).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._old: list[dict[str, str]] = []
        self._new: dict[str, dict[str, str]] = {}  # overlay -> row, in the order they were written
        self._dirty = False
        if not os.path.lexists(self.path):
            return
        try:
            text = read_regular_file(self.path, "scores file", _MAX_BYTES).decode("utf-8")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            header = reader.fieldnames or []
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{self.path} exists but cannot be read as a scores file ({exc}); move it away "
                             "or choose another --out") from None
        if not set(_REQUIRED) <= set(header):
            raise ValueError(f"{self.path} exists but is not a legrad scores file (columns {header}, expected "
                             f"{list(COLUMNS)}); move it away or choose another --out")
        old = [{c: (r.get(c) or "") for c in COLUMNS} for r in rows]
        self._old = [r for r in old if not r["overlay"] or self._exists(r["overlay"])]
        self._dirty = len(self._old) != len(old)

    def _exists(self, overlay: str) -> bool:
        try:
            return (self.path.parent / overlay).is_file()
        except (OSError, ValueError):  # e.g. a name too long or with a NUL byte
            return False

    def add(self, image: str, prompt: str, similarity: float, probability: float, overlay: str) -> None:
        """Records the row of one overlay (``overlay``: its path relative to the folder of ``scores.csv``)."""
        self._new.pop(overlay, None)  # rewritten in this run: keep the latest, last
        self._new[overlay] = {"image": image, "prompt": prompt, "similarity": f"{similarity:.6f}",
                              "probability": f"{probability:.6f}", "overlay": overlay}
        self._dirty = True

    def rows(self) -> list[dict[str, str]]:
        """The merged rows: old ones not redrawn by this run, then this run's in the order written."""
        pairs = {(r["image"], r["prompt"]) for r in self._new.values()}
        kept = [r for r in self._old if r["overlay"] not in self._new
                and (r["overlay"] or (r["image"], r["prompt"]) not in pairs)]
        return kept + list(self._new.values())

    def flush(self) -> None:
        """Writes the merged rows atomically if anything changed since the last flush.

        Raises:
            OSError: if the file cannot be written (the previous one then stays as it was).
        """
        if not self._dirty:
            return
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(self.rows())
        with atomic_writer(self.path) as fh:
            fh.write(buf.getvalue().encode("utf-8"))
        self._dirty = False
