"""The chat page in a real headless browser (the system's chromium, driven by Playwright)."""

import contextlib
import shutil

import pytest

from tests.serve.live_server import LiveServer, never_stopping_model

pytestmark = pytest.mark.slow  # a real browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency "
                               "(pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH: `apt-get install chromium` (CI installs it)",
                allow_module_level=True)


@contextlib.contextmanager
def chat_page(url):
    """The chat page at ``url`` in headless chromium; closed on the way out."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_page_streams_the_same_reply_as_the_api_and_stops(tmp_path, tiny_tokenizer):
    import httpx

    path, _ = never_stopping_model(tmp_path, tiny_tokenizer)
    srv = LiveServer(path)
    try:
        api = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me about lists"}],
            "temperature": 0, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
        with chat_page(srv.url) as page:
            sync_api.expect(page.locator("#model")).to_contain_text("m · ")
            page.fill("#max-tokens", "24")
            page.fill("#prompt", "Tell me about lists")
            page.click("#send")
            reply = page.locator(".assistant").last
            sync_api.expect(reply).to_have_attribute("data-state", "done", timeout=30_000)
            assert reply.text_content() == api
            assert page.locator(".user").last.text_content() == "Tell me about lists"
            assert "cut at max tokens" in page.locator(".meta").last.text_content()

            # a long reply, stopped from the page: the server frees the slot
            page.fill("#max-tokens", "1900")
            page.fill("#prompt", "go on")
            page.click("#send")
            sync_api.expect(page.locator("#stop")).to_be_enabled()
            page.wait_for_function("document.querySelectorAll('.assistant')[1]"
                                   ".textContent.length > 0")
            page.click("#stop")
            sync_api.expect(page.locator(".assistant").last).to_have_attribute(
                "data-state", "done")
            assert srv.wait_idle(10), srv.health()
            assert page.locator("#error").text_content() == ""
    finally:
        srv.stop()


def test_page_asks_for_the_api_key_once_and_keeps_the_message(tmp_path, tiny_tokenizer):
    path, _ = never_stopping_model(tmp_path, tiny_tokenizer, max_seq_len=64)
    srv = LiveServer(path, "--api-key", "page-key")
    try:
        with chat_page(srv.url) as page:
            key = page.locator("#api-key")
            sync_api.expect(key).to_be_visible()  # /health said a key is needed
            page.fill("#max-tokens", "3")
            page.fill("#prompt", "hello")
            page.click("#send")  # without the key: refused, nothing lost
            sync_api.expect(page.locator("#error")).to_contain_text("needs an API key")
            assert page.locator(".assistant").count() == 0
            assert page.input_value("#prompt") == "hello"
            key.fill("wrong")
            page.click("#send")
            sync_api.expect(page.locator("#error")).to_contain_text("refused this API key")
            key.fill("page-key")
            for text in ("hello", "again"):  # typed once, sent with every request
                page.fill("#prompt", text)
                page.click("#send")
                sync_api.expect(page.locator(".assistant").last).to_have_attribute(
                    "data-state", "done", timeout=30_000)
            assert page.locator(".assistant").count() == 2
            assert page.locator("#error").text_content() == ""
            stored = page.evaluate("[localStorage.length, sessionStorage.length, "
                                   "document.cookie]")
            assert stored == [0, 0, ""]
    finally:
        srv.stop()
