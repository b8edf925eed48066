#!/usr/bin/env python3
"""Open every page of the built book in headless Chromium and fail on what a reader would see.

    python tools/check_book.py _build/html                    # check every page
    python tools/check_book.py _build/html --screenshot shots # ... and write PNGs to shots/

One Chromium process serves all pages (one tab, navigated page after page), driven through the
Chrome DevTools Protocol over a pipe (``--remote-debugging-pipe``): no websocket library, no
browser download, only the Debian/Ubuntu ``chromium`` package and the standard library.
The book is served from 127.0.0.1 by a throwaway HTTP server, and every other host is made
unresolvable, so a page that needs the internet (a CDN script, a web font) fails here the way
it fails for a reader who is offline.

A page fails on:
  traceback     a Python traceback in the page
  progress-bar  a tqdm-style progress bar in a cell output (``it/s]``, ``s/it]``, ``%|``)
  warning       a printed warning in a cell output (``UserWarning: ...``, ``Warning: ...``)
  raw-markup    MyST markup left unrendered in the text (``{glue:``, ``{cite}``, ``:::``, ...)
  raw-math      math that MathJax did not typeset (the reader sees raw TeX)
  figure        a caption "Figure N." whose image is missing or did not load
  console       a JavaScript error, a failed request, or a console.error message
  scorecard     (landing page) a row without a verdict word or a finite, non-zero-rounded number

The checks on text are pure functions (``check_*``) so they are unit-tested without a browser.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

VERDICT_WORDS = ("partly true", "true", "contested", "misleading", "false", "depends",
                 "inconclusive")
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
SKIP_DIRS = {"_static", "_sources", "_images", "reports", "_downloads", ".doctrees",
             ".jupyter_cache", "jupyter_execute"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem on one page."""

    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: {self.kind}: {self.detail}"


# =============================================================================================
# pure checks (no browser): input is what the page script below extracts


def _snippet(text: str, start: int, end: int, width: int = 50) -> str:
    s = text[max(0, start - width): end + width].replace("\n", " ⏎ ")
    return re.sub(r"\s+", " ", s).strip()


TRACEBACK = re.compile(r"Traceback \(most recent call last\)")  # plain Python and IPython


def check_traceback(text: str) -> list[str]:
    """A Python traceback anywhere on the page (cell outputs, or pasted into the text)."""
    return [_snippet(text, m.start(), m.end()) for m in TRACEBACK.finditer(text)]


# tqdm: " 45%|████▌     | 9/20 [00:01<00:01,  8.50it/s]" ; slow loops print "s/it]"
PROGRESS = re.compile(r"\d+%\|| ?\d*\.?\d+\s*(it/s|s/it)\]|it/s\]")


def check_progress_bar(outputs: list[str]) -> list[str]:
    """Cell outputs that contain a progress bar (a bar in a book is noise, and it is never
    the same twice, so it also breaks nbval's output comparison)."""
    out = []
    for text in outputs:
        m = PROGRESS.search(text)
        if m:
            out.append(_snippet(text, m.start(), m.end()))
    return out


WARNING_LINE = re.compile(r"^.*\b(?:\w*Warning|WARNING):.*$", re.MULTILINE)


def check_warning(outputs: list[str]) -> list[str]:
    """Printed warnings in cell outputs: ``.../x.py:12: UserWarning: ...`` or ``Warning: ...``."""
    return [line.strip()[:160] for text in outputs for line in WARNING_LINE.findall(text)]


RAW_MYST = re.compile(
    r"\{(?:glue|cite|numref|ref|doc|eq|term|download|bibliography|figure|math|abbr|sub|sup)"
    r"(?::[a-z-]+)?\}|\{glue:|\{cite:|^\s*:::|```\{", re.MULTILINE)


def check_raw_markup(text: str) -> list[str]:
    """MyST roles/directives that reached the page as text: ``{glue:text}`...```, ``{cite}``,
    a colon fence ``:::`` or a backtick directive fence. ``text`` excludes code blocks."""
    return [_snippet(text, m.start(), m.end()) for m in RAW_MYST.finditer(text)]


def check_figures(figures: list[dict[str, Any]]) -> list[str]:
    """``figures``: one dict per "Figure N." caption with ``caption`` (its first words),
    ``image`` (an <img>/<svg> sits between this caption and the previous one) and ``loaded``
    (that image decoded with a non-zero size)."""
    out = []
    for fig in figures:
        if not fig.get("image"):
            out.append(f"no image before caption {fig['caption']!r}")
        elif not fig.get("loaded", True):
            out.append(f"image before caption {fig['caption']!r} did not load")
    return out


