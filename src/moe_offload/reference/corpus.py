"""The reference model's text: the King James Bible from the Debian package `bible-kjv-text`.

The package (public domain text, Debian main) ships a compressed data file read by the `bible`
program of the `bible-kjv` package; `bible "Gen1:1-Rev22:21"` prints the whole text, chapter by
chapter. Each chapter becomes one document of flowing text (verse numbers dropped). Every 20th
chapter is held out, so the held-out split spans the whole book in the same style as training.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from ..errors import MoeOffloadError

HELD_OUT_EVERY = 20  # chapter i is held out when i % 20 == 19
INSTALL_HINT = "sudo apt-get install -y bible-kjv-text bible-kjv   (Debian/Ubuntu, public domain text)"
_HEADING = re.compile(r"^[1-3A-Z][A-Za-z0-9 ]* \d+$")  # "1 Samuel 3", at the start of a line
_VERSE = re.compile(r"^\s*\d+ ")


def raw_text() -> str:
    """The whole text as the `bible` program prints it; a clear error if it is not installed."""
    exe = shutil.which("bible")
    if exe is None or not Path("/usr/lib/bible.data").is_file():
        raise MoeOffloadError(f"the King James Bible text is not installed; install it with:\n  {INSTALL_HINT}")
    out = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, check=False,
                         env={"COLUMNS": "1000", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0 or len(out.stdout) < 1_000_000:
        raise MoeOffloadError(f"`bible` printed {len(out.stdout)} characters (expected ~4 MB): {out.stderr[:200]}")
    return out.stdout


def chapters(text: str) -> list[str]:
    """One string per chapter: its verses joined into paragraphs of flowing text."""
    docs, verses = [], []
    for line in text.splitlines():
        if _HEADING.match(line):
            if verses:
                docs.append(" ".join(verses))
            verses = []
        elif _VERSE.match(line):
            verses.append(_VERSE.sub("", line, count=1).strip())
        elif line.strip() and verses:  # a verse wrapped onto the next line
            verses[-1] += " " + line.strip()
    if verses:
        docs.append(" ".join(verses))
    return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out): every HELD_OUT_EVERY-th chapter is held out."""
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def load_split() -> tuple[list[str], list[str]]:
    return split(chapters(raw_text()))


def prompts(docs: list[str], words: int = 8) -> list[str]:
    """The opening words of each document: prompts for traces that the model never trained on."""
    return [" ".join(d.split()[:words]) for d in docs]
