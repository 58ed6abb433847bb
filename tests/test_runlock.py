"""One writer per run directory: a second writer is refused in one line; a dead holder's lock is taken over."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdforge.core.runlock import LOCK_NAME, RunLock, RunLockedError

SRC = Path(__file__).resolve().parents[1] / "src"
HOLD = (
    "import sys, time; sys.path.insert(0, {src!r}); from kdforge.core.runlock import RunLock; "
    "lock = RunLock({folder!r}).acquire(); print('held', flush=True); time.sleep(600)"
)


def hold_in_child(folder):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(src=str(SRC), folder=str(folder))], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    child = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError) as caught:
            RunLock(tmp_path / "run").acquire()
        message = str(caught.value)
        assert f"pid {child.pid}" in message and "choose another --out" in message and "\n" not in message
    finally:
        child.kill()
        child.wait()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    child = hold_in_child(tmp_path / "run")
    os.kill(child.pid, signal.SIGKILL)  # no clean-up at all: the lock file stays behind
    child.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run") as lock:
        assert lock.held and lock.holder()["pid"] == os.getpid()
    assert not lock.held


def test_release_lets_the_next_writer_in_and_reacquire_is_idempotent(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert first.acquire() is first
    first.release()
    first.release()  # twice is harmless
    with RunLock(tmp_path):
        pass


def test_two_trains_on_one_out_folder(tmp_path):
    """The second `kdforge train` on a busy --out exits non-zero with one line; the first's record stays whole."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {name: digits, augment: false}\nstudent: {name: mlp}\nmethod: {name: ce}\n"
        "train: {epochs: 5000, batch_size: 32, progress: none, scheduler: {name: constant}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "train", str(recipe), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the test could start the second"
        second = subprocess.run(
            [sys.executable, "-m", "kdforge", "train", str(recipe), "--out", str(out), "--resume"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended while the second was refused: test inconclusive"
    finally:
        first.send_signal(signal.SIGTERM)  # stops at a safe point, state saved as interrupted
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is in use by pid {first.pid}" in lines[0], second.stderr
    assert first.returncode == 130, first_err[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert epochs == list(range(len(epochs)))  # one writer: nothing interleaved or repeated


def test_a_suite_folder_in_use_is_refused(tmp_path):
    from kdforge.suite import run_suite

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nseeds: [0]\nbase: {data: {name: digits, augment: false}, train: {epochs: 1}}\n"
        "pairs: [{student: {name: mlp}}]\nmethods: {ce: {method: {name: ce}}}\n"
    )
    with RunLock(tmp_path / "out", "suite folder"):
        with pytest.raises(RunLockedError, match="suite folder .* is in use by pid"):
            run_suite(suite, tmp_path / "out", echo=lambda *a: None)
