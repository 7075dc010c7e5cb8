"""The console entry point: what the shell sees."""

from __future__ import annotations

import sys

import pytest

from vtw_train.cli import main as cli


def test_a_command_that_returns_results_exits_with_status_zero(monkeypatch):
    """The console script hands main()'s value to sys.exit, where anything but None is a failure
    (and is printed): a command's results must stay in Python, not reach the shell's status."""
    monkeypatch.setattr(cli, "command", lambda name: lambda argv: {"rows": [1, 2]})
    monkeypatch.setattr(sys, "argv", ["vtw-train", "benchmark", "--threads", "1"])
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main())
    assert exited.value.code is None
    # Called from Python, the same command's results come back.
    assert cli.main(["benchmark"]) == {"rows": [1, 2]}


def test_unknown_command_names_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["trian"])
    assert exited.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
