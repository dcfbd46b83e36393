"""The built-in web chat page (`nanoctl/serve/static/index.html`, served at `GET /`) in headless Chromium.

The page is the unit under test. Most tests drive it against a stand-in HTTP server defined here, which
serves the packaged file and speaks the same-origin OpenAI streaming contract with scripted replies (a
slow one to press stop on, an injection attempt with a code block, a mid-stream error event, an HTTP
error, an API key). One test runs the page against a real `nanoctl serve` subprocess (a tiny trained
checkpoint, a free port, an API key). The static checks (self-contained, no HTML parsing, CSP hashes) need no browser.

Browser tests use the system Chromium and chromedriver (Debian `chromium chromium-driver`, which
`.ci/run` installs) with explicit paths, so Selenium Manager never downloads anything; they skip when
those are missing, and fail instead when NANOCTL_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.resources
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
MODEL_ID = "stand-in/d4@10"
WAIT_S = 20
INJECTION = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
CODE = 'def add(a, b):\n    return a + b  # <b>not bold</b>\n\nprint(add(1, 2), "' + "x" * 300 + '")'
LONG_WORD = "y" * 400
INJECT_REPLY = f"Here you go: {INJECTION}\nand some code:\n```python\n{CODE}\n```\n{LONG_WORD}\nThe end."
STREAM_ERROR = "stand-in: the engine failed mid-stream"
HTTP_ERROR = "messages[0].content is too long (9000 > 8000 characters)"

browser = pytest.mark.browser


def page_html() -> str:
    return (importlib.resources.files("nanoctl") / "serve" / "static" / "index.html").read_text(
        encoding="utf-8"
    )


# ---- static checks (no browser) ---------------------------------------------------------------------


class _Inline(HTMLParser):
    """Collects the inline <script>/<style> bodies exactly as the browser hashes them, and every URL."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.bodies: dict[str, list[str]] = {"script": [], "style": []}
        self.urls: list[str] = []
        self.csp: str | None = None
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in self.bodies:
            assert "src" not in a, f"<{tag}> must be inline, found src={a.get('src')}"
            self._open = tag
            self.bodies[tag].append("")
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            if a.get(name):
                self.urls.append(a[name] or "")
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp = a.get("content")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.bodies[self._open][-1] += data


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def test_page_is_packaged_and_self_contained() -> None:
    html = page_html()
    p = _Inline()
    p.feed(html)
    assert len(p.bodies["script"]) == 1 and len(p.bodies["style"]) == 1
    # The only URL attribute is the empty data: favicon (stops the browser asking for /favicon.ico).
    assert p.urls == ["data:,"], p.urls
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", html, re.I), (
        "an external reference"
    )
    script = p.bodies["script"][0]
    # API calls are relative (same origin, and still right behind a reverse proxy's path prefix).
    assert re.findall(r"fetch\(\s*\"([^\"]+)\"", script) == ["v1/chat/completions", "v1/models"]


def test_page_never_parses_html() -> None:
    """Model text reaches the DOM only through textContent / text nodes."""
    html = page_html()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "DOMParser",
        "createContextualFragment",
        "eval(",
        "new Function",
        'setTimeout("',
        "srcdoc",
    ):
        assert sink not in html, f"{sink} found in the page"
    assert not re.search(r"setAttribute\(\s*[\"']on", html)


def test_csp_allows_only_this_files_inline_code() -> None:
    html = page_html()
    p = _Inline()
    p.feed(html)
    want = {
        "default-src": "'none'",
        "script-src": _sha256(p.bodies["script"][0]),
        "style-src": _sha256(p.bodies["style"][0]),
        "connect-src": "'self'",
        "img-src": "data:",
        "base-uri": "'none'",
        "form-action": "'none'",
    }
    expected = "; ".join(f"{k} {v}" for k, v in want.items())
    assert p.csp is not None, "no Content-Security-Policy meta tag"
    got = dict(d.strip().split(None, 1) for d in p.csp.split(";") if d.strip())
    assert got == want, f"the inline script or style changed: set the CSP meta content to\n{expected}"


# ---- the stand-in server ----------------------------------------------------------------------------


