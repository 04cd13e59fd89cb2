"""The documentation stays true: docs/options.md is generated from the option fields (and a test
fails when it is stale), and the library page's example runs."""

import re

from conftest import ROOT


def test_options_page_is_generated_from_config():
    """docs/options.md is what `python -m mlx_sdft.config.docs` prints: regenerate it when an option changes."""
    from mlx_sdft.config.docs import markdown

    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == markdown(), "docs/options.md is stale: python -m mlx_sdft.config.docs > docs/options.md"


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
    for name in ("skip_first_tokens", "completion_budget", "truncated", "sft_weight"):  # the guards' defaults
        assert re.match(r"`[^`]+`", cells[name.replace("_", "-")]), name
