"""The documentation: README.md is a front page, its links and the docs' links resolve on GitHub, and
the MkDocs site builds with --strict, its CLI reference generated from the argument parsers."""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinycifar.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
pytestmark = pytest.mark.slow


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=300, env=env, cwd=root)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = mkdocs_build(ROOT, site)
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def page_text(site: Path, page: str) -> str:
    """A built page's text as a reader sees it (tags stripped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", (site / page / "index.html").read_text()))


def test_cli_reference_holds_every_command_and_option(site):
    text = page_text(site, "cli")
    pending = [("tinycifar", build_parser())]
    while pending:
        line, parser = pending.pop()
        assert line in text
        for action in parser._actions:
            assert all(option in text for option in action.option_strings), (line, action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{line} {name}", sub) for name, sub in action.choices.items()]
    assert "<!-- cli-reference -->" not in (site / "cli" / "index.html").read_text()


def test_every_page_is_built_and_links_out_of_docs_become_text(site):
    for page in ROOT.joinpath("docs").glob("*.md"):
        name = "" if page.stem == "index" else page.stem
        assert (site / name / "index.html").is_file(), page.name
    assert "../examples/my_net.py" not in (site / "your-network" / "index.html").read_text()


def copy_of_the_docs(tmp_path: Path) -> Path:
    """mkdocs.yml and docs/ copied, the rest of the repository linked, so a test can break a page."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    for name in ("examples", "src", "benchmarks", "tests", "CHANGELOG.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


@pytest.mark.parametrize(("file", "text", "complaint"), [
    ("gpu.md", "\nSee [nothing](nothing.md).\n", "nothing.md"),
    ("gpu.md", "\nSee [a section](training.md#no-such-section).\n", "no-such-section"),
    ("gpu.md", "\nSee [a file](../examples/no_such_file.py).\n", "no_such_file.py"),
    ("orphan.md", "# A page no menu lists\n", "orphan.md"),
])
def test_a_broken_link_or_a_page_missing_from_the_navigation_fails_the_build(tmp_path, file, text, complaint):
    root = copy_of_the_docs(tmp_path / "repo")
    page = root / "docs" / file
    page.write_text((page.read_text() if page.exists() else "") + text)
    done = mkdocs_build(root, tmp_path / "site")
    assert done.returncode != 0 and complaint in done.stderr, done.stderr[-3000:]


def test_with_a_repo_url_links_out_of_docs_point_at_the_repository(tmp_path):
    root = copy_of_the_docs(tmp_path / "repo")
    with (root / "mkdocs.yml").open("a") as config:
        config.write("repo_url: https://github.com/someone/tinycifar\n")
    done = mkdocs_build(root, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "your-network" / "index.html").read_text()
    assert 'href="https://github.com/someone/tinycifar/blob/main/examples/my_net.py"' in page


def github_anchors(markdown: str) -> set[str]:
    """The ids GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors, fenced = set(), False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def resolves(file: Path, target: str) -> bool:
    """Whether a relative link of ``file`` reaches an existing file and, in a .md file, heading."""
    path, _, anchor = target.partition("#")
    linked = (file.parent / path).resolve() if path else file
    if not linked.exists():
        return False
    return not anchor or linked.suffix != ".md" or anchor in github_anchors(linked.read_text())


def broken_links(file: Path) -> list[str]:
    """Relative links of ``file`` that do not resolve as GitHub resolves them."""
    return [target for target in LINK.findall(file.read_text())
            if not re.match(r"[a-z]+:", target) and not resolves(file, target)]


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "page.md").write_text("# A page\n\n## Set-up: two commands\n")
    (tmp_path / "readme.md").write_text("[a](page.md#set-up-two-commands) [b](page.md#setup) [c](gone.md) "
                                        "[d](https://example.org/x) [e](#a-page)")
    assert broken_links(tmp_path / "readme.md") == ["page.md#setup", "gone.md", "#a-page"]


@pytest.mark.parametrize("file", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_links_resolve_on_github(file):
    path = ROOT / file if file == "README.md" else ROOT / "docs" / file
    assert broken_links(path) == []


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert "make train" in readme and "make test" in readme
    assert all(f"docs/{page.name}" in readme for page in (ROOT / "docs").glob("*.md") if page.stem != "index")
