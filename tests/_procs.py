"""Processes of this machine, for tests that check that a job left none behind."""

from __future__ import annotations

import os


def processes_with(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. a job's run folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found
