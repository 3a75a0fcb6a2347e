"""The dashboard as a developer uses it, and the respond page as their human does:
real headless Chromium against the real server. Screenshots go to docs/screenshots."""

import os

import requests

from conftest import ROOT, WIRE, needs_chromium, serving, stored, token_of

pytestmark = needs_chromium

SCREENSHOTS = os.path.join(ROOT, "docs", "screenshots")


def fill(browser, **fields):
    from selenium.webdriver.common.by import By
    for name, value in fields.items():
        field = browser.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)


def click(browser, selector):
    """Click, and wait for the page it leads to."""
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    element = browser.find_element(By.CSS_SELECTOR, selector)
    element.click()
    # Asked mid-navigation, Chromium may answer that the node left the document: ask again.
    WebDriverWait(browser, 10, poll_frequency=0.05, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(element))


def test_sign_up_log_in_watch_a_pause_get_answered_and_see_it_counted(live_server, browser):
    from selenium.webdriver.common.by import By

    url = live_server.url
    os.makedirs(SCREENSHOTS, exist_ok=True)
    browser.set_window_size(1280, 900)

    browser.get(url + "/")
    click(browser, "a[href='/dashboard/signup']")
    fill(browser, email="dana@example.com", name="Dana's agents", password="correct horse battery")
    click(browser, "form button[type=submit]")
    assert "you will not see these again" in browser.page_source
    keys = [field.get_attribute("value") for field in browser.find_elements(By.CSS_SELECTOR, "input.secret")]
    assert keys[0].startswith("pp_live_") and keys[1].startswith("pp_test_")
    copy = browser.find_elements(By.CSS_SELECTOR, "button[data-copy]")
    assert len(copy) == 2 and all(button.is_displayed() for button in copy)     # the script ran under the CSP
    click(browser, "a[href='/dashboard/overview']")
    browser.back()                                 # not kept for the Back button: asked again, and gone
    assert browser.current_url.endswith("/dashboard/keys") and not browser.find_elements(By.CSS_SELECTOR, "input.secret")
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.ID, "key")).select_by_value("live")
    fill(browser, password="correct horse battery")
    click(browser, "form[action='/dashboard/keys/rotate'] button")
    assert browser.find_element(By.CSS_SELECTOR, "input.secret").get_attribute("value").startswith("pp_live_")
    browser.get("data:text/html,elsewhere")        # leaving the dashboard altogether, then Back
    browser.back()
    assert not [field for field in browser.find_elements(By.CSS_SELECTOR, "input.secret") if field.get_attribute("value")]

    click(browser, "form.logout button")
    assert browser.current_url.endswith("/dashboard/login")
    browser.get(url + "/dashboard/pauses")                                     # logged out: sent to log in
    assert "/dashboard/login?next=" in browser.current_url
    fill(browser, email="dana@example.com", password="correct horse battery")
    click(browser, "form.stack button")
    assert browser.current_url.endswith("/dashboard/pauses")
    assert browser.find_element(By.ID, "test-mode").is_displayed()

    headers = {"Authorization": f"Bearer {keys[1]}"}
    created = requests.post(f"{url}/v1/pause", headers=headers, json={
        **WIRE, "title": "Wire to Acme Corp", "message": "Wire $340 to Acme Corp for invoice 7?",
        "metadata": {"amount": "$340.00", "payee": "Acme Corp", "invoice": "INV-7", "display": ["amount", "payee", "invoice"]},
    }).json()
    browser.refresh()
    row = browser.find_element(By.CSS_SELECTOR, "#pauses tbody tr")
    assert "Wire $340" in row.text and "pending" in row.text
    browser.save_screenshot(os.path.join(SCREENSHOTS, "pauses.png"))

    dashboard = browser.current_window_handle
    browser.switch_to.new_window("window")
    browser.set_window_size(375, 812)
    browser.get(created["respond_url"].replace("http://127.0.0.1:8080", url))
    browser.save_screenshot(os.path.join(SCREENSHOTS, "respond-375px.png"))
    assert browser.find_element(By.CSS_SELECTOR, "button[name=choice]").size["width"] >= 300
    click(browser, "button[name=choice]")
    assert browser.find_element(By.ID, "outcome").text.startswith("Recorded: Approve")
    browser.close()
    browser.switch_to.window(dashboard)

    browser.get(f"{url}/dashboard/pauses/{created['pause_id']}")
    assert browser.find_element(By.ID, "status").text == "responded"
    assert browser.find_element(By.ID, "choice").text == "Approve"
    timeline = [item.find_element(By.TAG_NAME, "strong").text
                for item in browser.find_elements(By.CSS_SELECTOR, "#timeline li")]
    assert timeline[0] == "pause.created" and timeline[-1] == "pause.responded"     # the simulated text between
    browser.get(url + "/dashboard/overview")
    assert browser.find_element(By.ID, "total").text == "1"
    assert browser.find_element(By.ID, "timeout-share").text == "0%"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.approved")) == 1
    browser.save_screenshot(os.path.join(SCREENSHOTS, "overview.png"))


