"""The documentation's code runs: every script in docs/snippets/ runs to the end (each asserts
what its page says it shows), and the tutorials and how-to guides show code only by including
those scripts (pymdownx.snippets), from sections that exist.

The scripts run in this process (runpy), not in subprocesses: importing torch and ppml_fast once
instead of once per script keeps the whole file well under a minute. Each runs in its own
temporary directory, with the environment and torch's thread count restored afterwards.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the snippets train on sklearn's digits

DOCS = Path(__file__).resolve().parent.parent / "docs"
SNIPPETS = DOCS / "snippets"
SCRIPTS = sorted(p.name for p in SNIPPETS.glob("*.py"))
#: pages whose every code block must come from a snippet
RUNNABLE_PAGES = sorted((DOCS / "tutorials").glob("*.md")) + sorted((DOCS / "how-to").glob("*.md"))
INCLUDE = re.compile(r'^-{1,3}8<-{1,3}\s+"([^"]+)"\s*$')
SECTION = re.compile(r"#\s*-{1,3}8<-{1,3}\s*\[(start|end):(\w+)\]")
FENCE = re.compile(r"^```(\w*)\s*$")


def test_there_are_snippets_and_pages():
    assert len(SCRIPTS) >= 8, SCRIPTS
    assert len(RUNNABLE_PAGES) >= 8, RUNNABLE_PAGES


@pytest.mark.parametrize("script", SCRIPTS)
def test_snippet_runs(script, tmp_path, monkeypatch, capsys):
    env, threads = dict(os.environ), torch.get_num_threads()
    monkeypatch.chdir(tmp_path)  # a script that writes files writes them here
    try:
        runpy.run_path(str(SNIPPETS / script), run_name="__main__")
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip(), f"{script} printed nothing: a tutorial shows output"


def _blocks(page: Path):
    """(language, lines) of each fenced code block of a page."""
    block, lang = None, ""
    for line in page.read_text().splitlines():
        m = FENCE.match(line.strip())
        if block is None and m:
            block, lang = [], m.group(1)
        elif block is not None and line.strip() == "```":
            yield lang, block
            block = None
        elif block is not None:
            block.append(line.strip())


def _sections(script: str) -> set[str]:
    found = SECTION.findall((SNIPPETS / script).read_text())
    starts = {name for kind, name in found if kind == "start"}
    ends = {name for kind, name in found if kind == "end"}
    assert starts == ends, f"{script}: sections without a matching start/end: {starts ^ ends}"
    return starts


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_page_code_comes_from_snippets(page):
    included = 0
    for lang, lines in _blocks(page):
        if lang != "python":
            continue  # shell commands and output
        for line in filter(None, lines):
            m = INCLUDE.match(line)
            assert m, f"{page.name}: a python block holds code that no test runs: {line!r}"
            name, _, section = m.group(1).partition(":")
            assert name in SCRIPTS, f"{page.name} includes {name}, not a script in docs/snippets"
            if section:
                assert section in _sections(name), f"{page.name}: {name} has no section {section!r}"
            included += 1
    assert included, f"{page.name} shows no runnable code"


def test_every_snippet_is_shown():
    text = "".join(p.read_text() for p in RUNNABLE_PAGES)
    for script in SCRIPTS:
        assert f'"{script}' in text, f"docs/snippets/{script} is included in no page"
