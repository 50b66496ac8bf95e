"""The tutorial as a marimo notebook (examples/407_rlhf_pipeline.py) runs headless, top to bottom."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "407_rlhf_pipeline.py"


@pytest.mark.skipif(
    shutil.which("marimo", path=str(Path(sys.executable).parent)) is None,
    reason="marimo is not installed (pip install -e '.[notebook]')",
)
def test_tutorial_notebook_runs_headless_and_shows_each_stages_curves(tiny_model_dir, tmp_path):
    out = tmp_path / "notebook.html"
    env = {
        **os.environ,
        "RLHFKIT_TUTORIAL_MODEL": tiny_model_dir,
        "RLHFKIT_TUTORIAL_LOG_ROOT": str(tmp_path / "run"),
        "RLHFKIT_TUTORIAL_STEPS": "2",
    }
    marimo = str(Path(sys.executable).parent / "marimo")
    result = subprocess.run(
        [marimo, "-q", "export", "html", str(NOTEBOOK), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    html = out.read_text()
    for stage in (
        "Stage 1 (SFT) complete",
        "Stage 2 (Preference Model) complete",
        "Stage 3 (RL) complete",
        "=== RLHF Model ===",
    ):
        assert stage in html
    assert html.count("data:image/png;base64") >= 3  # the three stages' curves, shown as pictures
    for stage in ("sft", "rm", "rl"):
        assert (tmp_path / "run" / stage / "checkpoints" / "final" / "sampler").is_dir()
