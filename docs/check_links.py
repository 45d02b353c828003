"""Check the internal links of the built documentation site, with the standard library only.

Usage: python docs/check_links.py [docs/_build/html]

Every ``href`` and ``src`` of every HTML page that points inside the site (a
relative URL, a path from the site's root, or ``#anchor``) must name a file
that exists, and its ``#fragment`` an ``id`` (or ``name``) in that page.
External URLs (``https:``, ``mailto:``...) are not fetched: the build has no
network. Prints each broken link with the page it is on; exits 1 if there is one.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

LINK_ATTRIBUTES = {"href", "src"}


class Page(HTMLParser):
    """The anchors a page defines and the links it has."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, int]] = []  # (url, line)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (name == "name" and tag == "a"):
                self.ids.add(value)
            elif name in LINK_ATTRIBUTES and tag != "base":
                self.links.append((value, self.getpos()[0]))

    handle_startendtag = handle_starttag


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def broken_links(root: Path) -> list[str]:
    root = root.resolve()
    pages = {path.resolve(): parse(path) for path in sorted(root.rglob("*.html"))}
    problems = []
    for path, page in pages.items():
        for url, line in page.links:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:  # external, or data:/mailto:/javascript:
                continue
            where = f"{path.relative_to(root)}:{line}: {url}"
            if parts.path.startswith("/"):
                target = root / unquote(parts.path).lstrip("/")
            elif parts.path:
                target = path.parent / unquote(parts.path)
            else:
                target = path  # "#anchor", or "" for the page itself
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            if root not in target.parents and target != root:
                problems.append(f"{where}: outside the site")
            elif not target.is_file():
                problems.append(f"{where}: no file {target.relative_to(root)}")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else parse(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where}: no id {parts.fragment!r} in {target.relative_to(root)}")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parent / "_build" / "html")
    if not (root / "index.html").is_file():
        print(f"{root}: no index.html; build the site first", file=sys.stderr)
        return 2
    problems = broken_links(root)
    for problem in problems:
        print(problem)
    pages = len(list(root.rglob("*.html")))
    print(f"{pages} pages, {len(problems)} broken internal links")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
