"""The playground page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright;
never a downloaded browser): type a prompt, press Generate, watch streamed text arrive."""
import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from servetools import Server, tiny_checkpoint   # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not shutil.which("chromium"),
                                reason="needs Debian's chromium package (apt-get install "
                                "chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_checkpoint(str(tmp_path_factory.mktemp("page"))), "--max-tokens-cap",
               "5000")
    yield s
    s.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1100, "height": 700})
        browser.close()


def test_generate_streams_text_into_the_page(server, page, tmp_path):
    assets = []
    page.on("request", lambda r: assets.append(r.url))
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("char tokenizer")
    page.fill("#prompt", "the quick brown fox")
    page.fill("#max_tokens", "3000")
    page.fill("#seed", "7")
    page.click("#generate")
    # text arrives while the stream is still running (Stop is enabled until it ends)
    page.wait_for_function("document.getElementById('generated').textContent.length > 20")
    assert page.is_enabled("#stop")
    partial = page.text_content("#generated")
    page.wait_for_function(f"document.getElementById('generated').textContent.length > "
                           f"{len(partial) + 20}")
    page.click("#stop")
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    text = page.text_content("#generated")
    assert len(text) < 3000                                  # Stop really stopped it
    assert page.text_content("#output").startswith("the quick brown fox" + partial)
    assert "tokens/s" in page.text_content("#stats")
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    assert all(url.startswith(server.url) for url in assets)  # no CDN: every asset is ours


def test_chat_tab_streams_a_reply(server, page):
    page.goto(server.url + "/")
    page.click("#tab-chat")
    page.fill("#max_tokens", "40")
    page.fill("#message", "the dog")
    page.click("#send")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=20_000)
    log = page.text_content("#chatlog")
    assert log.startswith("user: the dogassistant: ") and len(log) > len("user: the dog"
                                                                           "assistant: ")
    assert page.text_content("#error") == ""
