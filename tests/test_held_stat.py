"""The GIL-holding ``lstat`` answers exactly as ``os.lstat`` does, keeps the GIL only on local filesystems, and
lets go where it must."""

import ctypes
import errno
import os
import random
import stat
import sys

import pytest

from engines import held_stat

HELD = held_stat._load()
needs_statx = pytest.mark.skipif(not HELD, reason="no glibc statx here (glibc 2.28+ on Linux): calls use os.lstat")


@pytest.fixture(autouse=True)
def fresh_module_state():
    """Each test starts with the function not yet loaded and no folder or mount known, and leaves it so."""
    held_stat._statx, held_stat._folders, held_stat._mounts = None, {}, {}
    yield
    held_stat._statx, held_stat._folders, held_stat._mounts = None, {}, {}


class Counting:
    """The real statx, counting its calls (a stand-in for the C function with the same behaviour)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return HELD(*args)


def same_as_os(path):
    st = os.lstat(path)
    return held_stat.Stat(st.st_mode, st.st_size, st.st_mtime)


@needs_statx
def test_this_platform_has_the_held_call_and_it_keeps_the_gil(tmp_path):
    assert held_stat.held_available()
    # ctypes marks a PyDLL function so that calling it does not release the GIL.
    assert held_stat._statx._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    assert held_stat.folder_is_local(str(tmp_path))  # this machine's /tmp is a local disk


@needs_statx
def test_every_kind_of_entry_gets_what_os_lstat_gives(tmp_path):
    held_stat._statx = counting = Counting()
    rng = random.Random(7)
    paths = []
    # The first seconds of 1970 (where ``sec + nsec * 1e-9`` and ``sec + nsec / 1e9`` differ in one case of
    # five), before 1970 (negative seconds), and far ahead.
    times = [-1, -10**18, -1_500_000_000, 2**62] + [rng.randrange(0, 3 * 10**9) for _ in range(200)] + [
        rng.randrange(-2**40, 2**62) for _ in range(96)]
    for i, ns in enumerate(times):
        path = tmp_path / f"f{i:03d}-é.jpg"
        path.write_bytes(os.urandom(rng.randrange(0, 5000)))
        os.utime(path, ns=(0, ns))
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
    assert counting.calls == len(paths)  # every one answered by the held call, none by os.lstat alone
    assert stat.S_ISLNK(held_stat.lstat(str(tmp_path / "link.jpg")).st_mode)  # the link itself, not its target
    assert held_stat.lstat(str(sparse)).st_size == 5 * 2**30
    assert held_stat.lstat(paths[1]).st_mtime == -1e9


@needs_statx
def test_errors_are_the_ones_os_lstat_raises_and_the_call_reports_its_errno(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError) as raised:
        held_stat.lstat(missing)
    assert raised.value.filename == missing
    assert HELD(-100, os.fsencode(missing), 0x100, 0x7ff, ctypes.create_string_buffer(256)) == -1
    assert ctypes.get_errno() == errno.ENOENT  # the errno the switch below reads is the call's own
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


def test_a_folder_on_a_network_filesystem_is_stat_ed_letting_go(tmp_path, monkeypatch):
    """The folder's device is found in the mount table; NFS (or an unknown device) is not local."""
    (tmp_path / "a.jpg").write_bytes(b"abc")
    device = os.stat(tmp_path).st_dev
    table = tmp_path / "mountinfo"
    monkeypatch.setattr(held_stat, "MOUNTINFO", str(table))
    for line, local in [
        (f"36 35 {os.major(device)}:{os.minor(device)} / /data rw,noatime shared:1 - nfs4 server:/export rw", False),
        (f"36 35 {os.major(device)}:{os.minor(device)} / /data rw - ext4 /dev/sda1 rw", True),
        (f"36 35 {os.major(device)}:{os.minor(device) + 1} / /data rw - ext4 /dev/sda2 rw", False),  # not it
        (f"36 35 {os.major(device)}:{os.minor(device)} / /data rw - fuse.gcsfuse bucket rw", False),
    ]:
        table.write_text("22 27 0:21 / /proc rw,relatime - proc proc rw\n" + line + "\n")
        held_stat._folders, held_stat._mounts = {}, {}
        held_stat._statx = counting = Counting()
        assert held_stat.folder_is_local(str(tmp_path)) is local, line
        assert held_stat.lstat(str(tmp_path / "a.jpg")) == same_as_os(str(tmp_path / "a.jpg"))
        assert counting.calls == (1 if local else 0), line


def test_the_mount_table_is_read_again_for_a_device_it_does_not_list(tmp_path, monkeypatch):
    """A filesystem mounted after the table was read is found, not taken for the wrong one."""
    device = os.stat(tmp_path).st_dev
    table = tmp_path / "mountinfo"
    monkeypatch.setattr(held_stat, "MOUNTINFO", str(table))
    table.write_text("22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    assert not held_stat.folder_is_local(str(tmp_path))
    table.write_text(f"36 35 {os.major(device)}:{os.minor(device)} / /new rw - xfs /dev/sdb rw\n")
    held_stat._folders = {}
    assert held_stat.folder_is_local(str(tmp_path))
    assert held_stat.folder_is_local(str(tmp_path / "missing-folder")) is False  # its files' errors: os.lstat's


def test_no_mount_table_means_nothing_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(held_stat, "MOUNTINFO", str(tmp_path / "none"))
    assert not held_stat.folder_is_local(str(tmp_path))


@needs_statx
def test_a_switch_made_by_another_thread_during_a_call_does_not_break_it(tmp_path, monkeypatch):
    """The function is read once per call: switching it off meanwhile (as a refused call in another thread
    does, here while this call looks up its folder) cannot make this call use the switched-off value."""
    (tmp_path / "a.jpg").write_bytes(b"abc")
    held_stat._statx = counting = Counting()

    def looked_up_while_switched_off(folder):
        held_stat._statx = False
        return True

    monkeypatch.setattr(held_stat, "folder_is_local", looked_up_while_switched_off)
    assert held_stat.lstat(str(tmp_path / "a.jpg")) == same_as_os(str(tmp_path / "a.jpg"))
    assert counting.calls == 1
    assert not held_stat.held_available()


def test_a_kernel_without_statx_switches_the_process_to_os_lstat(tmp_path):
    """A sandbox or old kernel answers ENOSYS (seccomp may answer EPERM); the answer still comes, from os.lstat."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    held_stat._folders[str(tmp_path)] = True
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


@needs_statx
def test_an_answer_without_the_fields_asked_for_is_taken_from_os_lstat(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    held_stat._folders[str(tmp_path)] = True

    def partial(dirfd, name, flags, mask, buffer):
        result = HELD(dirfd, name, flags, mask, buffer)
        ctypes.memmove(buffer, (0x1 | 0x2).to_bytes(4, sys.byteorder), 4)
        buffer[40:48] = b"\xff" * 8  # a size the kernel did not vouch for
        return result

    held_stat._statx = partial
    assert held_stat.lstat(str(path)) == same_as_os(str(path))


@needs_statx
def test_letting_go_uses_os_lstat_inside_the_block_only(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    held_stat._statx = counting = Counting()
    with held_stat.letting_go():
        assert not held_stat.held_available()
        assert held_stat.lstat(str(path)) == same_as_os(str(path))
    assert counting.calls == 0
    assert held_stat.held_available()
    held_stat.lstat(str(path))
    assert counting.calls == 1
