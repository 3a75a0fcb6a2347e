"""The respond page as a human gets it: real headless Chromium against the real server."""

import requests

from conftest import QUESTION, WIRE, needs_chromium, token_of
import pausepoint

pytestmark = needs_chromium

XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def ask(url, body, name="Agent"):
    """A developer signed up on the live server at `url` (shown to the person as `name`) and
    their test pause of `body`; returns (the pause as created, the key's headers)."""
    keys = requests.post(f"{url}/v1/auth/register",
                         json={"email": "dev@example.com", "name": name, "password": "password123"}).json()
    headers = {"Authorization": f"Bearer {keys['test_api_key']}"}
    return requests.post(f"{url}/v1/pause", headers=headers, json=body).json(), headers


def test_a_human_taps_a_choice_on_a_phone_sized_page_and_sees_it_recorded(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    created, headers = ask(url, {**WIRE, "message": f"Wire $340? {XSS}"})

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
    outcome = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))[0].text
    assert outcome.startswith("Recorded: Approve")
    assert browser.current_url.endswith(token_of(created["respond_url"]))   # redirected back: a reload cannot re-post
    pause = requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()
    assert pause["choice"] == "Approve" and pause["comment"] == "Known vendor, invoice matches."


def test_the_page_reads_at_320_px_and_in_dark_mode(live_server, browser):
    from selenium.webdriver.common.by import By

    url = live_server.url
    created, headers = ask(url, {
        **WIRE, "title": "Wire to Acme Corp", "options": ["Approve the wire", "Reject", "Ask me tomorrow"],
        "metadata": {"amount": "$340.00", "payee": "Acme Corporation International Holdings", "display": ["amount", "payee"]},
    }, name="Acme Finance Bot")
    browser.set_window_size(320, 700)
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 320      # nothing runs off the side
    for button in browser.find_elements(By.CSS_SELECTOR, "button[name=choice]"):
        assert button.size["height"] >= 44 and button.size["width"] >= 250                    # thumb-sized
    assert browser.find_element(By.CSS_SELECTOR, "label[for=comment]").text == "Comment (optional)"
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    body = browser.find_element(By.TAG_NAME, "body")
    assert body.value_of_css_property("background-color") == "rgba(0, 0, 0, 1)"
    assert body.value_of_css_property("color") == "rgba(245, 245, 247, 1)"
    button = browser.find_element(By.CSS_SELECTOR, "button[name=choice]")
    assert button.value_of_css_property("background-color") == "rgba(10, 88, 202, 1)"           # white on it: 6.5:1


def test_an_approver_lowers_the_amount_in_the_browser_within_its_bounds(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = live_server.url
    created, headers = ask(url, {**WIRE, "fields": {
        "amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True, "label": "Amount (USD)"},
        "payee": {"type": "string", "value": "Acme Corporation International Holdings", "editable": False},
        "rush": {"type": "boolean", "value": False, "editable": True, "label": XSS},
        "address": {"type": "string", "value": "Acme Corp\nSuite 5", "editable": True}}})
    browser.set_window_size(320, 700)
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    assert browser.title == "Your decision · PausePoint"
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 320
    amount = browser.find_element(By.ID, "field-amount")
    assert amount.size["height"] >= 44 and not browser.find_elements(By.ID, "field-payee")    # fixed: shown, not asked
    amount.clear()
    amount.send_keys("600")
    browser.find_element(By.CSS_SELECTOR, "button[value=Approve]").click()
    # The browser itself holds back a value above max; nothing was sent.
    assert browser.execute_script("return document.getElementById('field-amount').validity.rangeOverflow")
    assert requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()["status"] == "pending"
    amount = browser.find_element(By.ID, "field-amount")
    amount.clear()
    amount.send_keys("300")
    Select(browser.find_element(By.ID, "field-rush")).select_by_visible_text("Yes")
    browser.find_element(By.CSS_SELECTOR, "button[value=Approve]").click()
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))
    assert "“Amount (USD)” changed from 340 to 300." in browser.find_element(By.TAG_NAME, "main").text
    pause = requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()
    # The address went back untouched: a browser sends its line break as CRLF, and that is no edit.
    assert pause["edited"] == {"amount": {"old": 340, "new": 300}, "rush": {"old": False, "new": True}}


def test_a_team_member_votes_on_the_page_and_it_then_says_the_others_decide(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    created, headers = ask(url, {
        **QUESTION, "recipients": [{"recipient": "ana", "channel": "link"}, {"recipient": "bo", "channel": "link"}],
        "quorum": {"choice": "Approve", "count": 2}})
    first, second = (token_of(person["respond_url"]) for person in created["recipients"])

    browser.get(f"{url}/respond/{first}")
    browser.find_elements(By.CSS_SELECTOR, "button[name=choice]")[0].click()
    outcome = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))[0].text
    assert outcome.startswith("Your vote, Approve, is recorded.") and not browser.find_elements(By.TAG_NAME, "form")
    browser.get(f"{url}/respond/{second}")
    browser.find_elements(By.CSS_SELECTOR, "button[name=choice]")[0].click()
    outcome = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))[0].text
    assert outcome.startswith("Recorded: Approve")
    assert requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()["status"] == "responded"


