"""The search page in a real headless browser (Debian's Chromium): a typed query shows result images."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from localstack.http_server import BackgroundServer
from search.server import create_app
from search.sharded import ShardedIndex

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "make setup installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_a_typed_query_shows_result_images(colour_index, query_embedder, browser, tmp_path):
    index_dir, _, _ = colour_index
    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder)) as server:
        browser.get(server.url + "/")
        box = browser.find_element(By.ID, "q")
        box.send_keys("green shirt")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait = WebDriverWait(browser, 30)
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result img")))
        # Every result image has actually loaded from the image host.
        wait.until(lambda driver: driver.execute_script(
            "const imgs = [...document.querySelectorAll('.result img')];"
            "return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0);"))
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert len(cards) == 24
        assert "shirt" in cards[0].find_element(By.CSS_SELECTOR, ".title").text
        assert "results in" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "page.png"))
