"""The repository URL is configured once, in _config.yml (repository: url:); every other
place that names it must agree: bnlib/_repo.py, the chapters' install cell, the README."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import yaml

from bnlib import _repo

ROOT = Path(__file__).resolve().parents[1]
CONFIG_URL = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
# a GitHub repository URL: https://github.com/OWNER/NAME (NAME may end in .git)
GITHUB = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?(?=\.git\b|[/\s\"'`)#]|$)")


def _repo_urls(text: str) -> set[str]:
    """The GitHub repositories a text names, without the project's own action/dependency links."""
    return {u for u in GITHUB.findall(text)
            if not u.startswith(("https://github.com/actions/", "https://github.com/executablebooks/"))}


def test_module_constant_matches_config():
    assert _repo.REPOSITORY_URL == CONFIG_URL.rstrip("/")
    assert _repo.config_repository_url() == CONFIG_URL
    assert _repo.repository_url() == CONFIG_URL.rstrip("/")
    assert _repo.pip_install_target() == "git+" + CONFIG_URL.rstrip("/")


def test_config_reader_without_yaml(tmp_path):
    cfg = tmp_path / "_config.yml"
    cfg.write_text("title: x\nrepository:\n  # where\n  path_to_book: ''\n"
                   "  url: \"https://github.com/a/b\"  # comment\n  branch: main\n")
    assert _repo.config_repository_url(cfg) == "https://github.com/a/b"
    assert _repo.config_repository_url(tmp_path / "missing.yml") is None


def test_install_cells_use_the_configured_url():
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code:
            continue
        urls = _repo_urls(code[0].source)
        assert urls <= {CONFIG_URL.rstrip("/")}, f"{path.name}: install cell names {urls}"


def test_readme_names_the_configured_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    owner_name = CONFIG_URL.rstrip("/").split("github.com/")[1]
    for url in _repo_urls(readme):
        assert url == CONFIG_URL.rstrip("/"), f"README names {url}, _config.yml says {CONFIG_URL}"
    # GitHub Pages / Binder / Colab links spell the repository as OWNER/NAME or OWNER.github.io/NAME
    owner, name = owner_name.split("/")
    for m in re.finditer(r"https://([\w-]+)\.github\.io/([\w.-]+)", readme):
        assert (m.group(1), m.group(2)) == (owner, name), m.group(0)
    for m in re.finditer(r"mybinder\.org/v2/gh/([\w.-]+)/([\w.-]+)/", readme):
        assert (m.group(1), m.group(2)) == (owner, name), m.group(0)
