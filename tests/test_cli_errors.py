"""What the `alges` command prints when it fails (issue 23.2): our own error classes and OS
errors are one line naming what is wrong (exit 2); anything else is a defect of ours, said
as such, with its traceback in RUN/run.log (exit 1)."""

from __future__ import annotations

import numpy as np
import pytest

from alges_dist import report
from alges_dist.cli import main
from alges_dist.config import ConfigError
from alges_dist.errors import AlgesError, InputError, UnknownName
from alges_dist.selection import get_strategy


def _report_raising(monkeypatch, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(report, "write_report", fail)


def test_an_unexpected_key_error_is_an_internal_error_with_its_traceback_in_run_log(tmp_path, monkeypatch, capsys):
    _report_raising(monkeypatch, KeyError("device"))  # as selection_task's options.pop("device") did
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"alges report: internal error in report: KeyError: device, traceback in {tmp_path / 'run.log'}"
    log = (tmp_path / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError: 'device'" in log


def test_a_library_value_error_is_not_passed_off_as_bad_input(tmp_path, monkeypatch, capsys):
    def numpy_fails(*args, **kwargs):
        np.zeros(3).reshape(2, 2)  # ValueError from numpy: a defect, not the user's input

    monkeypatch.setattr(report, "write_report", numpy_fails)
    assert main(["report", str(tmp_path)]) == 1
    assert "internal error in report: ValueError: cannot reshape" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [InputError("loop.budget=0: must be >= 1"), ConfigError("selection.shards=9: too many"),
                                 UnknownName("unknown strategy 'x'; valid: [...]"),
                                 FileNotFoundError(2, "No such file or directory", "/nowhere/pool.parquet")])
def test_our_errors_and_os_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, exc):
    _report_raising(monkeypatch, exc)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err and "Traceback" not in err
    expected = "/nowhere/pool.parquet: No such file or directory" if isinstance(exc, OSError) else exc.args[0]
    assert err == f"alges report: error: {expected}\n"


def test_error_classes_stay_catchable_as_the_builtins_callers_catch():
    with pytest.raises(KeyError, match="unknown strategy 'nope'; valid"):
        get_strategy("nope")
    assert str(UnknownName("unknown strategy 'nope'")) == "unknown strategy 'nope'"  # no KeyError quotes
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, AlgesError)
