"""The picture of the chat page in docs/serving.md: a real server, a real browser, a real reply.

    python docs/screenshot.py [MODEL_DIR]     # default data/models/sft; writes docs/chat.png

Serves MODEL_DIR on a free port, opens the page in the system's chromium (Playwright), asks
two questions with greedy decoding and saves the window.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serve.live_server import LiveServer  # noqa: E402

# about a test pair and a test document (docs/evaluation.md: the showcase is held out)
QUESTIONS = ["What is 17 + 21?", "What does `subprocess.Popen.poll` do?"]


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    model = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "data/models/sft"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    srv = LiveServer(model.resolve())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(srv.url + "/")
            expect(page.locator("#model")).to_contain_text("params")
            page.fill("#max-tokens", "64")
            for i, q in enumerate(QUESTIONS):
                page.fill("#prompt", q)
                page.click("#send")
                expect(page.locator(".assistant").nth(i)).to_have_attribute(
                    "data-state", "done", timeout=60_000)
            out = REPO / "docs" / "chat.png"
            page.screenshot(path=str(out))
            browser.close()
            print(f"wrote {out}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
