"""`steer` run in the test process: its `main` with the same arguments, its exit code and what
it wrote, as a process would give them. Loading torch once per test session instead of once per
command keeps the suite fast; test_cli.py runs the console script itself as a process."""

import contextlib
import io
import subprocess

import steercli


def steer(*args: str) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = steercli.main(list(args))
        except SystemExit as exit_:  # argparse's --help and usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["steer", *args], code, out.getvalue(), err.getvalue())
