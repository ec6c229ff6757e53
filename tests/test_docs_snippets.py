"""The documentation's code runs: every script in docs/snippets/ runs to the end (each asserts
what its page says it shows), the tutorials and how-to guides show Python only by including
those scripts (pymdownx.snippets), from sections that exist, and every ``ppml-fast`` command in
their shell blocks runs with the exit status the page states.

The scripts run in this process (runpy), not in subprocesses: importing torch and ppml_fast once
instead of once per script keeps the whole file well under a minute. Each runs in its own
temporary directory, with the environment and torch's thread count restored afterwards.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
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
    assert len(CLI_LINES) >= 4, CLI_LINES


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


def _cli_lines():
    """(page, command line) of each ``ppml-fast ...`` line in the pages' bash blocks."""
    for page in RUNNABLE_PAGES:
        for lang, lines in _blocks(page):
            if lang == "bash":
                yield from ((page.name, line) for line in lines if line.startswith("ppml-fast "))


CLI_LINES = list(_cli_lines())


@pytest.mark.parametrize("page,line", CLI_LINES, ids=[f"{p}:{l.split('#')[0].strip()}" for p, l in CLI_LINES])
def test_page_command_runs(page, line, tmp_path, monkeypatch, capsys):
    """A command shown on a page runs (in this process, through the CLI's main) with the exit
    status the page's comment states (0 unless it says "exit status N")."""
    from ppml_fast.cli import main

    command, _, comment = line.partition("#")
    expected = re.search(r"exit status (\d)", comment)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        status = main(shlex.split(command)[1:])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == (int(expected.group(1)) if expected else 0), (page, line, out)
    assert out.strip(), f"{page}: {command} printed nothing"


def test_every_snippet_is_shown():
    text = "".join(p.read_text() for p in RUNNABLE_PAGES)
    for script in SCRIPTS:
        assert f'"{script}' in text, f"docs/snippets/{script} is included in no page"