def test_in_the_browser_forged_forms_lapsed_sign_ins_and_other_tenants_get_nowhere(live_server, browser):
    from selenium.webdriver.common.by import By

    url, config = live_server.url, live_server.app.runtime.config
    browser.get(url + "/dashboard/signup")
    fill(browser, email="first@example.com", name="First", password="correct horse battery")
    click(browser, "form button[type=submit]")
    test_key = browser.find_elements(By.CSS_SELECTOR, "input.secret")[1].get_attribute("value")
    created = requests.post(f"{url}/v1/pause", json=WIRE, headers={"Authorization": f"Bearer {test_key}"}).json()
    hook = requests.post(f"{url}/v1/webhooks", json={"url": "https://hooks.example.com/first", "events": ["pause.created"]},
                         headers={"Authorization": f"Bearer {test_key}"}).json()

    browser.get(f"{url}/dashboard/pauses/{created['pause_id']}")             # a form whose token is gone
    browser.execute_script("document.querySelector('form.logout input[name=csrf]').value = 'forged'")
    click(browser, "form.logout button")
    assert "did not come from this site" in browser.find_element(By.ID, "outcome").text
    browser.get(f"{url}/dashboard/pauses/{created['pause_id']}")
    assert browser.find_element(By.ID, "status").text == "pending"           # still signed in, nothing changed

    stored(config, "UPDATE dashboard_sessions SET last_seen_at = '2000-01-01T00:00:00.000Z'")
    browser.get(f"{url}/dashboard/pauses")                                    # the sign-in lapsed
    assert "/dashboard/login?next=" in browser.current_url

    browser.delete_all_cookies()
    browser.get(url + "/dashboard/signup")
    fill(browser, email="second@example.com", name="Second", password="correct horse battery")
    click(browser, "form button[type=submit]")
    for path in (f"audit?pause_id={created['pause_id']}", "pauses", "audit", "webhooks"):
        browser.get(f"{url}/dashboard/{path}")
        main = browser.find_element(By.TAG_NAME, "main").text
        assert created["pause_id"] not in main and "hooks.example.com" not in main
    browser.get(f"{url}/dashboard/webhooks/{hook['webhook_id']}")
    assert browser.find_element(By.ID, "outcome").text.startswith("No webhook")
    browser.get(f"{url}/dashboard/pauses/{created['pause_id']}")             # by URL: as if it did not exist
    assert browser.find_element(By.ID, "outcome").text.startswith("No pause")
    assert WIRE["message"] not in browser.page_source


def test_cancelling_a_pause_and_deleting_an_endpoint_take_a_second_tap_that_says_what_follows(live_server, browser):
    from selenium.webdriver.common.by import By

    url = live_server.url
    browser.get(url + "/dashboard/signup")
    fill(browser, email="careful@example.com", name="Careful", password="correct horse battery")
    click(browser, "form button[type=submit]")
    headers = {"Authorization": f"Bearer {browser.find_elements(By.CSS_SELECTOR, 'input.secret')[1].get_attribute('value')}"}
    created = requests.post(f"{url}/v1/pause", json=WIRE, headers=headers).json()
    hook = requests.post(f"{url}/v1/webhooks", json={"url": "https://hooks.example.com/h", "events": ["pause.created"]},
                         headers=headers).json()

    browser.get(f"{url}/dashboard/pauses/{created['pause_id']}")
    cancel = browser.find_element(By.CSS_SELECTOR, "button.danger")
    assert not cancel.is_displayed()                       # a stray tap on the page cannot reach it
    browser.find_element(By.CSS_SELECTOR, "#cancel summary").click()
    assert "cannot be undone" in browser.find_element(By.ID, "cancel").text and cancel.is_displayed()
    click(browser, "#cancel button.danger")
    assert browser.find_element(By.ID, "status").text == "cancelled"

    browser.get(f"{url}/dashboard/webhooks/{hook['webhook_id']}")
    delete = browser.find_element(By.CSS_SELECTOR, "button[value=delete]")
    assert not delete.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#delete summary").click()
    assert "cannot be brought back" in browser.find_element(By.ID, "delete").text
    click(browser, "button[value=delete]")
    assert browser.current_url.endswith("/dashboard/webhooks") and "hooks.example.com" not in browser.page_source


def test_on_a_phone_each_audit_event_fits_on_the_screen(live_server, browser):
    from selenium.webdriver.common.by import By

    url = live_server.url
    browser.set_window_size(360, 640)
    browser.get(url + "/dashboard/signup")
    fill(browser, email="phone@example.com", name="Phone", password="correct horse battery")
    click(browser, "form button[type=submit]")
    headers = {"Authorization": f"Bearer {browser.find_elements(By.CSS_SELECTOR, 'input.secret')[1].get_attribute('value')}"}
    created = requests.post(f"{url}/v1/pause", json=WIRE, headers=headers).json()
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")     # its event holds the long user agent

    browser.get(url + "/dashboard/audit")
    rows = browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")
    # (The notification job may have recorded its simulated send after the opening.)
    assert any("respond_page.opened" in row.text for row in rows)
    # Its data column was squeezed to a few letters a line: one event ran to two screens.
    assert all(row.size["height"] < 640 for row in rows)
    assert browser.find_element(By.CSS_SELECTOR, "#events td.text").size["width"] >= 250


def test_behind_https_the_browser_keeps_the_host_only_cookies_and_stays_signed_in(tmp_path, first_start, browser):
    """A server whose base_url is https sets __Host- cookies, which a browser drops unless they
    are exactly as it requires. Chromium treats http://localhost as https for cookies."""
    from selenium.webdriver.common.by import By

    with serving(tmp_path, first_start, **{"server.base_url": "https://approvals.example.com"}) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        browser.get(url + "/dashboard/signup")
        fill(browser, email="tls@example.com", name="TLS", password="correct horse battery")
        click(browser, "form button[type=submit]")
        assert browser.find_elements(By.CSS_SELECTOR, "input.secret")
        browser.get(url + "/dashboard/overview")
        assert "tls@example.com" in browser.find_element(By.TAG_NAME, "body").text
        assert {cookie["name"] for cookie in browser.get_cookies()} >= {"__Host-pp_session", "__Host-pp_device"}