def check_math(unrendered: list[str]) -> list[str]:
    """Math elements MathJax left as TeX source (MathJax missing, blocked or failed)."""
    return [f"not typeset: {t[:80]!r}" for t in unrendered]


NUMBER = re.compile(r"(?<![\w.])[-−+]?(?:\d+(?:[.,]\d+)*|\.\d+)(?:[eE][-−+]?\d+)?")
NOT_FINITE = re.compile(r"(?<![A-Za-z])(?:[-+]?inf(?:inity)?|nan|NaN|Inf|∞)(?![A-Za-z])",
                        re.IGNORECASE)
ROUNDED_TO_ZERO = re.compile(r"(?<![\w.])[-−+]?0\.0+(?![\d])(?!\s*[eE×])")
PY_REPR = re.compile(r"np\.\w+\(|tensor\(|array\(|^\(['\"\d].*,.*\)$|^\[.*,.*\]$|\bNone\b")


def verdict_words(cell: str) -> list[str]:
    """The verdict words in a scorecard cell, longest first so "partly true" is not "true"."""
    found, rest = [], cell.lower()
    for word in VERDICT_WORDS:
        pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")
        if pattern.search(rest):
            found.append(word)
            rest = pattern.sub(" ", rest)
    return found


def check_scorecard_row(cells: dict[str, str]) -> list[str]:
    """One row of the landing page's scorecard, as {column header: cell text}.

    The verdict cell must hold a verdict word; the key-number cell must hold at least one
    number, no inf/nan, no number printed as 0.00 (rounded away to nothing: print it with
    enough significant digits or in scientific notation) and no Python repr
    (``np.float64(...)``, a tuple, ``None``)."""
    row_id = next(iter(cells.values()), "?")
    verdict = next((v for k, v in cells.items() if k.lower().startswith("verdict")), None)
    number = next((v for k, v in cells.items() if "number" in k.lower()), None)
    problems = []
    if verdict is None or number is None:
        return [f"{row_id}: no Verdict / Key number column in {list(cells)}"]
    if not verdict.strip():
        problems.append(f"{row_id}: empty verdict")
    elif not verdict_words(verdict):
        problems.append(f"{row_id}: verdict {verdict!r} has no verdict word {VERDICT_WORDS}")
    n = number.strip()
    if not n:
        problems.append(f"{row_id}: empty key number")
        return problems
    if not NUMBER.search(n) and not NOT_FINITE.search(n):
        problems.append(f"{row_id}: key number {n!r} holds no number")
    if NOT_FINITE.search(n):
        problems.append(f"{row_id}: key number {n!r} is not finite (inf/nan)")
    if ROUNDED_TO_ZERO.search(n):
        problems.append(f"{row_id}: key number {n!r} prints a value rounded to 0.00")
    if PY_REPR.search(n):
        problems.append(f"{row_id}: key number {n!r} looks like a Python repr")
    return problems


def check_console(messages: list[str]) -> list[str]:
    """JavaScript errors and failed requests (a missing favicon is not the book's fault)."""
    return [m[:200] for m in messages if "favicon.ico" not in m]


def check_page(page: str, data: dict[str, Any], landing: bool = False) -> list[Finding]:
    """All checks on one page's extracted ``data`` (see ``PAGE_SCRIPT``)."""
    found: list[Finding] = []

    def add(kind: str, details: list[str]) -> None:
        found.extend(Finding(page, kind, d) for d in details)

    add("traceback", check_traceback(data.get("text", "")))
    add("progress-bar", check_progress_bar(data.get("outputs", [])))
    add("warning", check_warning(data.get("outputs", [])))
    add("raw-markup", check_raw_markup(data.get("prose", "")))
    add("raw-math", check_math(data.get("unrendered_math", [])))
    add("figure", check_figures(data.get("figures", [])))
    add("console", check_console(data.get("console", [])))
    if landing:
        rows = data.get("scorecard")
        if not rows:
            add("scorecard", ["no scorecard table (a table with Verdict and Key number columns)"])
        for row in rows or []:
            add("scorecard", check_scorecard_row(row))
    return found


# =============================================================================================
# what runs inside the page

