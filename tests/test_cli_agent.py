"""`driftwarden agent` input errors: one line, non-zero exit, nothing loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest


def agent(*args: str):
    return subprocess.run([sys.executable, "-m", "driftwarden", "agent", *args],
                          capture_output=True, text=True, timeout=60, cwd="/")


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    ([], "the following arguments are required: --state-dir"),
    (["--state-dir", "/tmp/x", "--mode", "protect"], "argument --mode: invalid choice"),
    (["--state-dir", "/tmp/x", "--window", "0"], "argument --window: must be > 0"),
    (["--state-dir", "/tmp/x", "--learn-for", "soon"], "expected a number of seconds"),
    (["--state-dir", "/tmp/x", "--startup-grace", "-1"], "argument --startup-grace: must be >= 0"),
    (["--state-dir", "/tmp/x", "--incident-window", "-1"],
     "argument --incident-window: must be >= 0"),
    (["--state-dir", "/tmp/x", "--window", "nan"], "argument --window: must be > 0, got nan"),
    (["--state-dir", "/tmp/x", "--learn-for", "inf"], "argument --learn-for: must be > 0, got inf"),
    (["--state-dir", "/tmp/x", "--collector", "127.0.0.1:1", "--heartbeat", "0"],
     "argument --heartbeat: must be > 0, got 0"),
    (["--state-dir", "/tmp/x", "--collector", "127.0.0.1:1", "--learn-for", "60"],
     "--learn-for: with --collector the collector ends learning for the whole fleet; give it "
     "to the collector (`driftwarden collector --learn-for SECONDS`)"),
])
def test_bad_flags(args, expected):
    result = agent(*args)
    assert result.returncode == 2
    assert expected in one_line(result)


def test_unusable_state_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = agent("--state-dir", str(blocker / "state"))
    assert result.returncode == 2
    assert f"cannot use --state-dir {blocker / 'state'}" in one_line(result)


def test_unwritable_alerts_out(tmp_path):
    result = agent("--state-dir", str(tmp_path / "s"), "--alerts-out",
                   str(tmp_path / "missing" / "alerts.jsonl"))
    assert result.returncode == 2
    assert "cannot write --alerts-out" in one_line(result)
