"""docs/your-own-model.md stays true: its blocks run, in order, in a fresh folder.

Blocks are marked by their info string: ```` ```python file=NAME ```` / ```` ```yaml file=NAME ````
are written to NAME, ```` ```python test ```` runs, ```` ```bash test ```` runs each ``kdforge`` line
and needs exit status 0, ```` ```bash test-fails ```` needs the one-line error (status 2).
Everything runs in this process (``kdforge train`` with 1 epoch instead of the page's 3); before
each other command the user's imported files are forgotten, so that a model file must fail
without ``--import`` as in a new process (tests/test_byo_models.py runs real new processes)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from kdforge.cli import main
from kdforge.core import plugins

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-own-model.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    return [(lang, info.strip(), body) for lang, info, body in BLOCK.findall(DOC.read_text())]


def test_doc_has_runnable_blocks():
    marked = [info for _, info, _ in blocks() if info]
    assert marked.count("test") >= 5 and "test-fails" in marked
    assert "file=models.py" in marked


def _forget_user_code() -> None:
    """Make this process look like a new one to the model-file loader: forget the user's .py files
    that the trainings imported. (tests/test_byo_models.py checks the same commands in real new
    processes; here the page's commands run in-process to keep the test fast.)"""
    plugins._FILE_MODULES.clear()
    for name in [n for n in sys.modules if n.startswith("kdforge_user_")]:
        del sys.modules[name]


def _run_command(argv: list[str], expected: int, capsys) -> None:
    _forget_user_code()
    capsys.readouterr()
    assert main(argv) == expected, argv
    err = capsys.readouterr().err
    if expected == 2:  # the one line that names the flags
        assert err.count("\n") == 1 and "--import" in err and "--allow-model-code" in err, err


def test_doc_blocks_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for lang, info, body in blocks():
        if info.startswith("file="):
            (tmp_path / info.removeprefix("file=")).write_text(body)
        elif lang == "bash" and info in ("test", "test-fails"):
            for line in filter(str.strip, body.splitlines()):
                argv = shlex.split(line)
                assert argv[0] == "kdforge", line
                if argv[1] == "train":  # the page's epochs are 3; 1 keeps the test short
                    assert main([*argv[1:], "--set", "train.epochs=1"]) == 0, line
                else:
                    _run_command(argv[1:], 2 if info == "test-fails" else 0, capsys)
        elif lang == "python" and info == "test":
            exec(compile(body, f"{DOC.name} block", "exec"), {"__name__": "doc_block"})
    assert (tmp_path / "runs" / "byo" / "kd" / "checkpoints" / "model_last.onnx").is_file()
    assert (tmp_path / "runs" / "vit" / "lenet_from_vit" / "summary.json").is_file()
