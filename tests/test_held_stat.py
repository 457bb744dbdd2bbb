"""The GIL-holding ``lstat`` answers exactly as ``os.lstat`` does, keeps the GIL, and lets go where it must."""

import ctypes
import errno
import logging
import os
import random
import stat

import pytest

from engines import held_stat


@pytest.fixture(autouse=True)
def fresh_module_flag():
    """Each test starts with the function not yet loaded, and leaves it so (the switch is the process's)."""
    held_stat._statx = None
    yield
    held_stat._statx = None


def same_as_os(path):
    st = os.lstat(path)
    return held_stat.Stat(st.st_mode, st.st_size, st.st_mtime)


def test_this_platform_has_the_held_call_and_it_keeps_the_gil():
    assert held_stat.held_available()
    # ctypes marks a PyDLL function so that calling it does not release the GIL.
    assert held_stat._statx._flags_ & ctypes._FUNCFLAG_PYTHONAPI


def test_every_kind_of_entry_gets_what_os_lstat_gives(tmp_path):
    rng = random.Random(7)
    paths = []
    for i in range(300):
        path = tmp_path / f"f{i:03d}-é.jpg"
        path.write_bytes(os.urandom(rng.randrange(0, 5000)))
        # Times from the first seconds of 1970 (where ``sec + nsec * 1e-9`` and ``sec + nsec / 1e9`` differ in
        # one case of five), before 1970, and far ahead.
        os.utime(path, ns=(0, rng.choice([rng.randrange(0, 3 * 10**9), rng.randrange(-2**40, 2**62)])))
        paths.append(str(path))
    (tmp_path / "dir").mkdir()
    os.symlink(paths[0], tmp_path / "link.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.mkfifo(tmp_path / "fifo")
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(5 * 2**30)  # a size past 32 bits
    paths += [str(tmp_path / name) for name in ("dir", "link.jpg", "dangling.jpg", "fifo", "sparse.bin")]
    for path in paths:
        assert held_stat.lstat(path) == same_as_os(path), path
    assert stat.S_ISLNK(held_stat.lstat(str(tmp_path / "link.jpg")).st_mode)  # the link itself, not its target
    assert held_stat.lstat(str(sparse)).st_size == 5 * 2**30
    assert held_stat.held_available()  # nothing above was slow enough to switch the process over


def test_errors_are_the_ones_os_lstat_raises(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError) as raised:
        held_stat.lstat(missing)
    assert raised.value.filename == missing
    with pytest.raises(OSError) as raised:
        held_stat.lstat(str(tmp_path / ("x" * 300)))
    assert raised.value.errno == errno.ENAMETOOLONG
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        held_stat.lstat(str(tmp_path / "file" / "inside.jpg"))
    # C would cut the name at the NUL and stat another file; Python refuses the name.
    with pytest.raises(ValueError, match="null"):
        held_stat.lstat(str(tmp_path / "file") + "\0.jpg")
    assert held_stat.held_available()


def test_a_slow_call_switches_the_process_to_letting_go_with_a_line_naming_the_file(tmp_path, monkeypatch, caplog):
    path = tmp_path / "slow.jpg"
    path.write_bytes(b"x" * 10)
    monkeypatch.setattr(held_stat, "SLOW_S", -1.0)  # every call counts as slow
    with caplog.at_level(logging.INFO, logger="engines.held_stat"):
        assert held_stat.lstat(str(path)) == same_as_os(str(path))
    assert not held_stat.held_available()
    assert len(caplog.messages) == 1 and str(path) in caplog.messages[0] and "slow filesystem" in caplog.messages[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engines.held_stat"):
        assert held_stat.lstat(str(path)) == same_as_os(str(path))  # os.lstat now: no timing, no second line
    assert not caplog.records


def test_a_kernel_without_statx_switches_the_process_to_os_lstat(tmp_path, monkeypatch):
    """A sandbox or old kernel answers ENOSYS (seccomp may answer EPERM); the answer still comes, from os.lstat."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    for code in (errno.ENOSYS, errno.EPERM):
        calls = []

        def refusing(*args, code=code):
            calls.append(args)
            ctypes.set_errno(code)
            return -1

        held_stat._statx = refusing
        assert held_stat.lstat(str(path)) == same_as_os(str(path))
        assert not held_stat.held_available()
        assert held_stat.lstat(str(path)) == same_as_os(str(path))
        assert len(calls) == 1  # not asked again


def test_letting_go_uses_os_lstat_inside_the_block_only(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    assert held_stat.held_available()
    with held_stat.letting_go():
        assert not held_stat.held_available()
        assert held_stat.lstat(str(path)) == same_as_os(str(path))
    assert held_stat.held_available()
