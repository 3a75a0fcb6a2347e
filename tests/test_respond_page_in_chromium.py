"""The respond page as a human gets it: real headless Chromium against the real server."""

import requests

from conftest import WIRE, needs_chromium, token_of

pytestmark = needs_chromium

XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def test_a_human_taps_a_choice_on_a_phone_sized_page_and_sees_it_recorded(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    keys = requests.post(f"{url}/v1/auth/register",
                         json={"email": "b@example.com", "name": "B", "password": "password123"}).json()
    headers = {"Authorization": f"Bearer {keys['test_api_key']}"}
    created = requests.post(f"{url}/v1/pause", json={**WIRE, "message": f"Wire $340? {XSS}"}, headers=headers).json()

    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    assert browser.title == "Your decision · PausePoint"          # the injected script never ran
    assert XSS in browser.find_element(By.CSS_SELECTOR, ".message").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "button[name=choice]")
    assert [b.text for b in buttons] == ["Approve", "Reject"]
    # The stylesheet loads under the page's strict CSP: buttons are styled, not browser-default grey.
    assert buttons[0].value_of_css_property("background-color") == "rgba(10, 88, 202, 1)"
    assert buttons[0].size["width"] > 300
    browser.save_screenshot(str(tmp_path / "respond-page.png"))

    browser.find_element(By.ID, "comment").send_keys("Known vendor, invoice matches.")
    buttons[0].click()
    outcome = WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.ID, "outcome"))[0].text
    assert outcome.startswith("Recorded: Approve")
    assert browser.current_url.endswith(token_of(created["respond_url"]))   # redirected back: a reload cannot re-post
    pause = requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()
    assert pause["choice"] == "Approve" and pause["comment"] == "Known vendor, invoice matches."