def test_enter_in_an_amount_field_approves_nothing(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    created, headers = ask(url, {**WIRE, "fields": {
        "amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True},
        "memo": {"type": "string", "value": "Invoice 7", "editable": True}}})
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    amount = browser.find_element(By.ID, "field-amount")
    amount.clear()
    amount.send_keys("300" + Keys.ENTER)
    browser.find_element(By.ID, "field-memo").send_keys(Keys.ENTER)
    # Had Enter submitted the form, the page would now be another load, its fields as they were.
    assert browser.find_element(By.ID, "field-amount").get_attribute("value") == "300"
    assert requests.get(f"{url}/v1/pause/{created['pause_id']}", headers=headers).json()["status"] == "pending"
    assert not browser.find_element(By.CSS_SELECTOR, "form button:not([name])").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "button[value=Reject]").click()
    outcome = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))[0].text
    assert outcome.startswith("Recorded: Reject")


def test_a_question_in_arabic_reads_right_to_left_with_its_latin_names_in_order(live_server, browser):
    from selenium.webdriver.common.by import By

    url = live_server.url
    created, headers = ask(url, {
        **WIRE, "title": "تحويل 340 USD", "message": "تحويل من ACME إلى BOB؟", "options": ["موافقة", "رفض"],
        "timeout_default": "رفض", "metadata": {"المستفيد": "شركة BOB", "display": ["المستفيد"]}})
    browser.set_window_size(360, 640)
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    for selector in (".title", ".message", ".details th", ".details td", "button[name=choice]"):
        assert browser.find_element(By.CSS_SELECTOR, selector).value_of_css_property("direction") == "rtl", selector
    # Read from the right, "from ACME to BOB": ACME stands right of BOB, not swapped with it.
    left_of = lefts_of_acme_and_bob(browser)
    assert left_of[0] > left_of[1]
    assert browser.find_element(By.CSS_SELECTOR, "label[for=comment]").value_of_css_property("direction") == "ltr"


def lefts_of_acme_and_bob(browser):
    """Where "ACME" and "BOB" begin, from the left, in the page's .message: read from the right,
    "from ACME to BOB" has ACME right of BOB."""
    return browser.execute_script("""
        const text = document.querySelector('.message').firstChild, range = document.createRange();
        const left = word => { const at = text.data.indexOf(word); range.setStart(text, at);
                               range.setEnd(text, at + word.length); return range.getBoundingClientRect().left; };
        return [left('ACME'), left('BOB')];""")


def contrast(color, ground):
    """WCAG's contrast ratio of two 'rgba(r, g, b, 1)' colours."""
    def luminance(css):
        channels = [int(part) / 255 for part in css[css.index("(") + 1:].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    lighter, darker = sorted((luminance(color), luminance(ground)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_in_dark_mode_the_error_the_labels_and_the_deadline_can_be_read(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    created, headers = ask(url, {
        **WIRE, "fields": {"amount": {"type": "number", "value": 340, "max": 500, "editable": True, "label": "Amount"},
                           "payee": {"type": "string", "value": "Acme Corp", "editable": False}}})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    # As a browser that does not check the bounds itself sends it: the server refuses, the page says why.
    browser.execute_script("document.forms[0].noValidate = true")
    amount = browser.find_element(By.ID, "field-amount")
    amount.clear()
    amount.send_keys("600")
    browser.find_element(By.CSS_SELECTOR, "button[value=Approve]").click()
    error = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))[0]
    assert error.text == "Amount must be at most 500"
    ground = browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color")
    for selector in (".error", ".label", "label[for=field-amount]", ".field-label", "label[for=comment]", ".expiry"):
        color = browser.find_element(By.CSS_SELECTOR, selector).value_of_css_property("color")
        assert contrast(color, ground) >= 4.5, selector           # WCAG AA for text of this size


def test_long_unbroken_names_a_picked_option_and_an_error_stay_within_a_phone_screen(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    option = "ApproveTheWireTransferToAcmeCorporationInternationalHoldings"
    created, headers = ask(url, {
        **WIRE, "options": [option, "Reject"], "timeout_default": "Reject",
        "fields": {"amount": {"type": "number", "value": 5, "max": 10, "editable": True,
                              "label": "AmountInUnitsOfTheSettlementCurrencyAsAgreed"}}}, name="AcmeFinanceReconciliationAgentForTheTreasury" * 2)
    browser.set_window_size(360, 640)
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}?choice={option}")     # an email's button
    width = "return document.documentElement.scrollWidth"
    assert browser.execute_script(width) <= 360
    assert option in browser.find_element(By.CSS_SELECTOR, "p.picked").text
    browser.execute_script("document.forms[0].noValidate = true; document.getElementById('field-amount').value = '50'")
    browser.find_element(By.CSS_SELECTOR, "button[name=choice]").click()
    error = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))[0]
    assert "must be at most 10" in error.text
    assert browser.execute_script(width) <= 360