PAGE_SCRIPT = r"""
(() => {
  const root = document.querySelector('main article') || document.querySelector('main')
               || document.body;
  const outputs = [...root.querySelectorAll('div.cell_output, div.output')]
      .filter(e => !e.parentElement.closest('div.cell_output, div.output'))
      .map(e => e.innerText);
  // prose: the text without code, outputs, math and scripts (where MyST markup must not remain)
  const clone = root.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, div.cell_output, div.output, .math, '
                         + 'mjx-container, .MathJax, .headerlink').forEach(e => e.remove());
  const prose = clone.textContent;
  // math that is still TeX: an element of class "math" without a MathJax rendering inside
  const unrendered = [...root.querySelectorAll('span.math, div.math')]
      .filter(e => !e.querySelector('mjx-container, .MathJax, svg, math'))
      .map(e => e.textContent.trim());
  // figure captions "Figure N." (bold, first in their paragraph) and the image before them
  const all = [...root.querySelectorAll('*')];
  const figures = [];
  let lastCaption = -1;
  all.forEach((el, i) => {
    if (el.tagName !== 'STRONG' || !/^Figure \d+\.$/.test(el.textContent.trim())) return;
    const imgs = all.slice(lastCaption + 1, i)
        .filter(e => e.tagName === 'IMG' || (e.tagName === 'svg' && !e.closest('mjx-container')
                                             && e.getBoundingClientRect().width > 100));
    const img = imgs[imgs.length - 1];
    figures.push({caption: el.parentElement.textContent.trim().slice(0, 60),
                  image: !!img,
                  loaded: !img || img.tagName !== 'IMG' || (img.complete && img.naturalWidth > 0)});
    lastCaption = i;
  });
  // the scorecard: a table whose header has a Verdict and a "number" column
  let scorecard = null;
  for (const table of root.querySelectorAll('table')) {
    const head = [...table.querySelectorAll('thead th')].map(th => th.textContent.trim());
    if (!head.some(h => /^verdict/i.test(h)) || !head.some(h => /number/i.test(h))) continue;
    scorecard = [...table.querySelectorAll('tbody tr')].map(tr => {
      const row = {};
      [...tr.children].forEach((td, j) => { row[head[j] || String(j)] = td.innerText.trim(); });
      return row;
    });
  }
  return JSON.stringify({text: root.innerText, outputs, prose, unrendered_math: unrendered,
                         figures, scorecard});
})()
"""

WAIT_FOR_MATHJAX = r"""
new Promise(resolve => {
  const t0 = Date.now();
  const poll = () => {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) { mj.startup.promise.then(() => resolve(true),
                                                                          () => resolve(false)); }
    else if (!document.querySelector('span.math, div.math') || Date.now() - t0 > 5000) {
      resolve(false);
    } else { setTimeout(poll, 50); }
  };
  poll();
})
"""


# =============================================================================================
# Chromium over the DevTools Protocol, through a pipe


class CDPError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


