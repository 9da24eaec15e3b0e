"""
A real browser against scripts/chat_web.py: headless Chromium (Debian's `chromium`) loads the UI served on
localhost, sends a message by typing it, and sees the reply stream in token by token. Driven over the
Chrome DevTools Protocol (https://chromedevtools.github.io/devtools-protocol/) through websocket-client.

Skipped only when no Chromium binary is installed (`apt-get install -y chromium`).
"""

import json
import time
import shutil
import threading
import subprocess
import urllib.request

import pytest
import websocket

from conftest import make_tiny_chat_model

from nanochat.batch_engine import BatchEngine, Stream
from nanochat.engine import Engine
from scripts.chat_web import Replica, ServeConfig, create_app

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (apt-get install -y chromium)")]
CONTEXT = 64


class CDP:
    """DevTools commands over one websocket: send {id, method, params}, wait for the reply with that id."""

    def __init__(self, ws_url, timeout=30):
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:  # events and other replies are skipped
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def type_line(self, text):
        """Type into the focused textarea and press Enter, as a person would."""
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def close(self):
        self.ws.close()


class SlowEngine:
    """The real BatchEngine, its streams slowed down per token so that the reply is visibly incremental in the page."""

    def __init__(self, engine, delay=0.03):
        self.engine, self.delay = engine, delay

    def submit(self, *args, **kwargs):
        return SlowStream(self.engine.submit(*args, **kwargs), self.delay)

    def __getattr__(self, name):  # start, stop, stats
        return getattr(self.engine, name)


class SlowStream(Stream):
    """A real engine Stream relaying another's tokens, each `delay` seconds later."""

    def __init__(self, stream, delay):
        super().__init__()
        self.inner = stream

        def relay():
            for token in stream:
                time.sleep(delay)
                self._put(token)
            self._finish(stream.finish_reason, stream.error)
        threading.Thread(target=relay, daemon=True).start()

    def cancel(self):
        super().cancel()
        self.inner.cancel()


def wait_for(predicate, what, timeout=60, interval=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def setup():
    import uvicorn
    tok, model = make_tiny_chat_model(CONTEXT)
    app = create_app([Replica(0, "cpu", SlowEngine(BatchEngine(model, tok)), tok, CONTEXT)], ServeConfig())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start", timeout=30)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield tok, model, f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def page(tmp_path):
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-extensions", "--no-first-run", "--remote-debugging-port=0",
                             f"--user-data-dir={tmp_path}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = tmp_path / "DevToolsActivePort"  # Chromium writes the port it picked here
        wait_for(lambda: active.exists() and len(active.read_text().split()) >= 2, "Chromium's DevTools port",
                 timeout=60, interval=0.1)
        port = int(active.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        cdp = CDP(ws_url)
        cdp.call("Emulation.setFocusEmulationEnabled", enabled=True)  # headless pages have no window focus
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_streams_a_reply(setup, page):
    tok, model, url = setup
    page.call("Page.navigate", url=url)
    # the page pings /health on load and shows the result
    wait_for(lambda: page.js("document.readyState === 'complete' && document.getElementById('status').textContent")
             in ("ready · 1 worker",), "the /health ping to report ready", timeout=30)
    page.js("document.getElementById('input').focus()")
    page.type_line("/temperature 0")  # slash command: greedy decoding makes the reply predictable
    assert "temperature set to 0" in page.js("document.querySelector('.note').textContent")

    # the reply the server must produce: greedy decoding of the rendered prompt, clamped to the context
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hello fox"},
                                                     {"role": "assistant", "content": "x"}]})
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    expected = []
    for column, _ in Engine(model, tok).generate(prompt, max_tokens=CONTEXT - len(prompt), temperature=0.0):
        if column[0] in stops:
            break
        expected.append(column[0])
    expected_text = tok.decode(expected)
    assert len(expected) > 3, "the tiny model's greedy reply is too short to observe streaming"

    page.type_line("hello fox")
    snapshot = """JSON.stringify({
        state: document.body.dataset.state,
        streaming: (document.querySelector('.assistant.streaming') || {}).textContent ?? null,
        users: [...document.querySelectorAll('.message.user')].map(e => e.textContent),
        replies: [...document.querySelectorAll('.message.assistant:not(.streaming)')].map(e => e.textContent),
        errors: [...document.querySelectorAll('.error')].map(e => e.textContent)})"""
    partials = set()

    def finished():
        s = json.loads(page.js(snapshot))
        assert not s["errors"], s["errors"]
        if s["streaming"]:
            partials.add(s["streaming"])
        return s if s["state"] == "idle" and s["replies"] else None

    final = wait_for(finished, "the streamed reply")
    assert final["users"] == ["hello fox"]
    assert final["replies"] == [expected_text]
    # seen mid-stream: partial texts that are proper prefixes of the final reply
    assert any(p != expected_text and expected_text.startswith(p) for p in partials), partials

    # click the reply: it is regenerated (same text at temperature 0). The old reply element is tagged
    # first: the wait accepts only a state after the click (tag gone, a new stream seen, idle again), so a
    # regenerate that does nothing times out instead of passing on the state from before the click
    page.js("document.querySelector('.message.assistant').dataset.before = 'click'")
    page.js("document.querySelector('.message.assistant').click()")
    partials.clear()

    def regenerated():
        s = finished()
        old = page.js("document.querySelectorAll('[data-before]').length")
        return s if s and not old and partials else None

    final = wait_for(regenerated, "a new reply streamed after the click", timeout=30)
    assert final["replies"] == [expected_text] and final["users"] == ["hello fox"]
    assert any(p != expected_text and expected_text.startswith(p) for p in partials), partials
    # click the user message: it goes back into the input box and the conversation is cut there
    page.js("document.querySelector('.message.user').click()")
    assert page.js("document.getElementById('input').value") == "hello fox"
    assert page.js("document.querySelectorAll('.message.user, .message.assistant').length") == 0
