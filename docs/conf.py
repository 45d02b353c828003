"""Sphinx configuration of the Flask-Websockets documentation.

Build it with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The build needs no network: intersphinx reads the inventories in ``_inventories/``.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # autodoc imports flask_websockets from the work tree

# -- Project -----------------------------------------------------------------

project = "Flask-Websockets"
author = "Flask-Websockets contributors"
copyright = "Flask-Websockets contributors"
# The version, read without importing the module (as setup.py does).
release = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "flask_websockets.py").read_text(encoding="utf-8"), re.MULTILINE
).group(1)
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "pallets_sphinx_themes",
]
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]
default_role = "code"
# Every cross-reference must resolve (under -W a broken one fails the build), but
# for names that no inventory has: the module's TypeVars, and re.Pattern, which
# Python's documentation describes without an index entry.
nitpicky = True
nitpick_ignore = [("py:class", "re.Pattern")] + [
    ("py:class", f"flask_websockets.{name}")
    for name in ("F", "T_handler", "T_text_handler", "T_binary_handler", "T_error_handler", "T_hook")
]
highlight_language = "python3"

# autodoc: members in the module's order, type hints in the signatures. The
# `ws` proxy is never given to autodoc (api.rst documents it with `.. data::`):
# inspecting it outside a connection raises "Working outside of websocket context".
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
toc_object_entries_show_parents = "hide"  # the sidebar says "send()", not "Connection.send()"
autodoc_inherit_docstrings = False  # overridden gevent methods are not part of this API

# napoleon: the Google-style ``Attributes:`` blocks of the docstrings. As
# ``:ivar:`` fields they sit in their class's description, and never collide
# with the properties that autodoc documents from their own docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# intersphinx without network: each inventory is a local file, made from the
# documentation sources of Flask and Werkzeug and from Debian's Python
# documentation by _inventories/make_inventories.sh.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", "_inventories/python.inv"),
    "flask": ("https://flask.palletsprojects.com/en/stable/", "_inventories/flask.inv"),
    "werkzeug": ("https://werkzeug.palletsprojects.com/en/stable/", "_inventories/werkzeug.inv"),
}

# -- HTML --------------------------------------------------------------------

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_title = f"Flask-Websockets Documentation ({version})"
html_short_title = "Flask-Websockets"
html_sidebars = {
    "index": ["localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
version_banner = False  # the Pallets theme's banner asks Read the Docs for versions: no network here


# -- Local directives ----------------------------------------------------------


class DocstringDirective(Directive):
    """``.. docstring:: module.name``: the documentation of a module attribute, as reStructuredText.

    Its ``#:`` comment if it has one, read from the source without evaluating
    the attribute: ``ws`` is a proxy that raises outside a connection. Else the
    docstring of the object: ``GunicornWorker`` is made on first use (gunicorn is
    optional), and documented by the module's ``__getattr__``.
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module_name, _, attribute = self.arguments[0].rpartition(".")
        analyzer = ModuleAnalyzer.for_module(module_name)
        self.state.document.settings.env.note_dependency(analyzer.srcname)  # rebuilt when the module changes
        comments = analyzer.find_attr_docs()
        if ("", attribute) in comments:
            lines = list(comments["", attribute])
        else:
            module = __import__(module_name, fromlist=[attribute])
            lines = (inspect.getdoc(getattr(module, attribute)) or "").splitlines()
        if not any(line.strip() for line in lines):
            raise self.error(f"{self.arguments[0]} has no documentation")
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.arguments[0]), self.content_offset, node)
        return node.children


def setup(app):
    app.add_directive("docstring", DocstringDirective)
    return {"parallel_read_safe": True}
