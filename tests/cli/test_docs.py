"""The documentation stays true: docs/options.md is generated from the option fields (and a test
fails when it is stale), the library page's example runs, and no user-facing text (README.md,
docs/, any command's --help) names a tracker issue or a design note outside the repository."""

import re

from typer.testing import CliRunner

from conftest import ROOT
from mlx_sdft.cli import app

runner = CliRunner()


def test_options_page_is_generated_from_config():
    """docs/options.md is what `python -m mlx_sdft.config.docs` prints: regenerate it when an option changes."""
    from mlx_sdft.config.docs import markdown

    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == markdown(), (
        "docs/options.md is stale: python -m mlx_sdft.config.docs > docs/options.md"
    )


def test_options_page_documents_every_option():
    from mlx_sdft.config import cli_fields

    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    for f in cli_fields():
        assert f"`--{f.name.replace('_', '-')}`" in page, f.name


def test_options_page_gives_every_default():
    """The train section's default column is Config's: a value in backticks is the default as written,
    `off`/`on` a flag or an option that is off (None); prose (a template) is not checked."""
    import dataclasses

    from mlx_sdft.config import Config, cli_fields

    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    train = page.split("\n## train\n", 1)[1].split("\n## ", 1)[0]
    cells = dict(re.findall(r"^\| `--([a-z-]+)` \| ([^|]*?) \|", train, re.M))
    checked = 0
    for f in cli_fields(Config):
        cell, default = cells.get(f.name.replace("_", "-"), ""), f.default
        if default is dataclasses.MISSING or not cell:
            continue
        if (literal := re.match(r"`([^`]*)`", cell)) and not literal.group(1).endswith("_TEMPLATE"):
            assert literal.group(1) == str(default), (f.name, cell, default)
        elif cell in ("off", "on"):
            assert default in ((False, None) if cell == "off" else (True,)), (f.name, cell, default)
        else:
            continue
        checked += 1
    assert checked >= 40  # the table is found and read
    for name in (
        "skip_first_tokens",
        "completion_budget",
        "truncated",
        "sft_weight",
    ):  # the guards' defaults
        assert re.match(r"`[^`]+`", cells[name.replace("_", "-")]), name


def test_library_page_example_runs(tiny_model, tmp_path, monkeypatch):
    page = (ROOT / "docs" / "library.md").read_text(encoding="utf-8")
    code = page.split("```python", 1)[1].split("```", 1)[0]
    assert '{"model": "path/to/model"}' in code
    code = code.replace(
        '{"model": "path/to/model"}',
        f'{{"model": {str(tiny_model)!r}, "adapter_path": {str(tmp_path / "a")!r}, "iters": 1, "num_layers": -1}}',
    )
    monkeypatch.chdir(ROOT)
    exec(compile(code, "docs/library.md", "exec"), {})
    assert (tmp_path / "a" / "adapters.safetensors").exists()


def _help(*command: str) -> str:
    return re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output,
    )


# User-facing text speaks of the product as it is: no tracker numbers, no design notes outside the repository.
_HISTORY = re.compile(r"\bissues? #?[0-9]|DESIGN\.md|sdft-spec\.md", re.I)


def _commands(group=None, prefix=()):
    """Every command path of the CLI: ("train",), ("lessons", "show"), ..."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


def test_user_facing_text_names_no_issue_and_no_outside_document():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 9
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not _HISTORY.search(line), f"{page.name}:{number}: {line}"
    commands = list(_commands())
    assert ("lessons", "show") in commands and ("learn",) in commands
    for command in [(), *commands]:
        shown = _help(*command)
        assert "Usage" in shown, command
        assert not _HISTORY.search(shown), (command, _HISTORY.search(shown))


def test_pages_write_the_current_spellings():
    """An old spelling (it still works, with a deprecation line) is named only where the pages
    list the old spellings, never as the way to do something."""
    old = ("lessons --export", "teach --list", "teach --import", "teach --forget-exchanges")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(page.read_text(encoding="utf-8").split())  # a spelling cut at a line end
        text = re.sub(r"The old spellings [^.]*\.", "", text)
        for spelling in old:
            assert spelling not in text, (page.name, spelling)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    """Every relative link of README.md and docs/ names a file that exists, and an anchor of a
    heading that exists in it."""
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: {target}"
