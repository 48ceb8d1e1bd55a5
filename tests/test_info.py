"""`diffseg info` and the import-time promises of the user-facing modules."""
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import diffseg
from diffseg import info as info_module
from diffseg.cli import main


def _fake_bundle(folder, meta):
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "diffseg_bundle.pt", "w") as z:
        z.writestr("diffseg_bundle/extra/diffseg.json", json.dumps(meta))
        z.writestr("diffseg_bundle/data.pkl", b"x" * 100)


def test_info_dict(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path))
    _fake_bundle(tmp_path / "m1", {"model_id": "some/model", "image_size": 512, "device": "cpu",
                                   "dtype": "float32", "torch_version": "2.13.0"})
    (tmp_path / "empty").mkdir()
    d = info_module.info()
    assert d["diffseg"] == diffseg.__version__
    assert d["core"]["threads"] == diffseg.get_num_threads()
    assert d["core"]["gemm"] in ("builtin", "blas")
    assert isinstance(d["core"]["openmp"], bool)
    assert d["packages"]["numpy"]
    assert d["cache"] == str(tmp_path)
    assert [b["model_id"] for b in d["bundles"]] == ["some/model"]
    assert d["bundles"][0]["image_size"] == 512
    text = info_module.format_info(d)
    assert "OpenMP" in text and "some/model" in text and "libtorch shim" in text
    json.dumps(d)


def test_info_cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "none"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"diffseg {diffseg.__version__}" in out and "no bundles" in out
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bundles"] == [] and "torch" in d


def test_bundle_metadata_of_a_real_bundle(tiny_bundle):
    meta = info_module.bundle_metadata(tiny_bundle)
    assert meta["image_size"] == 128 and meta["format"] == "diffseg-bundle"
    assert info_module.bundle_metadata(Path(tiny_bundle).parent / "metadata.json") is None


def test_cli_modules_import_light():
    """Building the parser (all subcommands) must not import torch, diffusers or matplotlib."""
    code = ("import sys; import diffseg.cli as c; c.build_parser(); import diffseg.viz, diffseg.io.records; "
            "bad = [m for m in ('torch', 'diffusers', 'matplotlib', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(Path(diffseg.__file__).parents[1]), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"diffseg {diffseg.__version__}\n"
    from diffseg._version import __version__

    assert diffseg.__version__ == __version__ and re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)
