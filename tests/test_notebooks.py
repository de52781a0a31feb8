"""Every Colab notebook runs top to bottom on CPU, with small settings.

Cells tagged ``install`` (Colab's pip line) are skipped; the assignments in
``OVERRIDES`` run right after the cell tagged ``parameters`` (papermill's
convention). The notebooks assert their own results (padded == unpadded,
streaming == whole sequence; charlm: a falling loss and a validation loss below a uniform guess's; g2p: beam-search
log-probabilities == teacher-forced ones, a greedy PER below 50% and a
halved development loss; forecasting: a test RMSE below seasonal naive's);
each runs as a script in a fresh process, so its JAX settings stay its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
OVERRIDES = {
    "quickstart": "B, T, F, H = 3, 12, 5, 8",
    "charlm_tpu": "hidden, layers_, seq_len, steps, streams_per_device = 32, 1, 16, 12, 4",
    # One length bucket: a single compilation of the train step (each takes ~20 s on 2 cores).
    "g2p": "hidden, decoder_hidden, embed, batch, minutes, steps, test_words, beam, buckets = "
           "32, 64, 16, 64, None, 400, 200, 3, ((32, 32),)",
    "forecasting": "hidden, layers_, batch, steps, learning_rate = 32, 1, 32, 200, 1e-2",
}


def script(path: Path) -> str:
    """The notebook's code cells as one script, install cells left out, overrides after the parameters."""
    cells = json.loads(path.read_text())["cells"]
    parts, tagged = [], False
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        if "install" in tags:
            continue
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), (
            f"{path.name}: shell or magic lines belong in a cell tagged 'install'")
        parts.append(source)
        if "parameters" in tags:
            parts.append(OVERRIDES[path.stem])
            tagged = True
    assert tagged, f"{path.name} has no cell tagged 'parameters'"
    return "\n\n".join(parts) + "\n"


def test_every_notebook_has_small_settings():
    assert {p.stem for p in NOTEBOOKS} == set(OVERRIDES)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem == "g2p" else p for p in NOTEBOOKS],
                         ids=[p.stem for p in NOTEBOOKS])  # g2p: a minute; its recipe is tested in test_g2p
def test_notebook_runs_top_to_bottom(path, tmp_path):
    code = tmp_path / f"{path.stem}.py"
    code.write_text(script(path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, str(code)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
