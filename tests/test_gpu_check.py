"""scripts/gpu-check where there is no GPU: exit status 2 and one clear line, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"


def test_gpu_check_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: run scripts/gpu-check itself for the real check")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = subprocess.run([str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no CUDA device here")
    assert "derive" in lines[0] and "validation checks" in lines[0] and "bench" in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists()