class StandIn:
    """A threaded HTTP server speaking the streaming chat contract the page relies on."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # chat request bodies, in order
        self.auth_headers: list[str | None] = []
        self.disconnects: list[int] = []  # request numbers whose client went away mid-stream
        self.api_key: str | None = None
        self.n = 0
        self.lock = threading.Lock()
        self.html = page_html().encode("utf-8")
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                standin.auth_headers.append(self.headers.get("Authorization"))
                if (
                    standin.api_key is None
                    or self.headers.get("Authorization") == f"Bearer {standin.api_key}"
                ):
                    return True
                self._json(
                    401,
                    {
                        "error": {
                            "message": "missing or wrong API key",
                            "type": "authentication_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
                return False

            def do_GET(self) -> None:
                if self.path == "/":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(standin.html)))
                    self.end_headers()
                    self.wfile.write(standin.html)
                elif self.path == "/v1/models":
                    if self._authorized():
                        self._json(
                            200,
                            {
                                "object": "list",
                                "data": [
                                    {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "nanoctl"}
                                ],
                            },
                        )
                else:
                    self._json(
                        404,
                        {
                            "error": {
                                "message": f"no route {self.path}",
                                "type": "not_found",
                                "param": None,
                                "code": None,
                            }
                        },
                    )

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path != "/v1/chat/completions":
                    self._json(
                        404,
                        {"error": {"message": "no route", "type": "not_found", "param": None, "code": None}},
                    )
                    return
                if not self._authorized():
                    return
                with standin.lock:
                    standin.n += 1
                    n = standin.n
                    standin.requests.append(body)
                last = body["messages"][-1]["content"]
                if last.startswith("whole"):  # a server that ignores stream: true
                    self._json(
                        200,
                        {
                            "id": f"chatcmpl-standin-{n}",
                            "object": "chat.completion",
                            "created": 1700000000,
                            "model": MODEL_ID,
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": "all in one piece"},
                                    "finish_reason": "length",
                                }
                            ],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                        },
                    )
                    return
                if last.startswith("http400"):
                    self._json(
                        400,
                        {
                            "error": {
                                "message": HTTP_ERROR,
                                "type": "invalid_request_error",
                                "param": "messages",
                                "code": None,
                            }
                        },
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                try:
                    standin.stream(self.wfile, n, last)
                except (BrokenPipeError, ConnectionResetError):
                    standin.disconnects.append(n)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        self.requests.clear()
        self.auth_headers.clear()
        self.disconnects.clear()
        self.api_key = None

    def stream(self, w: Any, n: int, last: str) -> None:
        base = {
            "id": f"chatcmpl-standin-{n}",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL_ID,
        }

        def event(obj: Any) -> None:
            w.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            w.flush()

        def chunk(delta: dict[str, str], finish: str | None = None) -> None:
            event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        if last.startswith("slow"):
            pieces, pause = [f"w{i} " for i in range(40)], 0.05  # ~2 s: time to press stop
        elif last.startswith("inject"):
            pieces, pause = [INJECT_REPLY[i : i + 7] for i in range(0, len(INJECT_REPLY), 7)], 0.0
        elif last.startswith("error"):
            pieces, pause = ["partial ", "answer "], 0.02
        else:
            text = f"Reply #{n} to: {last}"
            pieces, pause = [text[i : i + 3] for i in range(0, len(text), 3)], 0.01
        chunk({"role": "assistant"})
        for p in pieces:
            time.sleep(pause)
            chunk({"content": p})
        if last.startswith("error"):
            event({"error": {"message": STREAM_ERROR, "type": "server_error", "param": None, "code": 500}})
            return
        chunk({}, "stop")
        event(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(pieces),
                    "total_tokens": 5 + len(pieces),
                },
            }
        )
        w.write(b"data: [DONE]\n\n")
        w.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def standin_server() -> Iterator[StandIn]:
    s = StandIn()
    yield s
    s.close()


# ---- the browser --------------------------------------------------------------------------------------


def _browser_missing() -> str | None:
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} not found (Debian package {pkg}): apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("NANOCTL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"NANOCTL_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager never fetches a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    d.set_page_load_timeout(WAIT_S)
    d.set_script_timeout(WAIT_S)
    try:
        yield d
    finally:
        d.quit()


def wait(d: Any, cond: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(cond, message=f"timed out waiting for {what}")


def open_page(d: Any, url: str, model: str | None = MODEL_ID) -> None:
    d.get(url)
    d.execute_script("localStorage.clear(); sessionStorage.clear();")
    d.get(url)
    if model:
        wait(d, lambda d: text(d, "#model-name") == model, "the model name")


def el(d: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, css)


def text(d: Any, css: str) -> str:
    return d.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css
    )


def bodies(d: Any, role: str) -> list[str]:
    return d.execute_script(
        "return [...document.querySelectorAll('#messages .msg.' + arguments[0] + ' .body')].map(e => e.textContent);",
        role,
    )


def type_and_enter(d: Any, message: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = el(d, "#input")
    lines = message.split("\n")
    for i, line in enumerate(lines):
        box.send_keys(line)
        if i < len(lines) - 1:
            box.send_keys(Keys.SHIFT, Keys.ENTER)  # Shift+Enter: a newline, not a send
    box.send_keys(Keys.ENTER)


def idle(d: Any) -> bool:
    return (
        not el(d, "#send").get_attribute("disabled") and el(d, "#stop").get_attribute("disabled") is not None
    )


def wait_reply(d: Any, count: int) -> str:
    """Waits for the count-th assistant reply to finish; returns its text."""
    wait(d, lambda d: len(bodies(d, "assistant")) == count and idle(d), f"reply {count} to finish")
    return bodies(d, "assistant")[-1]


# ---- browser tests ------------------------------------------------------------------------------------


@browser
def test_streams_multi_turn_and_shows_tokens_per_second(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    assert text(d, "#tps").strip().startswith("–")
    type_and_enter(d, "slow: tell me a story")
    wait(
        d,
        lambda d: len(bodies(d, "assistant")) == 1 and len(bodies(d, "assistant")[0]) > 0,
        "the first tokens",
    )
    assert el(d, "#stop").is_enabled() and not el(d, "#send").is_enabled()
    first = len(bodies(d, "assistant")[0])
    wait(
        d, lambda d: len(bodies(d, "assistant")[0]) > first + 10, "the reply to grow"
    )  # streamed, not at once
    reply = wait_reply(d, 1)
    assert reply == "".join(f"w{i} " for i in range(40))
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", text(d, "#tps")), text(d, "#tps")
    tps = float(text(d, "#tps").split()[0])
    assert 10 < tps < 40, tps  # 40 tokens (from usage) in a bit over 2 s
    assert "40 tokens" in el(d, "#tps").get_attribute("title")

    type_and_enter(d, "second line one\nline two")
    wait_reply(d, 2)
    assert bodies(d, "user") == ["slow: tell me a story", "second line one\nline two"]
    body = s.requests[-1]
    assert body["messages"] == [
        {"role": "user", "content": "slow: tell me a story"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "second line one\nline two"},
    ]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL_ID
    assert (body["temperature"], body["top_k"], body["top_p"], body["max_tokens"]) == (0.8, 50, 1, 512)
    assert bodies(d, "assistant")[-1] == f"Reply #{s.n} to: second line one\nline two"


@browser
def test_controls_are_sent_and_clamped(driver: Any, standin_server: StandIn) -> None:
    from selenium.webdriver.common.keys import Keys

    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    for css, value in (("#temperature", "0.3"), ("#top-k", "7"), ("#top-p", "0.9"), ("#max-tokens", "99999")):
        el(d, css).send_keys(Keys.CONTROL, "a")  # select, then type over (as a user would)
        el(d, css).send_keys(value)
    el(d, "#input").click()  # blur: the change event clamps max tokens to 4096
    type_and_enter(d, "hello")
    wait_reply(d, 1)
    body = s.requests[-1]
    assert (body["temperature"], body["top_k"], body["top_p"], body["max_tokens"]) == (0.3, 7, 0.9, 4096)
    assert el(d, "#max-tokens").get_attribute("value") == "4096"


@browser
def test_stop_ends_the_stream(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "slow again")
    wait(
        d,
        lambda d: len(bodies(d, "assistant")) == 1 and len(bodies(d, "assistant")[0]) > 5,
        "the first tokens",
    )
    el(d, "#stop").click()
    wait(d, idle, "stop to end the reply")
    stopped_at = bodies(d, "assistant")[0]
    assert 0 < len(stopped_at) < len("".join(f"w{i} " for i in range(40)))
    wait(d, lambda d: s.disconnects == [s.n], "the server to see the client go", timeout=5)
    time.sleep(0.5)
    assert bodies(d, "assistant")[0] == stopped_at, "the reply kept growing after stop"
    assert "stopped" in text(d, ".msg.assistant .meta")
    # The partial reply stays in the conversation.
    type_and_enter(d, "go on")
    wait_reply(d, 2)
    assert s.requests[-1]["messages"][1] == {"role": "assistant", "content": stopped_at}


@browser
def test_regenerate_replaces_the_last_reply(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "hi")
    first = wait_reply(d, 1)
    assert first == f"Reply #{s.n} to: hi"
    el(d, "#regenerate").click()
    wait(
        d,
        lambda d: bodies(d, "assistant") == [f"Reply #{s.n} to: hi"] and idle(d) and len(s.requests) == 2,
        "the regenerated reply",
    )
    assert bodies(d, "assistant")[0] != first and bodies(d, "user") == ["hi"]
    assert s.requests[-1]["messages"] == [{"role": "user", "content": "hi"}]


@browser
def test_edit_and_resend_drops_what_followed(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "first")
    reply1 = wait_reply(d, 1)
    type_and_enter(d, "second")
    wait_reply(d, 2)
    el(d, "#edit").click()
    box = el(d, "#input")
    assert box.get_attribute("value") == "second"
    assert el(d, "#send").text == "Resend"
    assert len(d.find_elements("css selector", ".msg.user.editing")) == 1
    box.clear()
    type_and_enter(d, "second, edited")
    wait(d, lambda d: len(s.requests) == 3 and idle(d), "the resent turn")
    assert bodies(d, "user") == ["first", "second, edited"]
    assert bodies(d, "assistant") == [reply1, f"Reply #{s.n} to: second, edited"]
    assert s.requests[-1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": "second, edited"},
    ]
    assert el(d, "#send").text == "Send"


@browser
def test_new_chat_clears_history(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "slow, then dropped")  # new chat mid-stream stops the stream too
    wait(d, lambda d: len(bodies(d, "assistant")) == 1 and bodies(d, "assistant")[0], "the first tokens")
    el(d, "#new-chat").click()
    wait(d, lambda d: idle(d) and not bodies(d, "assistant"), "the stream to end with the chat")
    wait(d, lambda d: s.disconnects == [s.n], "the server to see the client go", timeout=5)
    type_and_enter(d, "remember this")
    wait_reply(d, 1)
    el(d, "#new-chat").click()
    assert d.execute_script("return document.querySelectorAll('#messages .msg').length") == 0
    assert not el(d, "#regenerate").is_enabled() and not el(d, "#edit").is_enabled()
    type_and_enter(d, "fresh start")
    wait_reply(d, 1)
    assert s.requests[-1]["messages"] == [{"role": "user", "content": "fresh start"}]


@browser
def test_untrusted_reply_shows_as_text_and_code_as_code(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "inject please")
    wait_reply(d, 1)
    time.sleep(0.3)  # an onerror handler would have fired by now
    assert d.execute_script("return typeof window.__pwned") == "undefined"
    found = d.execute_script("""
        const m = document.querySelector('#messages .msg.assistant');
        return {
          text: m.querySelector('.text').textContent,
          tags: [...m.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
          code: [...m.querySelectorAll('pre > code')].map(e => e.textContent),
          lang: m.querySelector('pre > code').dataset.lang,
        };""")
    assert found["text"] == f"Here you go: {INJECTION}\nand some code:", found["text"]
    assert "script" not in found["tags"] and "img" not in found["tags"] and "b" not in found["tags"]
    assert found["code"] == [CODE] and found["lang"] == "python"
    assert bodies(d, "assistant")[0].endswith(f"{LONG_WORD}\nThe end.")


@browser
def test_errors_are_shown(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "error now")
    wait_reply(d, 1)
    assert bodies(d, "assistant") == ["partial answer "]  # what came before the error event is kept
    assert text(d, ".msg.assistant .meta .error") == STREAM_ERROR
    type_and_enter(d, "http400 please")
    wait_reply(d, 2)
    assert text(d, ".msg.assistant:last-child .meta .error") == f"HTTP 400: {HTTP_ERROR}"
    # A turn that got no reply is replaced by the next one: roles keep alternating.
    type_and_enter(d, "after the error")
    wait_reply(d, 2)
    assert bodies(d, "user") == ["error now", "after the error"]
    assert [m["role"] for m in s.requests[-1]["messages"]] == ["user", "assistant", "user"]


@browser
def test_a_whole_json_reply_is_shown(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    open_page(d, s.url)
    type_and_enter(d, "whole, please")
    assert wait_reply(d, 1) == "all in one piece"
    assert text(d, ".msg.assistant .meta") == "cut off at max tokens"
    assert "4 tokens" in el(d, "#tps").get_attribute("title")


@browser
def test_api_key_is_asked_for_and_sent(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    s.api_key = "sekrit"
    try:
        open_page(d, s.url, model=None)
        wait(d, lambda d: el(d, "#auth").is_displayed(), "the API key prompt")
        assert text(d, "#model-name") == "API key needed"
        el(d, "#api-key").send_keys("sekrit")
        el(d, "#api-key-save").click()
        wait(d, lambda d: text(d, "#model-name") == MODEL_ID, "the model name with the key")
        assert not el(d, "#auth").is_displayed()
        assert d.execute_script("return sessionStorage.getItem('nanoctl.apiKey')") == "sekrit"
        type_and_enter(d, "hello with a key")
        wait_reply(d, 1)
        assert s.auth_headers[-1] == "Bearer sekrit"
        # A key the server stops accepting: the prompt comes back, and the key retries the turn.
        s.api_key = "rotated"
        type_and_enter(d, "hello again")
        wait(d, lambda d: el(d, "#auth").is_displayed() and idle(d), "the prompt after a 401")
        assert "refused" in text(d, "#auth-label")
        el(d, "#api-key").send_keys("rotated")
        el(d, "#api-key-save").click()
        wait(
            d,
            lambda d: bodies(d, "assistant")[-1] == f"Reply #{s.n} to: hello again" and idle(d),
            "the retry",
        )
        assert s.auth_headers[-1] == "Bearer rotated"
        assert len(bodies(d, "assistant")) == 2
    finally:
        s.api_key = None


@browser
def test_usable_at_phone_width(driver: Any, standin_server: StandIn) -> None:
    d, s = driver, standin_server
    s.reset()
    d.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 800, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        open_page(d, s.url)
        assert d.execute_script("return window.innerWidth") == 375
        type_and_enter(d, "inject a long code line")
        wait_reply(d, 1)
        type_and_enter(d, "slow " + "z" * 300)
        wait_reply(d, 2)
        width = d.execute_script("return document.documentElement.scrollWidth")
        assert width <= 375 + 1, f"horizontal scroll at 375 px: scrollWidth {width}"
        rights = d.execute_script("""
            return [...document.querySelectorAll('button, input, textarea, #messages .msg')]
              .filter(e => e.offsetParent !== null)
              .map(e => [e.id || e.className, Math.round(e.getBoundingClientRect().right)]);""")
        assert all(r <= 376 for _, r in rights), [x for x in rights if x[1] > 376]
        # The code scrolls inside its own box instead.
        assert d.execute_script(
            "const p = document.querySelector('pre'); return p.scrollWidth > p.clientWidth"
        )
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# ---- against the real server ---------------------------------------------------------------------------


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[str]:
    """`nanoctl serve` on a free port over a tiny trained checkpoint, with an API key; killed by group."""
    pytest.importorskip("nanoctl.serve.server", reason="nanoctl serve is not built yet")
    from tiny_chat import save_model, single_thread, trained_chat_model

    home = tmp_path / "home"
    home.mkdir()
    with single_thread():
        save_model(home, trained_chat_model())
    env = {k: v for k, v in os.environ.items() if k != "NANOCTL_API_KEY"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoctl", "--home", str(home), "serve", "--port", "0", "--device", "cpu",
         "--api-key", "k3y", "--json"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    events: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with_event = line.strip()
            if with_event.startswith("{"):
                events.append(json.loads(with_event))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while not any(e["event"] == "ready" for e in events):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(
                    f"nanoctl serve did not become ready: {(tmp_path / 'serve.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield next(e["url"] for e in events if e["event"] == "ready").rstrip("/") + "/"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


@browser
def test_page_against_the_real_server(driver: Any, real_server: str) -> None:
    from selenium.webdriver.common.keys import Keys

    d = driver
    open_page(d, real_server, model=None)  # the page itself needs no key
    wait(d, lambda d: el(d, "#auth").is_displayed(), "the API key prompt")
    el(d, "#api-key").send_keys("k3y", Keys.ENTER)
    wait(d, lambda d: text(d, "#model-name") == "sft/d2@100", "the checkpoint label as the model name")
    el(d, "#temperature").send_keys(Keys.CONTROL, "a")
    el(d, "#temperature").send_keys("0")  # greedy: the memorized reply
    type_and_enter(d, "hi")
    assert wait_reply(d, 1) == "hello there"
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", text(d, "#tps")), text(d, "#tps")
    assert re.match(r"\d+ tokens in ", el(d, "#tps").get_attribute("title"))  # from usage, not counted
    assert text(d, ".msg.assistant .meta") == ""
