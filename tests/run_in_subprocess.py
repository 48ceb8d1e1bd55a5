"""Run crash-prone tests in a child process, so that a segfault or a
sanitizer abort fails one test instead of killing the whole pytest run.

Two tools:

``@isolated`` (decorator, outermost)
    The test re-runs itself as ``python -m pytest <file>::<test>`` in a child
    process (same interpreter, environment and working directory, so an
    ``LD_PRELOAD``-ed sanitizer applies there too). Inside the child the
    decorator is transparent. A child killed by a signal, hanging, or failing
    fails the parent test with the child's output; a skip in the child skips
    the parent. Works with hypothesis tests: the whole property search runs
    in the child (one interpreter start per test, not per example).

``record(**inputs)``
    Called by a test just before it hands inputs to C: in a child it pickles
    them to a file named by the parent, so when the child dies the parent can
    say which inputs killed it (the file is kept and its path reported).

``run_python(code, timeout=...)``
    Runs a snippet with ``python -c`` and returns its stdout; fails the test
    on a non-zero exit or a signal.
"""
import functools
import os
import pickle
import signal
import subprocess
import sys
import tempfile

import pytest

CHILD_ENV = "DIFFSEG_TEST_CHILD"
RECORD_ENV = "DIFFSEG_TEST_RECORD"
DEFAULT_TIMEOUT = float(os.environ.get("DIFFSEG_TEST_CHILD_TIMEOUT", "600"))


def in_child():
    return os.environ.get(CHILD_ENV) == "1"


def record(**inputs):
    """Save ``inputs`` (picklable) for a post-mortem if this child crashes."""
    path = os.environ.get(RECORD_ENV)
    if not path or not in_child():
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(inputs, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # atomic: the file always holds one whole example


def _describe_signal(rc):
    if rc >= 0:
        return f"exit status {rc}"
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"killed by signal {-rc}"


def _summary(obj, depth=0):
    """Short description of recorded inputs (arrays by dtype/shape/strides)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        finite = obj.dtype.kind == "f" and obj.size and not np.isfinite(obj).all()
        return (f"ndarray(dtype={obj.dtype}, shape={obj.shape}, strides={obj.strides}"
                f"{', non-finite' if finite else ''})")
    if isinstance(obj, dict) and depth < 3:
        return "{" + ", ".join(f"{k!r}: {_summary(v, depth + 1)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)) and depth < 3:
        return "[" + ", ".join(_summary(v, depth + 1) for v in obj[:8]) + (", ..." if len(obj) > 8 else "") + "]"
    r = repr(obj)
    return r if len(r) < 200 else r[:200] + "..."


SANITIZER_MARKERS = ("==ERROR: AddressSanitizer", "==ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer")


def _tail(text, n=6000):
    """The end of `text`, and first any sanitizer report in it (it comes
    before the long Python traceback of the abort)."""
    report = ""
    for marker in SANITIZER_MARKERS:
        i = text.find(marker)
        if i >= 0:
            start = text.rfind("\n", 0, i) + 1
            report = "sanitizer report:\n" + text[start:start + 4000] + "\n...\n"
            break
    tail = text if len(text) <= n else "...\n" + text[-n:]
    return report + tail


def isolated(test=None, *, timeout=None):
    """Decorator: run this test in a child pytest process (see module doc)."""
    if test is None:
        return functools.partial(isolated, timeout=timeout)

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if in_child():
            return test(*args, **kwargs)
        current = os.environ.get("PYTEST_CURRENT_TEST", "")
        # "tests/test_x.py::test_name[param] (call)" -> "test_name[param]"
        name = current.rsplit(" (", 1)[0].split("::", 1)[-1] if "::" in current else test.__name__
        node = f"{os.path.abspath(test.__code__.co_filename)}::{name}"
        crash_dir = tempfile.mkdtemp(prefix="diffseg-child-")
        crash_file = os.path.join(crash_dir, "last_inputs.pkl")
        env = dict(os.environ, **{CHILD_ENV: "1", RECORD_ENV: crash_file})
        env.pop("PYTEST_ADDOPTS", None)
        # --capture=sys: C-level writes to fd 2 (sanitizer reports) reach our
        # pipe even when the child aborts before pytest could replay them.
        # Own --basetemp: a child that made a numbered temp folder beside the
        # parent's could have pytest prune the parent's (its session bundle).
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "--no-header", "-rs", "--capture=sys", "--basetemp", os.path.join(crash_dir, "tmp"), node]
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=timeout or DEFAULT_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            pytest.fail(f"child process for {name} hung (> {timeout or DEFAULT_TIMEOUT} s)"
                        f"{_last_inputs(crash_file)}\n{_tail(out)}", pytrace=False)
        out = proc.stdout
        if proc.returncode == 0:
            if " passed" not in out and " skipped" in out:
                reason = [line for line in out.splitlines() if line.startswith("SKIPPED")]
                pytest.skip(f"skipped in child: {reason[-1] if reason else ''}")
            _cleanup(crash_dir)
            return None
        if proc.returncode < 0 or proc.returncode > 5:
            if not os.path.exists(crash_file):
                _cleanup(crash_dir)
            pytest.fail(f"child process for {name} crashed: {_describe_signal(proc.returncode)}"
                        f"{_last_inputs(crash_file)}\n{_tail(out)}", pytrace=False)
        _cleanup(crash_dir)
        pytest.fail(f"{name} failed in the child process ({_describe_signal(proc.returncode)}):\n"
                    f"{_tail(out)}", pytrace=False)

    return wrapper


def _last_inputs(path):
    if not os.path.exists(path):
        return ""
    try:
        with open(path, "rb") as f:
            inputs = pickle.load(f)
        desc = _summary(inputs)
    except Exception as e:  # noqa: BLE001 - a post-mortem must not raise
        desc = f"(unreadable: {e})"
    return f"\nlast inputs handed to C: {desc}\n  saved in {path} (pickle.load it to reproduce)"


def _cleanup(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run_python(code, timeout=DEFAULT_TIMEOUT, env=None):
    """Run ``code`` in a fresh interpreter; return its stdout. Fails the test
    if it exits non-zero, is killed by a signal or hangs."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snippet hung (> {timeout} s):\n{code}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"snippet {_describe_signal(proc.returncode)}:\n{_tail(proc.stderr)}\n"
                    f"stdout:\n{_tail(proc.stdout, 2000)}", pytrace=False)
    return proc.stdout
