"""docs/reproduce.md: every `diffseg eval --preset` command in it runs, on fake
dataset layouts with the tiny random-weight bundle (no weights or datasets can
be downloaded here), and a preset sets the paper's settings and model."""
import json
import re
import shlex
from pathlib import Path

import pytest

from diffseg import cli
from diffseg.cli import _common
from test_datasets import make_cityscapes, make_coco

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


def doc_commands():
    """The `diffseg eval --preset ...` lines of the document's code blocks."""
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("diffseg eval --preset")]


@pytest.fixture
def layouts(tmp_path):
    make_coco(tmp_path / "coco", layout="stego", shape=(64, 96))
    make_cityscapes(tmp_path / "cityscapes", shape=(64, 128))
    return tmp_path


def test_the_document_has_one_command_per_published_number():
    commands = doc_commands()
    assert any("--preset coco-stuff-27" in c and "--limit" not in c for c in commands)
    assert any("--preset cityscapes" in c and "--limit" not in c for c in commands)
    text = DOC.read_text()
    for number in ("72.5", "43.6", "21.2"):
        assert number in text


@pytest.mark.parametrize("command", doc_commands())
def test_document_commands_run_on_fake_layouts(command, layouts, tiny_bundle, capsys):
    argv = shlex.split(command)[1:]
    argv = [a.replace("data/", f"{layouts}/").replace("results/", f"{layouts}/results/") for a in argv]
    argv += ["--model", str(tiny_bundle), "--no-progress"] + ([] if "--limit" in argv else ["--limit", "2"])
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = Path(argv[argv.index("-o") + 1])
    results = json.loads((out / "results.json").read_text())
    preset = argv[argv.index("--preset") + 1]
    settings = results["settings"][0]["settings"]
    assert settings["kl_threshold"] == ([1.1] * 3 if preset == "coco-stuff-27" else [0.9] * 3)
    assert (settings["grid"], settings["timestep"], settings["frame"], settings["refine"]) == (16, 300, "crop", False)
    assert results["dataset"]["name"] == preset and results["dataset"]["decoder"] == "official"
    limit = int(argv[argv.index("--limit") + 1])
    assert results["images"] == min(limit, 3) and results["protocol"] == "per-image"  # 3 images in each layout


def test_preset_takes_the_papers_model_and_yields_to_options(layouts, monkeypatch, capsys):
    seen = []

    def open_model(args, **kw):
        seen.append(args.model)
        raise _common.UserError("stop here")

    monkeypatch.setattr(_common, "open_model", open_model)
    root = str(layouts / "coco")
    assert cli.main(["eval", "--preset", "coco-stuff-27", "--root", root, "-o", str(layouts / "o1")]) == 2
    assert seen == ["CompVis/stable-diffusion-v1-4"]
    assert cli.main(["eval", "--preset", "coco-stuff-27", "--root", root, "--model", "mine", "-o",
                     str(layouts / "o2")]) == 2
    assert seen[-1] == "mine"
    assert cli.main(["eval", "--preset", "cityscapes", "--dataset", "coco-stuff-27", "--root", root]) == 2
    assert "--preset cityscapes evaluates --dataset cityscapes" in capsys.readouterr().err
