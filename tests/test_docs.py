"""The README and docs/: every relative link resolves (file and #anchor), the README stays short and
starts with the two commands."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ('pip install -e . && python launch.py',
            'pip install -e ".[dev]" && python -m pytest -q -n auto --dist loadgroup')

# [text](target) or ![alt](target), target without spaces, optional "title"; not inside code.
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def markdown_files() -> list[pathlib.Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    return _LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation except '-' and '_' removed,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading's slug; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        s = slug(heading)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def broken_links(path: pathlib.Path) -> list[str]:
    problems = []
    for target in links(path.read_text()):
        if re.match(r"(https?|mailto):", target, re.I):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_slug_follows_github():
    assert slug("Cross-attention versus concat") == "cross-attention-versus-concat"
    assert slug("The default run (current)") == "the-default-run-current"
    assert slug("The sweep's compilation cache") == "the-sweeps-compilation-cache"
    assert slug("The embedded dataset: `synthetic_patients`") == "the-embedded-dataset-synthetic_patients"
    assert slug("Evaluation, report and prediction") == "evaluation-report-and-prediction"


def test_links_are_found_outside_code_only():
    text = "See [a](a.md) and ![img](b.png#x).\n\n```bash\n[not](c.md)\n```\n`[nor](d.md)` [e](https://x.org)"
    assert links(text) == ["a.md", "b.png#x", "https://x.org"]


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "target.md").write_text("# A heading\n\n## Second one: `code`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](target.md#a-heading) [ok](target.md#second-one-code) [ok](#local) [web](https://a.b/c)\n"
                    "# Local\n[missing file](nothere.md) [missing anchor](target.md#nope)\n")
    assert broken_links(page) == [f"nothere.md: no file {tmp_path / 'nothere.md'}",
                                  "target.md#nope: no heading with anchor #nope in target.md"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert links(path.read_text()), f"{path.name} has no links: is the link pattern still right?"
    assert broken_links(path) == []


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_block = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S)
    assert first_block, "README.md has no ```bash block"
    assert text.index("```bash") < text.index("\n## "), "the commands come before the first section"
    lines = first_block.group(1).splitlines()
    for command in COMMANDS:
        assert any(line.startswith(command) for line in lines), f"first bash block lacks: {command}"
