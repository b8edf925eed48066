#!/usr/bin/env python3
"""Put a copy of MathJax 3 next to the book, so the built pages render math offline.

    python tools/vendor_mathjax.py            # -> _build/vendor/mathjax/ (about 9 MB, not committed)

MathJax comes from the npm registry (``npm pack mathjax@VERSION``; node and npm are on
GitHub's runners, and ``apt-get install -y npm`` elsewhere); the tarball is checked against a
pinned sha256 and only its ``es5/`` folder (the browser bundles, fonts and TeX extensions)
and the licence are kept.  ``tools/book_sphinx.py`` then points Sphinx's ``mathjax_path`` at
it.  Running it again when the copy is there does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.2.2"  # the major version Sphinx 7 loads from its CDN by default
SHA256 = "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09"  # npm's tarball
DEST = Path("_build") / "vendor" / "mathjax"


def _keep(name: str) -> bool:
    """The files the one bundle Sphinx loads (tex-mml-chtml.js) can ask for: its lazily loaded
    TeX extensions, the CHTML fonts, the menu and accessibility parts; not the other bundles."""
    if name == "package/LICENSE":
        return True
    if not name.startswith("package/es5/"):
        return False
    rel = name[len("package/es5/"):]
    if "/" not in rel:
        return rel == "tex-mml-chtml.js"
    return not rel.startswith(("output/svg", "adaptors/", "latest"))


def vendor(dest: Path = DEST, version: str = VERSION, sha256: str | None = SHA256) -> Path:
    """Download MathJax ``version`` with npm and unpack its es5/ bundle into ``dest``."""
    stamp = dest / ".version"
    if stamp.is_file() and stamp.read_text().strip() == version \
            and (dest / "tex-mml-chtml.js").is_file():
        print(f"MathJax {version} already in {dest}")
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("vendor_mathjax: npm not found; install Node.js/npm "
                         "(Debian/Ubuntu: apt-get install -y npm) or build without a local MathJax")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([npm, "pack", f"mathjax@{version}", "--silent"], cwd=tmp,
                             capture_output=True, text=True)
        tgz = Path(tmp) / f"mathjax-{version}.tgz"
        if run.returncode != 0 or not tgz.is_file():
            raise SystemExit(f"vendor_mathjax: npm pack mathjax@{version} failed: "
                             f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if sha256 and digest != sha256:
            raise SystemExit(f"vendor_mathjax: sha256 of {tgz.name} is {digest}, expected {sha256}")
        staging = Path(tmp) / "out"
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _keep(m.name)]
            tar.extractall(staging, members=members, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / "package" / "es5"), dest)
        shutil.move(str(staging / "package" / "LICENSE"), dest / "LICENSE")
    stamp.write_text(version + "\n")
    n = sum(1 for p in dest.rglob("*") if p.is_file())
    print(f"MathJax {version}: {n} files in {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEST, help=f"target folder (default {DEST})")
    args = ap.parse_args(argv)
    vendor(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
