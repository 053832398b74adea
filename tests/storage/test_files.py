"""Files written by concurrent jobs: rows of shared arrays, all-or-nothing appends, the modes of
files written atomically, and what a full disk, permissions or a read-only disk say."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cdmbench.storage.files
from cdmbench.cli import cli
from cdmbench.reporting.tables import read_results
from cdmbench.storage.files import allocate_arrays, append_text, atomic_write, write_rows

ROOT = Path(__file__).resolve().parents[2]


def test_write_rows_writes_only_its_rows(tmp_path):
    allocate_arrays(tmp_path, {"a.npy": (np.uint8, (5, 2, 3))}, "free space")
    rows = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    write_rows(tmp_path / "a.npy", 3, rows)
    write_rows(tmp_path / "a.npy", 0, rows[:1] + 100)
    array = np.load(tmp_path / "a.npy")
    assert (array[3:] == rows).all() and (array[0] == rows[0] + 100).all() and not array[1:3].any()
    for bad in (rows.astype(np.int64), rows[:, :1], rows):
        with pytest.raises(ValueError, match="do not fit"):
            write_rows(tmp_path / "a.npy", 4 if bad is rows else 0, bad)


def test_an_append_cut_short_by_a_full_disk_leaves_the_file_as_it_was(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE) in a child process: the first part of the append is
    written, the rest fails; the part is cut off again, so the next append starts a whole line."""
    path = tmp_path / "results.jsonl"
    path.write_text('{"row": 1}\n')
    child = f"""
import resource, signal
from cdmbench.storage.files import append_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    append_text({str(path)!r}, '{{"row": 2, "pad": "' + 'x' * 8000 + '"}}\\n')
except OSError as exc:
    print(exc.errno, exc.filename)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == [str(errno.EFBIG), str(path)], done.stderr
    assert path.read_text() == '{"row": 1}\n'
    append_text(path, '{"row": 3}\n')
    assert [r["row"] for r in read_results([tmp_path]).to_dict("records")] == [1, 3]


def test_a_torn_results_line_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"row": 1}\n{"row": 2, "val\n{"row": 3}\n')
    with pytest.warns(UserWarning, match="results.jsonl line 2 is not a whole JSON row"):
        assert read_results([tmp_path])["row"].tolist() == [1, 3]


def _write_a_report_through_the_cli(path):
    """The result of a command that writes ``path`` with atomic_write, as the command line runs it."""
    @cli.command("write-a-report")
    def write_a_report():
        atomic_write(path, "x")

    try:
        return CliRunner().invoke(cli, ["write-a-report"])
    finally:
        cli.commands.pop("write-a-report")


def test_a_full_disk_names_the_file_and_says_what_to_do(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cdmbench.storage.files.os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "report.md", "x")
    assert info.value.filename == str(tmp_path / "report.md") and not list(tmp_path.iterdir())  # no temporary left

    result = _write_a_report_through_the_cli(tmp_path / "report.md")
    assert result.exit_code == 2, result.output
    assert f"error: No space left on device writing {tmp_path / 'report.md'}. Free space there and run the same " \
           "command again" in result.output


@pytest.fixture
def umask():
    """Set the process's umask for the test (``umask(0o022)``); the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_a_file_written_atomically_has_the_mode_open_gives_it(tmp_path, umask, mask):
    """mkstemp makes 0600 files: renamed into place, report.md, run.yaml, grids... were readable
    by their owner only, whatever the umask."""
    umask(mask)
    atomic_write(tmp_path / "report.md", "x")
    with open(tmp_path / "plain.md", "w") as fh:
        fh.write("x")
    mode = (tmp_path / "report.md").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_umask_is_read_without_proc_too(umask, monkeypatch):
    umask(0o027)

    def no_proc(*args, **kwargs):
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(cdmbench.storage.files, "open", no_proc, raising=False)
    assert cdmbench.storage.files.file_mode() == 0o640
    assert os.umask(0o022) == 0o027  # and left as it was


@pytest.mark.parametrize("code, call, says", [
    (errno.EROFS, "replace", "Read-only file system writing {path} (the file system there is read-only). Write to "
                             "a writable disk (cdmbench run --out DIR; $CDMBENCH_CACHE and $CDMBENCH_DATA_CACHE for "
                             "caches) or remount that one read-write and run the same command again"),
    (errno.EACCES, "mkstemp", "Permission denied: {path} (permissions: this user may not write there). Make that "
                              "folder and file writable for this user (chmod, chown) or write elsewhere"),
    (errno.EPERM, "fsync", "Operation not permitted: {path} (permissions: this user may not write there)"),
])
def test_a_read_only_disk_or_missing_permissions_say_so_not_free_space(tmp_path, monkeypatch, code, call, says):
    """Tests run as root, whom chmod does not stop: the refusal is simulated at the low-level
    call (creating the temporary file, writing it, renaming it into place)."""
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".report.md-tmp"))  # the temporary's name

    target = cdmbench.storage.files.tempfile if call == "mkstemp" else cdmbench.storage.files.os
    monkeypatch.setattr(target, call, refused)

    result = _write_a_report_through_the_cli(tmp_path / "report.md")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output  # no traceback
    assert result.output.startswith("error: " + says.format(path=tmp_path / "report.md")), result.output
    assert "Free space" not in result.output and "what was finished" in result.output
    assert not list(tmp_path.iterdir())  # no temporary left


def test_an_array_larger_than_memory_and_swap_maps(tmp_path):
    """Prepared data and CAS's generated training set (252 GB at 256 px) are mapped read-only: a
    private (copy-on-write) mapping of a file that size is refused where memory + swap is smaller."""
    from cdmbench.storage.files import mapped_tensor

    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    memory = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    rows = memory // (3 * 256 * 256) + 1000
    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(rows, 3, 256, 256))  # sparse
    images = mapped_tensor(tmp_path / "big.npy")
    assert images.shape == (rows, 3, 256, 256) and int(images[[0, rows - 1]].sum()) == 0
