"""Files are written through one helper (diffseg._util.atomic_path): a unique
temporary name in the target's folder, then os.replace. Concurrent writers of
one file never share a temporary file (a fixed name such as
``diffseg_bundle.pt.tmp`` let one process move or clobber another's)."""
import json
import os
import threading

import numpy as np
import pytest

from diffseg import _util
from diffseg.evaluation import runner
from diffseg.io.attention import save_attention
from diffseg.io.images import save_label_png


@pytest.fixture
def replaces(monkeypatch):
    """Record every os.replace (src, dst)."""
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((os.fspath(src), os.fspath(dst)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


WRITERS = {
    "attention": lambda p: save_attention(p / "x.npz", {2: np.eye(4, dtype=np.float32)}),
    "state": lambda p: runner._write_json(p / "state.json", {"a": 1}),
    "labels": lambda p: save_label_png(p / "x.labels.png", np.zeros((4, 4), np.int32)),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_unique_temporary_names_in_the_same_folder(name, tmp_path, replaces):
    WRITERS[name](tmp_path)
    WRITERS[name](tmp_path)
    (src1, dst1), (src2, dst2) = replaces
    assert dst1 == dst2 and src1 != src2
    assert os.path.dirname(src1) == os.path.dirname(dst1)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(dst1)]  # no temporary left behind


def test_another_writers_temporary_is_untouched(tmp_path):
    """A file at the old fixed temporary name (another process mid-write) survives."""
    for fixed in ("x.npz.tmp.npz", "state.json.tmp"):
        (tmp_path / fixed).write_text("another process's half-written file")
    WRITERS["attention"](tmp_path)
    WRITERS["state"](tmp_path)
    for fixed in ("x.npz.tmp.npz", "state.json.tmp"):
        assert (tmp_path / fixed).read_text() == "another process's half-written file"


def test_concurrent_writers_of_one_file(tmp_path):
    errors = []

    def write(k):
        try:
            for _ in range(20):
                runner._write_json(tmp_path / "state.json", {"writer": k})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    assert json.loads((tmp_path / "state.json").read_text())["writer"] in range(4)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with _util.atomic_write(target) as f:
            f.write("new, half")
            raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_file_lock_serialises(tmp_path):
    """Never two holders at once, also when a waiter wakes up holding the lock
    of a file its holder has removed (it takes the lock of the current file);
    the lock file is gone afterwards."""
    lock = tmp_path / "x.lock"
    inside, overlaps = [], []

    def work():
        with _util.file_lock(lock):
            if inside:
                overlaps.append(1)
            inside.append(1)
            threading.Event().wait(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert overlaps == [] and not lock.exists()
