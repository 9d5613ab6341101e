"""The documentation: every page reachable, the option reference equal to `--help`, no lab-notebook residue, and a
strict offline build (`make docs` runs the same build in CI)."""

import contextlib
import dataclasses
import html
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sfm_hf import cli
from sfm_hf.config import iter_options, iter_sections

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "tools" / "docs_hooks.py")
docs_hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_hooks)

# What a user reads: no commit hashes and no issue numbers there (history keeps them: benchmarks/history.md).
USER_FACING = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    assert len(nav) == len(set(nav))


def help_options(text: str) -> dict[str, tuple[str, str]]:
    """`--help`'s option lines -> {key: (default as printed, help)}."""
    return {key: (default, meaning) for key, default, meaning
            in re.findall(r"^  --(\S+) \(default: (.*)\)\n      (.*)$", text, flags=re.MULTILINE)}


def reference_options(markdown: str) -> dict[str, tuple[str, str]]:
    """The generated reference's rows -> {key: (default, help)}, HTML entities decoded."""
    rows = re.findall(r'<tr id="([^"]+)"><td><code class="option-key">\1</code><br><small>[^<]*, default '
                      r"<code>([^<]*)</code></small></td><td>([^<]*)</td></tr>", markdown)
    return {key: (html.unescape(default), html.unescape(meaning)) for key, default, meaning in rows}


def test_the_option_reference_says_what_help_says():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["--help"]) == 0
    from_help = help_options(printed.getvalue())
    generated = docs_hooks.options_markdown()
    from_reference = reference_options(generated)
    assert len(from_help) == len(list(iter_options())) > 50
    assert from_reference == from_help
    assert generated.count("<tr id=") == len(from_help)  # every row parsed, none malformed
    assert printed.getvalue().startswith(docs_hooks.usage_text())


def test_every_option_and_section_has_help():
    assert [key for key, field in iter_options() if not field.metadata.get("help")] == []
    assert [key for key, field in iter_sections() if not field.metadata.get("help")] == []


def test_the_reference_refuses_an_option_without_help(monkeypatch):
    @dataclasses.dataclass
    class Undocumented:
        knob: int = 1

    (field,) = dataclasses.fields(Undocumented)
    monkeypatch.setattr(docs_hooks._config(), "iter_options", lambda: iter([("knob", field)]))
    with pytest.raises(ValueError, match="`knob` has no help text"):
        docs_hooks.options_markdown()


@pytest.mark.parametrize("path", USER_FACING, ids=lambda path: str(path.relative_to(REPO)))
def test_user_docs_name_no_commit_or_issue(path):
    text = path.read_text()
    issues = re.findall(r"(?i)#\d+\b|\bissues? \d+\b", text)
    # A short hex word with a digit and a letter: how a commit is written (sha256 digests are 64 long).
    hashes = [word for word in re.findall(r"\b[0-9a-f]{7,12}\b", text)
              if re.search(r"\d", word) and re.search(r"[a-f]", word)]
    assert (issues, hashes) == ([], [])


def test_readme_links_point_at_files_that_exist():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets and [target for target in targets if not target.startswith("http") and not (REPO / target).exists()] == []


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_the_strict_build_passes_and_loads_nothing_from_the_network(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    pages = list(site.rglob("*.html"))
    assert len(pages) >= len(nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    external = [(page.name, url) for page in pages
                for url in re.findall(r'<(?:script|link|img|iframe)[^>]+(?:src|href)="(https?://[^"]+)"', page.read_text())]
    assert external == []
    reference = (site / "reference" / "options.html").read_text()
    assert all(f'id="{key}"' in reference for key, _ in iter_options())
