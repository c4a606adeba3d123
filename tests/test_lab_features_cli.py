"""lab.features' command line: bad input is one line before any scene is rendered, and Ctrl-C is one line
that leaves no file (the network is written last, whole or not at all). Its other checks: test_metrics.py."""
import os

import pytest

from lab import features as F

CORES = os.cpu_count() or 1
FAST = ["--scenes", "64", "--steps", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")   # restores torch's threads after a --threads 1


def refused(capsys, argv):
    """The one error line main gives for `argv`: p.error's (exit 2) or SystemExit's message."""
    with pytest.raises(SystemExit) as e:
        F.main(argv)
    err = capsys.readouterr().err
    if isinstance(e.value.code, str):
        return e.value.code
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("flags, error", [
    # far above the cores torch's thread pool crashed the process (rc 139); just above, it trained anyway
    (["--threads", str(CORES + 1)], f"error: --threads must be from 1 to this machine's {CORES} CPU cores, "
                                    f"got {CORES + 1} "),
    (["--out", ""], "error: argument --out: is empty; give a file or folder name "),   # used to train, then fail
])
def test_features_refuses_bad_input_in_one_line_before_rendering(tmp_path, capsys, monkeypatch, flags, error):
    monkeypatch.setattr(F, "scenes", lambda *a, **k: pytest.fail("rendered before refusing"))
    monkeypatch.chdir(tmp_path)
    assert error in refused(capsys, ["--out", "f.safetensors", *FAST, *flags])
    assert os.listdir(tmp_path) == []


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def torn(save_new):
    """save_new, cut short by Ctrl-C after the first bytes of the file."""
    def write_half(path, write):
        def half(f):
            f.write(b"half")
            raise KeyboardInterrupt
        save_new(path, half)
    return write_half


@pytest.mark.parametrize("where", ["training", "writing"])
def test_features_ctrl_c_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, where):
    if where == "training":
        monkeypatch.setattr(F, "train", interrupt)
    else:   # an untrained network, written: only the write is cut short
        monkeypatch.setattr(F, "train", lambda **kwargs: F.LabFeatures().eval())
        monkeypatch.setattr(F, "scenes", lambda *a: ())
        monkeypatch.setattr(F, "accuracy", lambda *a: (0.0, 0.0))
        monkeypatch.setattr(F, "save_new", torn(F.save_new))
    out = str(tmp_path / "f.safetensors")
    with pytest.raises(SystemExit) as e:
        F.main(["--out", out, *FAST, "--threads", "1"])
    assert e.value.code == f"interrupted; {out} was not written: rerun the same command"
    assert os.listdir(tmp_path) == []
