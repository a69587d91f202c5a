"""The documentation: one page per registered probe, with every section a reader needs, its
options table generated from the registry (never hand-copied), and its figure on disk."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from genprobe.probes.registry import get_probe, list_probes

DOCS = Path(__file__).parents[1] / "docs"
SECTIONS = ("## What it measures", "## Options", "## Cost", "## Reading the figure",
            "## Known limits", "## Findings on our data")


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", DOCS / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("probe", list_probes())
def test_every_registered_probe_has_a_complete_page(probe):
    page = DOCS / f"{probe}.md"
    assert page.is_file(), f"docs/{probe}.md is missing"
    text = page.read_text()
    for section in SECTIONS:
        assert section in text, f"docs/{probe}.md has no '{section}'"
    assert get_probe(probe).paper.split(",")[0].split(" ")[0] in text  # the paper is named
    assert text == _make_docs().render(page, probe), "run: python docs/make_docs.py"
    for figure in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (DOCS / figure).is_file(), f"docs/{figure} is missing: run python docs/make_figures.py"


def test_options_table_lists_every_keyword_of_the_probe():
    table = _make_docs().options_table("robustness")
    for name in get_probe("robustness").parameters():
        assert f"| `{name}` |" in table
    assert "| `threshold` | `0.01` | `--threshold` | Robust when re-init" in table


def test_readme_figure_and_links_exist():
    readme = (DOCS.parent / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / target).is_file(), target


def test_your_model_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/your_model.md: every python block, in order, in one namespace (a block that says
    `# needs: transformers` (or `torchvision`, `timm`) only where those are installed)."""
    import torch

    text = (DOCS / "your_model.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {}
    try:
        for block in blocks:
            needs = re.search(r"# needs: (.*)", block)
            if needs and any(importlib.util.find_spec(p.strip()) is None for p in needs.group(1).split(",")):
                continue
            if "fashion-mnist" in block:
                from genprobe.data import load_dataset
                from genprobe.errors import DataError

                try:
                    load_dataset("fashion-mnist", n_train=10, n_test=10)
                except DataError as exc:
                    pytest.skip(f"the fine-tuning example needs fashion-mnist: {exc}")
            exec(compile(block, "docs/your_model.md", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Subject(Sequential" in out
    if importlib.util.find_spec("transformers") is not None:
        assert "layer0" in out and isinstance(namespace["text"], namespace["gp"].Subject)
    assert namespace["finetuned"].init is not None
