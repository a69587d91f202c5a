"""Write the generated parts of the probe pages: each page's options table, from the registry.

    python docs/make_docs.py          rewrite the tables in docs/<probe>.md
    python docs/make_docs.py --check  exit 1 if a table is out of date (tests/test_docs.py runs this)

A probe page holds its table between ``<!-- options:begin -->`` and ``<!-- options:end -->``: every
keyword option of the probe's function with its default, its command-line flag and its meaning
(the registered ``Option`` help, or the shared option's help from :mod:`genprobe.options`).
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)


def _default(value) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    return f"`{value!r}`"


def options_table(name: str) -> str:
    """The markdown options table of registered probe `name`."""
    from genprobe.cli import _SHARED_ORDER
    from genprobe.options import SHARED_HELP
    from genprobe.probes.registry import get_probe

    spec = get_probe(name)
    own = {o.name: o for o in spec.options}
    rows = ["| option | default | command line | meaning |", "|---|---|---|---|"]
    for key, param in spec.parameters().items():
        if key in own:
            opt = own[key]
            flag = "--" + opt.cli_name.replace("_", "-")
            if opt.type is bool:
                flag = f"{flag} / --no-{flag[2:]}"
            meaning = opt.help
        elif key in SHARED_HELP and key in _SHARED_ORDER:
            flag = "--memory-budget-mb" if key == "memory_budget" else "--" + key.replace("_", "-")
            meaning = SHARED_HELP[key] + " ([shared](engines.md#shared-options))"
        else:
            flag, meaning = "(Python only)", "see the function's docstring"
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `{key}` | {_default(param.default)} | `{flag}` | {meaning} |"
                    if flag != "(Python only)" else f"| `{key}` | {_default(param.default)} | {flag} | {meaning} |")
    return "\n".join([BEGIN, *rows, END])


def render(page: Path, name: str) -> str:
    """The text of `page` with its options table brought up to date."""
    text = page.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block")
    return _BLOCK.sub(lambda _: options_table(name), text)


def main(argv: list[str]) -> int:
    from genprobe.probes.registry import list_probes

    check = "--check" in argv
    stale = []
    for name in list_probes():
        page = DOCS / f"{name}.md"
        if not page.is_file():
            stale.append(f"{page} is missing")
            continue
        new = render(page, name)
        if new != page.read_text():
            stale.append(f"{page}: options table out of date")
            if not check:
                page.write_text(new)
    if check and stale:
        print("\n".join(stale) + "\nrun: python docs/make_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
