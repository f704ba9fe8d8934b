"""saltkit.io: an output check before any work, and atomic writes whose failures name the file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from saltkit.io import OutputClashError, check_outputs, same_file


def test_check_outputs_sees_through_spellings_and_links(tmp_path):
    a = tmp_path / "a.npz"
    a.write_bytes(b"input")
    os.link(a, tmp_path / "hard.npz")
    (tmp_path / "soft.npz").symlink_to(a)
    for spelling in (a, tmp_path / "sub" / ".." / "a.npz", tmp_path / "hard.npz", tmp_path / "soft.npz"):
        assert same_file(spelling, a)
        with pytest.raises(OutputClashError, match=r"--out .* is the input PROBS\.npz"):
            check_outputs({"--out": spelling}, {"PROBS.npz": [tmp_path / "b.npz", a]})
    with pytest.raises(OutputClashError, match="--out x.csv and --save-probs ./x.csv name the same file"):
        check_outputs({"--out": "x.csv", "--save-probs": "./x.csv"}, {})
    check_outputs({"--out": tmp_path / "new.csv", "--save-probs": None}, {"PROBS.npz": [a]})  # nothing clashes


def test_a_full_disk_or_file_size_limit_names_the_file(tmp_path):
    # "[Errno 27] File too large" / "[Errno 28] No space left on device" named no file
    target = tmp_path / "probabilities.npz"
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from saltkit.io import atomic_write\n"
            "with atomic_write(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'x' * 100000)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"saltkit: error: [Errno 27] cannot write {target}: File too large; nothing was written there: free space "
        "(or raise the file-size limit) or choose another folder")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_termination_cleans_up_as_ctrl_c_does(tmp_path, name):
    """A command stopped by SIGTERM or SIGHUP in the middle of a write leaves the old file and no temporary (the
    handlers saltkit installs for its commands and workflows), and exits with 128 + the signal's number."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "result.csv"
    target.write_text("the previous result\n")
    script = (
        "import os, signal, sys\n"
        "from saltkit.io import atomic_write, clean_up_on_termination\n"
        "clean_up_on_termination()\n"
        f"with atomic_write({str(target)!r}) as f:\n"
        "    f.write('half of a new result')\n"
        "    f.flush()\n"
        f"    os.kill(os.getpid(), signal.{name})\n"
        "    f.write(' never written')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr
    assert f"saltkit: stopped by {name}; removing temporary files" in proc.stderr
    assert target.read_text() == "the previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]
