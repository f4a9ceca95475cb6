"""MkDocs hooks of tinycifar's documentation site (``hooks:`` in mkdocs.yml).

* The command-line reference is rendered from tinycifar's own argument parsers at build time, so
  docs/cli.md cannot disagree with ``tinycifar COMMAND --help``.
* The pages link to repository files outside docs/ by relative path (``../examples/my_net.py``),
  which works on GitHub but is no page of the site: such a link must point at an existing file
  (else the build fails: a broken link), and on the site it points at ``repo_url``'s copy when
  mkdocs.yml names one, else it becomes its plain text.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mkdocs.exceptions import PluginError

from tinycifar.cli import build_parser

CLI_PAGE = "cli.md"
MARKER = "<!-- cli-reference -->"
HELP_WIDTH = 100  # help is wrapped at this width whatever the terminal that builds the site
OUTSIDE_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>\.\./[^)#\s]+)(?P<anchor>#[^)\s]*)?\)")


def commands(parser: argparse.ArgumentParser, names: tuple[str, ...] = ("tinycifar",),
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (itself first), depth first, with its command line."""
    yield " ".join(names), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*names, name))


def help_text(parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH)
    return parser.format_help()


def cli_reference() -> str:
    """One section per command: its name as the heading, its ``--help`` as the text."""
    return "\n".join(f"## `{line}`\n\n```text\n{help_text(parser)}```\n" for line, parser in commands(build_parser()))


def repository_link(match: re.Match, page_file: Path, root: Path, repo_url: str | None) -> str:
    """A link out of docs/, checked to exist, as the site shows it (see the module docstring)."""
    target = Path(os.path.normpath(page_file.parent / match["target"]))  # not resolve(): keep symlinked roots
    if not target.exists() or not target.is_relative_to(root):
        raise PluginError(f"{page_file.relative_to(root)}: link {match['target']} points at no file of the repository")
    if not repo_url:
        return match["text"]
    kind = "tree" if target.is_dir() else "blob"
    return f"[{match['text']}]({repo_url.rstrip('/')}/{kind}/main/{target.relative_to(root)}{match['anchor'] or ''})"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == CLI_PAGE:
        if MARKER not in markdown:
            raise PluginError(f"{CLI_PAGE}: the marker {MARKER} saying where the reference goes is missing")
        markdown = markdown.replace(MARKER, cli_reference())
    root = Path(config.config_file_path).absolute().parent
    page_file = Path(page.file.abs_src_path)
    return OUTSIDE_LINK.sub(lambda m: repository_link(m, page_file, root, config.repo_url), markdown)
