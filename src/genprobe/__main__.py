"""``python -m genprobe`` and the ``genprobe`` console script: the command line, with a Ctrl-C
while the command line itself is still importing said in one line (exit 130), as everywhere
else."""

import sys


def main() -> None:
    try:
        from .cli import main as command_line
    except KeyboardInterrupt:
        print("genprobe: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    command_line()


if __name__ == "__main__":
    main()
