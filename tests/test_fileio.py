"""fastvit.fileio: a failed or interrupted write never damages the file that was there."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fastvit.fileio import WriteError, atomic_save, atomic_write, atomic_write_text, same_file


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    dst = tmp_path / "out.txt"
    dst.write_text("old")
    atomic_write_text(dst, "new")
    assert dst.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_exception_inside_block_keeps_old_file(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(dst) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert dst.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_keeps_permission_bits(tmp_path):
    dst = tmp_path / "x"
    dst.write_text("a")
    os.chmod(dst, 0o640)
    atomic_write_text(dst, "b")
    assert (os.stat(dst).st_mode & 0o777) == 0o640


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: (p / "d").mkdir() or p / "d", "is a folder"),
        (lambda p: (p / "f").write_text("") or p / "f" / "x", "is a file, not a folder"),
        (lambda p: p / "missing" / "x", "does not exist"),
    ],
)
def test_os_errors_are_one_line_with_the_path(tmp_path, make, why):
    dst = make(tmp_path)
    with pytest.raises(WriteError, match=why) as info:
        atomic_write_text(dst, "x")
    assert str(dst) in str(info.value) and "\n" not in str(info.value)


def test_size_limit_mid_write_keeps_old_file(tmp_path):
    """A file-size limit (as RLIMIT_FSIZE or a full disk) hits while writing: the old file survives."""
    dst = tmp_path / "ckpt.pt"
    dst.write_bytes(b"x" * 100)
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from fastvit.fileio import WriteError, atomic_write
        try:
            with atomic_write({str(dst)!r}) as f:
                f.write(b"y" * 100000)
        except WriteError as e:
            print("ERR", e)
            sys.exit(3)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "too large" in r.stdout
    assert dst.read_bytes() == b"x" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_kill_before_rename_keeps_old_file(tmp_path):
    dst = tmp_path / "ckpt.pt"
    dst.write_bytes(b"old")
    code = textwrap.dedent(
        f"""
        import os, signal
        from fastvit.fileio import atomic_write
        with atomic_write({str(dst)!r}) as f:
            f.write(b"new" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    assert dst.read_bytes() == b"old"


def test_atomic_save_roundtrip_and_same_file(tmp_path):
    torch = pytest.importorskip("torch")
    dst = tmp_path / "t.pt"
    atomic_save({"w": torch.ones(3)}, dst)
    assert torch.equal(torch.load(dst)["w"], torch.ones(3))
    os.symlink(dst, tmp_path / "link.pt")
    assert same_file(dst, tmp_path / "link.pt")
    assert not same_file(dst, tmp_path / "nope.pt")
