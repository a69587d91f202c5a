"""The command line in-process, for tests: one helper shared by every test file."""

from __future__ import annotations

from genprobe.cli import main


def call(args, capsys) -> tuple[int, str, str]:
    """Run ``genprobe ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
