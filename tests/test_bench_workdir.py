"""Where the benchmark puts its run folders (bench/scenarios.py ``WORKDIR_ON``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench import scenarios


def _filesystem_type(path: Path) -> str:
    """The file system type as coreutils' ``stat -f`` reads it (statfs), not /proc/mounts."""
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_memory_means_dev_shm_exactly_when_it_is_a_roomy_tmpfs() -> None:
    shm = scenarios.MEMORY_DIR.resolve()
    usable = (
        _filesystem_type(shm) == "tmpfs"
        and shutil.disk_usage(shm).free >= scenarios.MEMORY_DIR_MIN_FREE
    )
    assert scenarios.workdir_parent("memory") == (shm if usable else None)


def test_the_mount_on_top_is_the_one_that_counts() -> None:
    mounts = (
        "sysfs /sys sysfs rw 0 0\n"
        "tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n"
        "overlay /dev/shm overlay rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
    )
    assert scenarios.mount_type(Path("/dev/shm"), mounts) == "overlay"
    assert scenarios.mount_type(Path("/run"), mounts) == "tmpfs"
    assert scenarios.mount_type(Path("/run/shm"), mounts) is None
    assert scenarios.mount_type(Path("/dev"), "") is None


def test_disk_means_the_system_temporary_folder() -> None:
    assert scenarios.workdir_parent("disk") is None


def test_an_unknown_place_is_refused() -> None:
    with pytest.raises(ValueError, match="workdir_on must be one of"):
        scenarios.workdir_parent("ssd")


def test_a_folder_that_is_not_a_mount_point_is_not_used(tmp_path: Path) -> None:
    assert not scenarios._usable_tmpfs(tmp_path)


@pytest.mark.parametrize("where", scenarios.WORKDIR_ON)
def test_the_run_folder_holds_an_agent_socket_and_goes_away(where: str) -> None:
    settings = scenarios.Settings(workdir_on=where)
    with scenarios._workdir(settings) as workdir:
        parent = scenarios.workdir_parent(where)
        if parent is not None:
            assert workdir.parent == parent
            assert _filesystem_type(workdir) == "tmpfs"
        else:
            assert workdir.parent == Path(tempfile.gettempdir())
        # The gateway binds its agents' Unix sockets below it (``i<serial>.sock``): they must
        # work there, and the path must fit sun_path (108 bytes).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(workdir / "i1000.sock"))
        assert any(workdir.iterdir())
    assert not workdir.exists()