def test_a_double_tap_on_a_slow_connection_shows_the_answer_recorded(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    created, headers = ask(url, WIRE)
    browser.get(f"{url}/respond/{token_of(created['respond_url'])}")
    # On a slow phone connection the page is still there for the second tap: two posts, and the
    # browser shows the answer to the second.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 800,
                                                                 "downloadThroughput": -1, "uploadThroughput": -1})
    button = browser.find_element(By.CSS_SELECTOR, "button[name=choice]")
    browser.execute_script("const tap = arguments[0]; tap.click(); setTimeout(() => tap.click(), 150);", button)
    outcome = WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: b.find_elements(By.ID, "outcome"))[0]
    assert outcome.text.startswith("Recorded: Approve")
    assert not browser.find_elements(By.CSS_SELECTOR, "[role=alert]")
    assert len(requests.get(f"{url}/v1/audit", params={"event_type": "pause.responded"},
                            headers=headers).json()["events"]) == 1


def test_an_emailed_question_in_arabic_reads_right_to_left_with_its_latin_names_in_order(live_server, browser,
                                                                                          tmp_path):
    """The email's HTML part shows the question as the page does: each thing the agent wrote in
    the direction of its own text, so that read from the right "from ACME to BOB" is not "BOB … ACME"."""
    from selenium.webdriver.common.by import By

    created, _ = ask(live_server.url, {
        **WIRE, "recipient": "ada@example.com", "channel": "email", "title": "تحويل 340 USD",
        "message": "تحويل من ACME إلى BOB؟", "options": ["موافقة", "رفض"], "timeout_default": "رفض",
        "metadata": {"المستفيد": "شركة BOB", "display": ["المستفيد"]},
        "fields": {"payee": {"type": "string", "value": "شركة ACME", "label": "المستفيد النهائي"}}})
    open_its_email(live_server, browser, tmp_path, created["pause_id"])
    for selector in ("h1", ".message", ".detail", ".field", "a"):
        assert [element.value_of_css_property("direction")
                for element in browser.find_elements(By.CSS_SELECTOR, selector)] in (["rtl"], ["rtl", "rtl"]), selector
    left_of = lefts_of_acme_and_bob(browser)
    assert left_of[0] > left_of[1]


# An unbroken word as long as each thing the agent writes may be.
LONG_WORD = "W" * 1000


def overflowing(browser, width):
    """The elements of the page that run past its right edge at `width` pixels, or whose text
    runs out of their own box (a form control's text scrolls inside it, as it should)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right >"
        f" {width} + 1 || !['INPUT', 'TEXTAREA', 'SELECT'].includes(e.tagName) && e.scrollWidth > e.clientWidth + 1)"
        ".map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : ''))")


def a_question_of_long_words(url, channel="link", recipient="ops"):
    """A pause whose every text the agent writes is one unbroken word as long as it may be."""
    return ask(url, {
        **WIRE, "channel": channel, "recipient": recipient, "title": LONG_WORD[:120], "message": LONG_WORD,
        "options": [LONG_WORD[:100], "Reject"], "timeout_default": "Reject",
        "metadata": {"payee": LONG_WORD[:500], "display": ["payee"]},
        "fields": {"account": {"type": "string", "value": LONG_WORD, "label": LONG_WORD[:100]}}},
        name=LONG_WORD[:100])[0]


def test_a_read_only_fields_long_unbroken_label_and_value_stay_within_a_phone_screen(live_server, browser):
    """A value the approver may not change is shown among the agent's words, above the
    buttons: one long word there must wrap as the message does, not widen the page."""
    created = a_question_of_long_words(live_server.url)
    browser.set_window_size(360, 640)
    browser.get(f"{live_server.url}/respond/{token_of(created['respond_url'])}")
    assert overflowing(browser, 360) == []
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 360


def test_an_emails_long_unbroken_words_stay_within_a_phone_screen(live_server, browser, tmp_path):
    """The email's HTML part as a phone shows it: the question, its details, its fields and
    its buttons all wrap, so no button runs off the side."""
    created = a_question_of_long_words(live_server.url, "email", "ada@example.com")
    browser.set_window_size(360, 640)
    open_its_email(live_server, browser, tmp_path, created["pause_id"])
    assert overflowing(browser, 360) == []


def open_its_email(live_server, browser, tmp_path, pause_id):
    """Show the HTML part of the email asking the pause's question, as the server makes it."""
    conn = live_server.app.runtime.db()
    pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (pause_id,)).fetchone()
    notification = conn.execute("SELECT * FROM notifications WHERE pause_id = ?", (pause_id,)).fetchone()
    config = {**live_server.app.runtime.config, "smtp.from_address": "pp@example.org"}
    mail = pausepoint.email_message(config, notification, dict(pause)).get_body(("html",)).get_content()
    (tmp_path / "mail.html").write_text(mail, encoding="utf-8")
    browser.get((tmp_path / "mail.html").as_uri())
