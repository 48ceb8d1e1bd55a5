"""notebooks/quickstart.ipynb runs top to bottom: with the tiny random-weight
bundle, and with planted attention (no model)."""
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _run(model, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("DIFFSEG_QUICKSTART_MODEL", model)
    monkeypatch.setenv("DIFFSEG_QUICKSTART_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    return text, images


@pytest.mark.reliability  # slow: `make test-reliability`
def test_notebook_tiny_model(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("diffseg._torch")
    text, images = _run(str(tiny_bundle), tmp_path, monkeypatch)
    assert "diffseg.Model" in text
    assert "Warning" not in text
    assert "exit status 0" in text
    assert "pixel accuracy" in text
    assert images >= 4
    assert (tmp_path / "out" / "segments" / "scene0.json").is_file()


def test_notebook_planted(tmp_path, monkeypatch):
    text, images = _run("planted", tmp_path, monkeypatch)
    assert "model: None" in text and "no model: skipped" in text
    assert "Warning" not in text  # no third-party warnings in the outputs
    assert "-> 1 segments" not in text
    assert images >= 4
    # planted attention: the segments are found
    line = next(l for l in text.splitlines() if "pixel accuracy" in l)
    assert float(line.split("pixel accuracy")[1].split("%")[0]) > 90
