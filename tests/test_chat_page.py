"""The chat page at `/` in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by selenium through /usr/bin/chromedriver: no browser is downloaded): it loads, a prompt
is typed and sent, the streamed answer appears, time to first token and tokens/s show, the
conversation is kept for the next turn, the settings survive a reload, and nothing is fetched
from anywhere but the server.
A screenshot is saved (tmp_path/chat.png).

    bash .ci/install-chromium.sh && python3 -m pytest -q tests/test_chat_page.py
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from gdsllm.service.client import Client
from http_helpers import HttpServe

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STATIC = Path(__file__).resolve().parents[1] / "gdsllm" / "service" / "http" / "static"
N = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gdsllm.convert.synth import synth
    root = tmp_path_factory.mktemp("page")
    model = synth(root / "tiny", shape="tiny", layers=4, dtype="float32", seed=11)
    s = HttpServe(model, root / "serve.log")
    yield s
    assert s.stop() == 0, s.log_tail()


@pytest.fixture
def browser(tmp_path):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: run .ci/install-chromium.sh (Debian's chromium, chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1100,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def text_of(driver, css: str) -> str:
    """textContent, exactly (selenium's .text normalizes whitespace)."""
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", css)


def send_and_wait(driver, prompt: str, turn: int) -> str:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(prompt)
    box.send_keys(Keys.ENTER)  # Enter sends
    WebDriverWait(driver, 120).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="1"]')) == turn)
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), text_of(driver, ".msg.error")
    return driver.execute_script(
        "const m = document.querySelectorAll('.msg.assistant .content'); return m[m.length - 1].textContent")


def test_chat_page_streams_an_answer_and_keeps_the_conversation(server, browser, tmp_path):
    for f in STATIC.iterdir():  # nothing on the page may come from the internet
        assert not re.search(r"(https?:)?//[a-z0-9]", re.sub(r"^\s*//.*$|<!--.*?-->", "", f.read_text(),
                                                                flags=re.M | re.S)), f
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    assert browser.title == "GdsLLM chat" and browser.find_element(By.ID, "status").text == "ok"
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", str(N))):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)

    first = send_and_wait(browser, "hi there", 1)
    with Client(server.endpoint, timeout=120) as c:
        history = [{"role": "user", "content": "hi there"}]
        ref = c.generate(messages=history, max_tokens=N, temperature=0)
        assert first == ref.text and first  # the whole streamed answer, in the page
        assert re.fullmatch(r"\d+\.\d\d s", text_of(browser, "#ttft"))
        assert re.fullmatch(r"\d+(\.\d)? tokens/s", text_of(browser, "#tps"))
        assert float(text_of(browser, "#tps").split()[0]) > 0
        assert text_of(browser, "#tokens") == str(ref.completion_tokens)
        # The second turn carries the first: the same answer as the ZeroMQ client's for the history.
        second = send_and_wait(browser, "and then?", 2)
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
        assert second == c.generate(messages=history, max_tokens=N, temperature=0).text
    users = browser.execute_script(
        "return [...document.querySelectorAll('.msg.user .content')].map(e => e.textContent)")
    assert users == ["hi there", "and then?"]
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.startswith(server.url + "/") for u in fetched), fetched
    shot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # The settings survive a reload (localStorage), as typed above.
    browser.refresh()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    assert [browser.find_element(By.ID, f).get_attribute("value")
            for f in ("temperature", "max-tokens", "top-p")] == ["0", str(N), "0.95"]


def test_chat_page_stop_button_cancels_the_stream(server, browser):
    """Stop aborts the fetch: the server sees the client leave and the coordinator cancels."""
    from http_helpers import get, scrape, wait_for
    key = ("gdsllm_requests_total", (("finish_reason", "cancelled"),))
    prompt = "tell me a long story"
    with Client(server.endpoint, timeout=120) as c:  # greedy runs long here: no eos to race with
        ref = c.generate(messages=[{"role": "user", "content": prompt}], max_tokens=160, temperature=0)
        assert ref.finish_reason == "length"
    before = scrape(server.metrics_port)[key]
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", "480")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60, poll_frequency=0.05).until(lambda d: text_of(d, ".msg.assistant .content"))
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(lambda d: text_of(d, "#finish") == "finish: stopped")
    wait_for(lambda: scrape(server.metrics_port)[key] == before + 1, "for the cancel", timeout=30)
    assert get(server.url + "/health")[1]["requests_running"] == 0