def find_chromium() -> str:
    """The Chromium (or Chrome) executable: $CHROMIUM, else the first one on PATH."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("check_book: no Chromium found; install it (Debian/Ubuntu: "
                     "apt-get install -y chromium) or set CHROMIUM=/path/to/chrome")


class Browser:
    """One headless Chromium and one tab in it, spoken to with CDP messages over fds 3/4."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._id = 0
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self._profile = tempfile.mkdtemp(prefix="check-book-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds() -> None:  # in the child: the pipe ends become fds 3 (commands), 4 (replies)
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [executable or find_chromium(), "--headless=new", "--remote-debugging-pipe",
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-features=Translate,MediaRouter",
                # only the local server resolves: a page that needs the internet shows it
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--user-data-dir={self._profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    # ---- transport
    def _send(self, method: str, params: dict | None, session: bool) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]
        return self._id

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise CDPError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise CDPError(f"Chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        want = self._send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            if "method" in msg:
                self._events.append(msg)

    def wait_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        for i, ev in enumerate(self._events):
            if ev["method"] == method:
                return self._events.pop(i)
        while True:
            msg = self._read(deadline)
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self._events.append(msg)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": await_promise}, session=True)
        if "exceptionDetails" in res:
            raise CDPError(f"page script failed: {res['exceptionDetails'].get('text')}"
                           f" {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    # ---- pages
    def open(self, url: str) -> list[str]:
        """Navigate the tab to ``url``, wait for the load event and for MathJax; return the
        console errors and failed requests seen while loading."""
        self._events.clear()
        res = self.call("Page.navigate", {"url": url}, session=True)
        if res.get("errorText"):
            raise CDPError(f"cannot open {url}: {res['errorText']}")
        self.wait_event("Page.loadEventFired")
        self.evaluate(WAIT_FOR_MATHJAX, await_promise=True)
        self.call("Runtime.evaluate", {"expression": "1"}, session=True)  # flush pending events
        return self._console_messages()

    def _console_messages(self) -> list[str]:
        out, failed = [], {}
        for ev in self._events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("JS exception: " + (d.get("exception", {}).get("description")
                                               or d.get("text", "?")).splitlines()[0])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                if e.get("source") != "network":  # network failures are reported below, with URL
                    out.append(f"{e.get('source')}: {e.get('text')}")
            elif m == "Network.requestWillBeSent":
                failed[p["requestId"]] = p["request"]["url"]
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"request failed ({p.get('errorText')}): "
                           f"{failed.get(p['requestId'], '?')}")
            elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
                out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        self._events.clear()
        return out

    def screenshot(self, url: str, path: Path, width: int, height: int = 1400,
                   selector: str | None = None) -> None:
        """PNG of ``url`` in a ``width`` x ``height`` CSS px window: the top of the page, or
        the page scrolled so that the element ``selector`` starts at the top."""
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1,
                   "mobile": width < 600}, session=True)
        try:
            self.open(url)
            if selector:
                self.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
                    if (e) e.scrollIntoView({{block: 'start'}}); }})()""")
                time.sleep(0.3)  # let sticky headers settle
            data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
            path.write_bytes(base64.b64decode(data))
        finally:
            self.call("Emulation.clearDeviceMetricsOverride", session=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._send("Browser.close", None, False)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; yield the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def book_pages(build: Path) -> list[str]:
    """The built pages, relative to ``build``: every .html but indexes and generated folders."""
    pages = []
    for p in sorted(build.rglob("*.html")):
        rel = p.relative_to(build)
        if rel.parts[0] in SKIP_DIRS or rel.name in SKIP_PAGES:
            continue
        if rel.as_posix() == "index.html" and "http-equiv" in p.read_text(errors="ignore")[:2000]:
            continue  # the redirect to the root page
        pages.append(rel.as_posix())
    return pages


def landing_page(build: Path, pages: list[str]) -> str:
    """The root page: where index.html redirects to (intro.html), else index.html."""
    index = build / "index.html"
    if index.exists():
        m = re.search(r'url=([^"\'>]+)', index.read_text(errors="ignore")[:2000])
        if m and m.group(1).split("#")[0] in pages:
            return m.group(1).split("#")[0]
    return "index.html" if "index.html" in pages else pages[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="the built HTML folder, e.g. _build/html")
    ap.add_argument("--screenshot", type=Path, metavar="DIR",
                    help="also write PNGs of the landing page (top and scorecard) and one chapter"
                         " (top and first figure) at 1280 px and at phone width (390 px) into DIR")
    ap.add_argument("--chapter", default=None,
                    help="the chapter page to screenshot (default: the first chapters/*.html)")
    ap.add_argument("--page", action="append", default=[],
                    help="check only this page (relative to BUILD); repeatable")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per page (default 60)")
    args = ap.parse_args(argv)

    build = args.build.resolve()
    if not (build / "index.html").exists() and not list(build.glob("*.html")):
        print(f"check_book: {args.build} holds no built book (run jupyter-book build . first)",
              file=sys.stderr)
        return 2
    pages = book_pages(build)
    landing = landing_page(build, pages)
    if args.page:
        unknown = [p for p in args.page if p not in pages]
        if unknown:
            print(f"check_book: no such page(s) {unknown}; pages are e.g. {pages[:3]}",
                  file=sys.stderr)
            return 2
        pages = args.page

    t0 = time.monotonic()
    findings: list[Finding] = []
    with serve(build) as base:
        try:
            browser = Browser(timeout=args.timeout)
        except (CDPError, OSError) as e:
            print(f"check_book: cannot start Chromium: {e}", file=sys.stderr)
            return 2
        try:
            for page in pages:
                try:
                    console = browser.open(base + page)
                    data = json.loads(browser.evaluate(PAGE_SCRIPT))
                except CDPError as e:
                    findings.append(Finding(page, "browser", str(e)))
                    continue
                data["console"] = console
                page_findings = check_page(page, data, landing=(page == landing))
                findings.extend(page_findings)
                print(f"  {'FAIL' if page_findings else 'ok  '} {page}"
                      + (f"  ({len(page_findings)} problems)" if page_findings else ""))
            if args.screenshot:
                shots = args.screenshot
                shots.mkdir(parents=True, exist_ok=True)
                chapter = args.chapter or next(
                    (p for p in book_pages(build) if p.startswith("chapters/")), landing)
                for width in (1280, 390):
                    browser.screenshot(base + landing, shots / f"landing-{width}.png", width)
                    browser.screenshot(base + landing, shots / f"scorecard-{width}.png", width,
                                       selector="section#scorecard table, table")
                    name = Path(chapter).stem
                    browser.screenshot(base + chapter, shots / f"{name}-{width}.png", width)
                    browser.screenshot(base + chapter, shots / f"{name}-figure-{width}.png", width,
                                       selector="main article img")
                print(f"  screenshots in {shots}/")
        finally:
            browser.close()

    print(f"check_book: {len(pages)} pages in {time.monotonic() - t0:.1f}s,"
          f" {len(findings)} problems")
    for f in findings:
        print(f"  {f}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
