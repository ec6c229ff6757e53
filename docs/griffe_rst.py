"""Griffe extension for the API reference (mkdocs.yml loads it; nothing imports it at run time).

The docstrings use two reStructuredText constructs that Markdown would print as typed: Sphinx
roles (``:class:`~ppml_fast.privacy.PrivacyEngine```) and literal blocks introduced by a line
ending in ``::``. They are rewritten as each object is loaded, for the pages only (the source is
not touched): a role becomes inline code of its target (the last component with ``~``, as Sphinx
shows it), and a trailing ``::`` becomes ``:`` (the indented block after it is already a Markdown
code block).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)   # "as follows::" -> "as follows:"
BARE_LITERAL = re.compile(r"^[ \t]*::[ \t]*\n", re.MULTILINE)  # a line holding only "::"


def _code(match: re.Match) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def markdown(text: str) -> str:
    """``text`` with Sphinx roles and ``::`` literal-block markers in Markdown."""
    return LITERAL.sub(":", BARE_LITERAL.sub("", ROLE.sub(_code, text)))


class RstToMarkdown(griffe.Extension):
    """Rewrites each loaded object's docstring with :func:`markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
