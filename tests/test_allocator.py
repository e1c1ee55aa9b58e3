"""train.py fixes glibc's malloc thresholds unless the user set them (see allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def keep_freed_memory_in_a_fresh_process(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    return subprocess.run(
        [sys.executable, "-c",
         "from livetrain.trainer.allocator import keep_freed_memory as k; print(k())"],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=True,
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_thresholds_are_set_on_glibc() -> None:
    assert keep_freed_memory_in_a_fresh_process() == "True"


@pytest.mark.parametrize("env", [
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
])
def test_the_users_own_malloc_settings_stand(env: dict[str, str]) -> None:
    assert keep_freed_memory_in_a_fresh_process(**env) == "False"
