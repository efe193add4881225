"""The walkthrough notebook (notebooks/walkthrough.ipynb) runs top to bottom on tiny data.

The notebook reads its sizes from ``CMD_NB_*`` environment variables; the kernel inherits
this process's environment, and its working directory is ``tmp_path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def _text(cell) -> str:
    """stdout and text/plain of a code cell's outputs."""
    parts = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream" and o["name"] == "stdout":
            parts.append(o["text"])
        elif o["output_type"] in ("execute_result", "display_data"):
            parts.append(o["data"].get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_is_clean() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "CMD_NB_EPOCHS" in code[0].source


@pytest.mark.slow
def test_walkthrough_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("sklearn")
    from jupyter_client.kernelspec import find_kernel_specs

    # ipykernel provides the native "python3" kernel; its argv starts with "python", which
    # jupyter_client replaces with sys.executable, so the kernel runs in this interpreter
    assert "python3" in find_kernel_specs()

    out = tmp_path / "out"
    env = {
        "CMD_NB_EPOCHS": "6",
        "CMD_NB_MODES": "3",
        "CMD_NB_SAMPLES": "200",
        "CMD_NB_SWEEP_MODES": "1,3",
        "CMD_NB_SWEEP_SEEDS": "0,1",
        "CMD_NB_RUNTIME": "threads",
        "CMD_NB_OUT": str(out),
        # a tiny model: one intra-op thread trains as fast and does not spin on a busy machine
        "OMP_NUM_THREADS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # `workflows` and `pipeline` are importable from any cwd with the editable install; make
    # it so without one too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys, os\nprint(sys.prefix)\nprint(os.getcwd())")
    nb.cells.append(probe)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert all(c.execution_count is not None for c in code)
    prefix, cwd = _text(nb.cells[-1]).split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()  # the kernel runs in this venv
    assert Path(cwd).resolve() == tmp_path.resolve()

    text = "\n".join(_text(c) for c in code)
    # ingest + info, the fit's mode table, the GD vs CMD table with the sweep
    assert "N parameters: 13,706" in text
    assert "T epochs:     7  [0-6]" in text
    assert "analysis 'walk' (fitted)" in text
    assert "GD acc" in text and "CMD acc" in text
    assert "sweep over seeds [0, 1]" in text and "MSE at epoch 6" in text
    # reconstruction checks printed by the notebook
    assert "epoch 6: GD  test acc" in text
    assert "same tensors as pipeline.state_dict: True" in text
    assert "references reconstructed exactly: True" in text
    assert "equal to level + a·(r_mode(t) - r_mode(anchor)): True" in text

    # the report: a self-contained page with its figures, copied to OUT
    html = out / "walk.html"
    assert html.is_file() and html.stat().st_size > 10_000
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert (out / "store.zarr" / "analyses" / "walk" / "report" / "report.html").is_file()
    figures = out / "store.zarr" / "analyses" / "walk" / "report" / "figures"
    pngs = {p.name for p in figures.glob("*.png")}
    assert {"correlation.png", "mode_bands.png", "samples.png", "accuracy.png", "sweep.png"} <= pngs
    for p in figures.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "cmd_epoch_6.safetensors").is_file()

    # figures inline: the report's PNGs and the custom matplotlib plot
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6
    assert any("Figure" in o["data"].get("text/plain", "") for o in images)
