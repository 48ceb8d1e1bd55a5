"""The command line's manners: one-line errors with exit status 2 before any
work, help on every argument, shared input handling, summaries on Ctrl-C,
no third-party warnings. Models are fakes (planted attention)."""
import argparse
import warnings

import numpy as np
import pytest
from PIL import Image

import diffseg
from diffseg import cli
from diffseg.cli import _common
from planted_model import PlantedModel as _PlantedModel


class PlantedModel(_PlantedModel):
    """Stands in for diffseg.Model (tests/planted_model.py); reads the image
    like the real one, and can raise KeyboardInterrupt on a given call (Ctrl-C)."""

    def __init__(self, interrupt_at=None):
        super().__init__()
        self.interrupt_at = interrupt_at

    def attention(self, image, timestep=None, frame="crop"):
        if self.calls + 1 == self.interrupt_at:
            self.calls += 1
            raise KeyboardInterrupt
        diffseg.load_image(image)
        return super().attention(image, timestep, frame)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(d / name)
    return d


def _use(monkeypatch, model):
    monkeypatch.setattr(_common, "open_model", lambda args, **kw: model)
    return model


def _one_error_line(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("argv, word", [
    (["segment", "x.png", "--timestep", "-5"], "--timestep"),
    (["segment", "x.png", "--grid", "0"], "--grid"),
    (["segment", "x.png", "--grid", "100"], "--grid"),
    (["segment", "x.png", "--iterations", "0"], "--iterations"),
    (["segment", "x.png", "--frame", "full"], "--frame"),
    (["segment", "x.png", "--vocabulary", "cat,Cat"], "--vocabulary"),
    (["eval", "--preset", "ade20k", "--root", "r"], "--preset"),
    (["eval", "--dataset", "folder", "--protocol", "stego", "--model", "m"], "--protocol stego"),
    (["segment", "x.png", "--kl-threshold", "0.9,-1"], "--kl-threshold"),
    (["segment", "x.png", "--threads", "-2"], "--threads"),
    (["attention", "x.png", "-o", "o", "--timestep", "abc"], "--timestep"),
    (["demo", "--segments", "0"], "--segments"),
    (["demo", "--kl-threshold", "x"], "--kl-threshold"),
    (["eval", "--dataset", "pascal", "--attention-dir", "a"], "--dataset"),
    (["eval", "--dataset", "folder", "--grid", "0", "--attention-dir", "a"], "--grid"),
    (["eval", "--dataset", "folder", "--limit", "0", "--attention-dir", "a"], "--limit"),
    (["export", "src", "out", "--size", "0"], "--size"),
])
def test_invalid_parameters_are_usage_errors(argv, word, capsys):
    assert cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, word, f"diffseg {argv[0]}: error")


