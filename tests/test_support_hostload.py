"""tests/support/hostload.py on a fake /proc: pid_max is lowered for a block and always restored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.hostload import PidWrapper, cpu_load, last_pid, lowered_pid_max


def fake_proc(tmp_path: Path, pid_max: int = 32768, last: int = 1234) -> Path:
    kernel = tmp_path / "sys/kernel"
    kernel.mkdir(parents=True)
    (kernel / "pid_max").write_text(f"{pid_max}\n")
    (kernel / "ns_last_pid").write_text(f"{last}\n")
    return tmp_path


def test_lowered_pid_max_restores_after_the_block(tmp_path):
    proc = fake_proc(tmp_path)
    with lowered_pid_max(4096, proc) as value:
        assert value == 4096
        assert (proc / "sys/kernel/pid_max").read_text() == "4096\n"
    assert (proc / "sys/kernel/pid_max").read_text() == "32768\n"


def test_lowered_pid_max_restores_when_the_block_fails(tmp_path):
    proc = fake_proc(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), lowered_pid_max(1024, proc):
        raise RuntimeError("boom")
    assert (proc / "sys/kernel/pid_max").read_text() == "32768\n"


@pytest.mark.parametrize("value", [300, 40000])
def test_lowered_pid_max_refuses_values_the_kernel_would_not_take_or_that_raise_it(tmp_path,
                                                                                  value):
    proc = fake_proc(tmp_path)
    expected = f"pid_max {value}: must be between 301 and the current 32768"
    with pytest.raises(ValueError, match=expected), lowered_pid_max(value, proc):
        pass
    assert (proc / "sys/kernel/pid_max").read_text() == "32768\n"


def test_lowered_pid_max_leaves_free_pids_for_the_host(tmp_path):
    proc = fake_proc(tmp_path)
    for pid in range(400, 2400):  # 2000 processes below 4096, one with a thread
        (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
    (proc / "400/task/401").mkdir()
    with lowered_pid_max(4096, proc, min_free=2000) as value:
        # 4096 leaves 3795 - 2001 = 1794 free; 4596 leaves 2294
        assert value == 4596
    assert (proc / "sys/kernel/pid_max").read_text() == "32768\n"


def test_last_pid_reads_ns_last_pid(tmp_path):
    assert last_pid(fake_proc(tmp_path, last=777)) == 777


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="rate 5 forks/s is too low"):
        PidWrapper(rate=5)
    expected = re.escape("need >= 1 processes and nice 0..19, got 0, 0")
    with pytest.raises(ValueError, match=expected), cpu_load(0):
        pass
