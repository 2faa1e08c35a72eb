"""``OUT/scores.csv`` of ``legrad explain``: one row per overlay in the folder, merged across runs, safe to open
in a spreadsheet; ``OUT/scores.jsonl`` beside it holds the same rows with the raw values, for programs.

Prompts, image paths, class labels and VLM answers are user text: a cell that starts with ``=``, ``+``,
``-``, ``@``, a tab or a carriage return would run as a formula in a spreadsheet (CSV injection). Such a text
cell is written with a single quote ``'`` in front (OWASP's advice), and so is a cell that already starts
with quotes followed by one of those characters, so that reading the file back (a rerun merges its rows)
removes exactly the quote that was added. Numbers stay numbers: a score of ``-0.5`` is written ``-0.500000``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from legrad.io.outdir import LinkInFolderError, is_file_in_folder, open_in_folder, write_in_folder

__all__ = ["COLUMNS", "JSONL_NAME", "ScoresFile", "spreadsheet_cell", "spreadsheet_value"]

#: Columns, in file order; files of earlier versions lack ``overlay``.
COLUMNS = ("image", "prompt", "similarity", "probability", "overlay")
#: The sidecar of ``scores.csv`` with the same rows and the raw values (one JSON object per line).
JSONL_NAME = "scores.jsonl"
_REQUIRED = COLUMNS[:4]
_NUMBERS = ("similarity", "probability")
_MAX_BYTES = 1 << 30
#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _needs_quote(text: str) -> bool:
    # Leading quotes count too: "'=x" gets one more, so that reading strips exactly what writing added.
    return text.lstrip("'").startswith(_FORMULA_START)


def spreadsheet_cell(text: str, number: bool = False) -> str:
    """``text`` as written to ``scores.csv``: a quote in front of a text cell a spreadsheet would run.

    Args:
        text: the raw value.
        number: a numeric column: a value that parses as a number (``-0.500000``) is written as is.
    """
    if number and _is_number(text):
        return text
    return "'" + text if _needs_quote(text) else text


def spreadsheet_value(cell: str) -> str:
    """The raw value of a ``scores.csv`` cell: the inverse of :func:`spreadsheet_cell`."""
    return cell[1:] if cell.startswith("'") and _needs_quote(cell[1:]) else cell


def _json_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class ScoresFile:
    """The rows of ``scores.csv``: those already there, updated by this run's, written atomically.

    A new row replaces the old one of the same overlay file (the overlay was redrawn). Old rows whose overlay
    file is gone are dropped (they describe nothing); rows of files written before overlays were recorded
    (no ``overlay`` column) are replaced by a new row of the same ``(image, prompt)`` pair. All other old
    rows stay, since their overlays stay too: ``scores.csv`` describes exactly the overlays in the folder.
    Each write also rewrites ``scores.jsonl`` (:data:`JSONL_NAME`) beside it from the same rows.

    Neither file is read or written through a symbolic link (see :func:`legrad.io.outdir.open_in_folder`).

    Args:
        path: the CSV file (it need not exist).

    Raises:
        ValueError: if ``path`` (or its ``scores.jsonl``) exists but is not a readable scores file, or is a
            symbolic link (checked before any work, so that a file of someone else's is never overwritten).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.folder = self.path.parent
        self._old: list[dict[str, str]] = []
        self._new: dict[str, dict[str, str]] = {}  # overlay -> row, in the order they were written
        self._dirty = False
        self._check_sidecar()
        text = self._read(self.path.name)
        if text is None:
            return
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            header = reader.fieldnames or []
            rows = list(reader)
        except csv.Error as exc:
            raise ValueError(f"{self.path} exists but cannot be read as a scores file ({exc}); move it away "
                             "or choose another --out") from None
        if not set(_REQUIRED) <= set(header):
            raise ValueError(f"{self.path} exists but is not a legrad scores file (columns {header}, expected "
                             f"{list(COLUMNS)}); move it away or choose another --out")
        old = [{c: spreadsheet_value(r.get(c) or "") for c in COLUMNS} for r in rows]
        self._old = [r for r in old if not r["overlay"] or is_file_in_folder(self.folder, r["overlay"])]
        self._dirty = len(self._old) != len(old)

    def _read(self, name: str) -> str | None:
        """The text of ``folder/name`` (None if there is none); messages never quote a byte of it."""
        where = self.folder / name
        try:
            with open_in_folder(self.folder, name) as fh:
                data = fh.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except LinkInFolderError as exc:
            raise ValueError(exc.strerror) from None
        except OSError as exc:
            raise ValueError(f"{where} cannot be read as a scores file ({exc.strerror or exc}); move it away or "
                             "choose another --out") from None
        if len(data) > _MAX_BYTES:
            raise ValueError(f"{where} is larger than {_MAX_BYTES} bytes: not a legrad scores file; move it away "
                             "or choose another --out")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where} exists but is not UTF-8 text, so not a legrad scores file; move it away or "
                             "choose another --out") from None

    def _check_sidecar(self) -> None:
        """Refuses a ``scores.jsonl`` that is not ours (it is rewritten from ``scores.csv``'s rows)."""
        text = self._read(JSONL_NAME)
        if text is None:
            return
        for line in text.splitlines():
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:
                row = None
            if not isinstance(row, dict) or (row and not set(_REQUIRED) <= set(row)):
                raise ValueError(f"{self.folder / JSONL_NAME} exists but is not a legrad scores file; move it "
                                 "away or choose another --out")

    def add(self, image: str, prompt: str, similarity: float, probability: float, overlay: str) -> None:
        """Records the row of one overlay (``overlay``: its path relative to the folder of ``scores.csv``)."""
        self._new.pop(overlay, None)  # rewritten in this run: keep the latest, last
        self._new[overlay] = {"image": image, "prompt": prompt, "similarity": f"{similarity:.6f}",
                              "probability": f"{probability:.6f}", "overlay": overlay}
        self._dirty = True

    def rows(self) -> list[dict[str, str]]:
        """The merged rows (raw values): old ones not redrawn by this run, then this run's in the order written."""
        pairs = {(r["image"], r["prompt"]) for r in self._new.values()}
        kept = [r for r in self._old if r["overlay"] not in self._new
                and (r["overlay"] or (r["image"], r["prompt"]) not in pairs)]
        return kept + list(self._new.values())

    def flush(self) -> None:
        """Writes the merged rows atomically (``scores.jsonl``, then ``scores.csv``) if anything changed since
        the last flush.

        Raises:
            OSError: if a file cannot be written (the previous one then stays as it was).
        """
        if not self._dirty:
            return
        rows = self.rows()
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: spreadsheet_cell(r[c], c in _NUMBERS) for c in COLUMNS} for r in rows)
        lines = [json.dumps(_raw(r), allow_nan=False) + "\n" for r in rows]
        with write_in_folder(self.folder, JSONL_NAME) as fh:
            fh.write("".join(lines).encode("utf-8"))
        with write_in_folder(self.folder, self.path.name) as fh:
            fh.write(buf.getvalue().encode("utf-8"))
        self._dirty = False


def _raw(row: dict[str, str]) -> dict[str, Any]:
    """A row for ``scores.jsonl``: the text as is, the scores as numbers (null where not a finite number)."""
    return {c: _json_number(row[c]) if c in _NUMBERS else row[c] for c in COLUMNS}