def test_model_that_cannot_be_opened_is_exit_2(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    assert cli.main(["segment", str(photos), "-o", str(tmp_path / "o"), "--model", "nonexist_bundle"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "nonexist_bundle", "no such")
    assert "exporting" not in err

    from diffseg.sd import model as model_mod

    def broken(*a, **kw):
        raise RuntimeError("bundle: unexpected EOF\nsecond line of detail")

    monkeypatch.setattr(model_mod, "load_model", broken)
    for argv in (["segment", str(photos), "-o", str(tmp_path / "o")],
                 ["attention", str(photos), "-o", str(tmp_path / "o")]):
        assert cli.main(argv + ["--model", "b.pt"]) == 2
        _one_error_line(capsys.readouterr().err, "cannot open b.pt", "unexpected EOF second line")


def test_every_argument_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"diffseg {name} {action.option_strings or action.dest}: no help"


def test_kl_threshold_one_syntax():
    parser = cli.build_parser()
    for argv in (["segment", "x", "--kl-threshold", "0.9,1.0,1.1"], ["demo", "--kl-threshold", "0.9,1.0,1.1"],
                 ["eval", "--dataset", "folder", "--kl-threshold", "0.9,1.0,1.1"]):
        got = parser.parse_args(argv).kl_threshold
        assert (got if argv[0] != "eval" else got[0]) == (0.9, 1.0, 1.1)
    # several settings in eval: the option repeated, each one setting
    assert parser.parse_args(["eval", "--dataset", "folder", "--kl-threshold", "0.9", "--kl-threshold",
                              "0.9,1,1.1"]).kl_threshold == [0.9, (0.9, 1.0, 1.1)]
    with pytest.raises(SystemExit):  # not two settings: an unknown argument
        parser.parse_args(["eval", "--dataset", "folder", "--kl-threshold", "0.9", "1.1"])


@pytest.mark.parametrize("argv", [["segment", "{photos}"], ["demo"], ["eval", "--dataset", "folder", "--root", "{photos}",
                                                                     "--attention-dir", "{photos}"]])
def test_another_iteration_count_only_when_asked(argv, photos, tmp_path, monkeypatch, capsys):
    """Two values mean two iterations in every subcommand, and only with --iterations 2."""
    model = _use(monkeypatch, PlantedModel())
    argv = [a.format(photos=photos) for a in argv] + ["-o", str(tmp_path / "out"), "--kl-threshold", "0.9 1.0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--kl-threshold has 2 value(s) for 3 merge iterations" in err and "--iterations 2" in err
    assert model.calls == 0 and not (tmp_path / "out").exists()
    if argv[0] == "segment":
        assert cli.main(argv + ["--iterations", "2", "-q"]) == 0 and model.calls == 3


def test_threads_means_core_and_libtorch(photos, tmp_path, monkeypatch):
    """--threads goes to diffseg.set_num_threads (the C core and libtorch) in every subcommand."""
    import diffseg.core

    seen = []
    monkeypatch.setattr(diffseg.core, "set_num_threads", seen.append)
    _use(monkeypatch, PlantedModel())
    assert cli.main(["segment", str(photos), "-o", str(tmp_path / "s"), "--threads", "1", "-q"]) == 0
    assert cli.main(["attention", str(photos), "-o", str(tmp_path / "a"), "--threads", "2"]) == 0
    (photos / "labels").mkdir()
    for p in photos.glob("*.*"):
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(photos / "labels" / f"{p.stem}.png")
    assert cli.main(["eval", "--dataset", "folder", "--image-dir", str(photos), "--label-dir", str(photos / "labels"),
                     "--attention-dir", str(tmp_path / "a"), "--n-classes", "2", "--size", "16", "--grid", "4",
                     "--no-progress", "-o", str(tmp_path / "e"), "--threads", "3", "--decoder", "accurate"]) == 0
    assert seen == [1, 2, 3]


def test_threads_reach_libtorch(tiny_model, photos, tmp_path, monkeypatch):
    """--threads with the shim loaded: libtorch runs on that many threads too."""
    from diffseg import _torch

    before = diffseg.get_num_threads()
    _use(monkeypatch, tiny_model)
    monkeypatch.setattr(tiny_model, "close", lambda: None)  # the session's model stays open
    try:
        assert cli.main(["segment", str(photos), "-o", str(tmp_path / "s"), "--threads", "1", "-q"]) == 0
        assert _torch.get_num_threads() == 1 and diffseg.get_num_threads() == 1
    finally:
        diffseg.set_num_threads(before)


def test_output_folder_may_be_the_input_folder(photos, monkeypatch, capsys):
    model = _use(monkeypatch, PlantedModel())
    assert cli.main(["segment", str(photos), "-o", str(photos), "-q"]) == 0
    assert model.calls == 3 and (photos / "a.labels.png").is_file()
    inputs, problems = _common.collect_inputs([photos], exclude=photos)
    assert sorted(name for _, name in inputs) == ["a", "b", "c"] and not problems  # outputs are not inputs
    only_outputs = photos / "out"
    only_outputs.mkdir()
    (photos / "a.labels.png").rename(only_outputs / "a.labels.png")
    _, problems = _common.collect_inputs([only_outputs], exclude=only_outputs)
    assert problems and "diffseg output" in problems[0]


def test_attention_takes_folders_globs_and_skips_unreadable(photos, tmp_path, monkeypatch, capsys):
    _use(monkeypatch, PlantedModel())
    (photos / "broken.png").write_text("not an image")
    out = tmp_path / "attn"
    assert cli.main(["attention", str(photos), str(tmp_path / "none*.png"), "-o", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.npz", "b.npz", "c.npz"]
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err and "no files match" in err


@pytest.mark.parametrize("command", ["segment", "attention"])
def test_interrupt_prints_a_summary(command, photos, tmp_path, monkeypatch, capsys):
    _use(monkeypatch, PlantedModel(interrupt_at=2))
    argv = [command, str(photos), "-o", str(tmp_path / "o")] + (["-q"] if command == "segment" else [])
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1" in err, err


def test_eval_interrupt_prints_a_summary(tmp_path, monkeypatch, capsys):
    from diffseg.cli import eval as eval_cli

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "_open_dataset", lambda args, need_images: None)
    monkeypatch.setattr(eval_cli, "evaluate", interrupted)
    argv = ["eval", "--dataset", "folder", "--attention-dir", str(tmp_path), "-o", str(tmp_path / "o")]
    assert cli.main(argv) == 130
    assert "interrupted: 0 image(s) scored so far" in capsys.readouterr().err


def test_third_party_warnings_stay_out_of_the_cli(monkeypatch):
    from diffseg.cli import info as info_cli

    def noisy():
        warnings.warn("`resume_download` is deprecated", FutureWarning)
        warnings.warn_explicit("IProgress not found. Please update jupyter", UserWarning, "auto.py", 1,
                               module="tqdm.auto")
        warnings.warn_explicit("Failed to load image Python extension", UserWarning, "io.py", 1,
                               module="torchvision.io.image")
        return {}

    monkeypatch.setattr(info_cli, "info", noisy)
    monkeypatch.setattr(info_cli, "format_info", lambda d: "")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["info"]) == 0
        assert [str(w.message) for w in seen] == []
        noisy()  # library users still see them
        assert len(seen) == 3


def test_weights_message_speaks_cli():
    from diffseg.sd.checkpoint import _how_to_get_weights

    text = _how_to_get_weights("CompVis/stable-diffusion-v1-4")
    assert "diffseg segment IMAGES --model OUT" in text and "diffseg export" in text


@pytest.mark.parametrize("command", ["segment", "attention"])
def test_output_that_is_a_file_is_a_usage_error(command, photos, tmp_path, monkeypatch, capsys):
    model = _use(monkeypatch, PlantedModel())
    (tmp_path / "o").write_text("a file")
    assert cli.main([command, str(photos), "-o", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "is a file")
    assert model.calls == 0


def test_too_elongated_image_names_its_own_size(tmp_path, monkeypatch, capsys):
    """The whole frame's bound is reported with the image's own size and the CLI's option."""
    class Bounded(PlantedModel):
        def grids(self, height, width):  # as diffseg.Model: refuses frames past its bound
            if width > 40 * height:
                raise ValueError(f"a {height}x{width} image gives a grid above the bound")
            return [(height // 8, width // 8)]

    Image.fromarray(np.zeros((20, 2000, 3), np.uint8)).save(tmp_path / "strip.png")
    _use(monkeypatch, Bounded())
    assert cli.main(["segment", str(tmp_path / "strip.png"), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "2000x20 px (width x height) is too elongated" in err and "use --frame crop" in err
    assert "frame='crop'" not in err
    with pytest.raises(ValueError, match=r"2000x20 px .* use frame='crop'"):
        diffseg.segment(np.zeros((20, 2000, 3), np.uint8), Bounded())


def test_unwritable_output_folder_before_the_model(tmp_path, monkeypatch, capsys):
    """-o into a place that cannot hold a folder: one line, exit 2, no model opened."""
    model = _use(monkeypatch, PlantedModel())
    (tmp_path / "file").write_text("x")
    for out in ("/proc/nope", str(tmp_path / "file" / "sub"), str(tmp_path / "file")):
        assert cli.main(["segment", str(tmp_path), "-o", out, "-q"]) == 2
        _one_error_line(capsys.readouterr().err, "-o/--output")
    assert model.calls == 0
