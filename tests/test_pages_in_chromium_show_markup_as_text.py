"""Whatever an agent, a developer or a person answering writes is text on every page PausePoint
serves, and in its emails: markup planted in every input they reach, each page opened in real
headless Chromium with the page's CSP turned off (so that escaping alone is tested, not the CSP
behind it), and each page's HTML as the server sent it read by a parser."""

import html.parser
import http.server
import re
import threading
import urllib.parse

import pytest
import requests

from conftest import PASSWORD, needs_chromium, run_out, serving, stored, token_of, wait_until
import test_channels

pytestmark = needs_chromium
# What an email address may hold: no angle bracket or double quote, but the other ways out.
EMAIL = "o'`onfocus=__pp_pwned=1`'@example.com"
smtp_server = test_channels.smtp_server      # a fixture: a mail server on loopback keeping what it is sent


class Lure:
    """A loopback server that records every request: planted markup that became markup loads
    from it. Each planted text names its input in the path it would load."""

    def __init__(self):
        self.requests = []
        lure = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                lure.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def short(self, where):
        """At most 100 characters on one line (an option, a label, a name): breaks out of an
        attribute quoted either way, or of text, into an image whose failure sets the marker."""
        return f"'\"`><img src=//{self.origin}/pp-{where} onerror=__pp_pwned=1>"

    def middle(self, where):
        """At most 200 characters (whom a link or a push asks)."""
        return f"{self.short(where)}<script>__pp_pwned=1</script><svg onload=__pp_pwned=1>"

    def long(self, where):
        """For a message or a comment: every way out of text or an attribute we know of."""
        return (f"{self.short(where)}\n</textarea></title></style><script>__pp_pwned=1</script>"
                f"<svg onload=__pp_pwned=1><a href=\"javascript:__pp_pwned=1\">Approve</a>"
                f"<iframe src=\"data:text/html,<script>parent.__pp_pwned=1</script>\"></iframe>"
                f"<style>*{{background:url(//{self.origin}/css-{where})}}</style>"
                f"<form action=//{self.origin}/form-{where}><button>Reject</button></form>"
                f"{{{{!'<b>'}}}} {{{{7*7}}}}\n% __pp_pwned = 1\n<% __pp_pwned = 1 %>")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lure():
    started = Lure()
    yield started
    started.close()


# The elements and attributes PausePoint's own pages and emails are made of.
OUR_TAGS = {"html", "head", "meta", "title", "link", "script", "body", "main", "footer", "header", "nav", "a",
            "form", "input", "button", "span", "strong", "p", "h1", "h2", "div", "label", "select", "option",
            "textarea", "table", "thead", "tbody", "tr", "th", "td", "code", "pre", "dl", "dt", "dd", "ul", "ol",
            "li", "section", "blockquote", "bdi", "br", "details", "summary", "fieldset", "legend", "time",
            "figure", "figcaption", "svg", "rect", "line", "text"}


class Parsed(html.parser.HTMLParser):
    """A page's elements, attributes and text as a browser's parser reads them."""

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.elements, self.texts = [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self.texts.extend(value for _, value in attrs if value)

    def handle_data(self, data):
        self.texts.append(data)


def markup_of_ours_alone(page, where, styled=False):
    """Assert that `page` (HTML as sent) holds no element or attribute but ours, and the text
    planted for each of `where` as text: escaped, not left out. Only an email (`styled`) has
    style attributes: a page's CSP would not apply them."""
    parsed = Parsed(page)
    for tag, attrs in parsed.elements:
        assert tag in OUR_TAGS, (tag, attrs)
        assert not [name for name in attrs if name.startswith("on") or name in ("srcdoc", "formaction")
                    or name == "style" and not styled], (tag, attrs)
        for name in ("href", "src", "action"):
            assert not re.match(r"\s*(javascript|data|vbscript):", attrs.get(name) or "", re.I), (tag, attrs)
        assert tag != "script" or attrs == {"src": "/static/dashboard.js", "defer": None}
    text = "\n".join(parsed.texts)
    for name in where:
        assert name in text, name


class Visits:
    """Pages opened twice: in the browser, which must run nothing planted and load nothing from
    the lure, and over HTTP, whose HTML markup_of_ours_alone() reads."""

    def __init__(self, url, browser, lure):
        self.url, self.browser, self.lure = url, browser, lure
        self.http = requests.Session()
        self.seen = 0
        browser.execute_cdp_cmd("Page.setBypassCSP", {"enabled": True})

    def signed_in_as_the_browser(self):
        for cookie in self.browser.get_cookies():
            self.http.cookies.set(cookie["name"], cookie["value"], path=cookie["path"])

    def get(self, path, *where, status=200):
        self.browser.get(self.url + path)
        self.nothing_ran(path)
        answer = self.http.get(self.url + path, allow_redirects=False)
        assert answer.status_code == status, (path, answer.status_code, answer.text[:300])
        markup_of_ours_alone(answer.text, where)

    def post(self, page, action, values, *where, status=200):
        """The form of `action` on `page`, posted with `values` (checks in the browser left out)."""
        self.browser.get(self.url + page)
        old = self.browser.find_element("css selector", "html")
        self.browser.execute_script(SUBMIT, action, values)
        wait_until(lambda: not self.still(old))
        self.nothing_ran(f"{action} from {page}")
        token = self.csrf(page)
        answer = self.http.post(self.url + action, data={**values, **({"csrf": token} if token else {})})
        assert answer.status_code == status, (action, answer.status_code, answer.text[:300])
        markup_of_ours_alone(answer.text, where)

    def csrf(self, page):
        """The form token on `page` as this session gets it, if it has one."""
        token = re.search(r'name="csrf" value="([^"]*)"', self.http.get(self.url + page).text)
        return token and token[1]

    def still(self, element):
        from selenium.common.exceptions import StaleElementReferenceException
        try:
            element.tag_name
            return self.browser.execute_script("return document.readyState") != "complete"
        except StaleElementReferenceException:
            return False

    def nothing_ran(self, what):
        ran, loaded, handlers = self.browser.execute_script(PLANTED)
        assert not ran and not handlers, (what, ran, handlers)
        assert not [name for name in loaded if self.lure.origin in name], (what, loaded)
        assert not self.lure.requests, (what, self.lure.requests)
        self.seen += 1


# Sets each named value on the form whose action is arguments[0] (as a hidden input where it
# has no field of that name), and submits it past the browser's own checks.
SUBMIT = """
const form = document.querySelector(`form[action="${arguments[0]}"]`);
form.noValidate = true;
for (const [name, value] of Object.entries(arguments[1])) {
  let field = form.querySelector(`input[name="${name}"], textarea[name="${name}"]`);
  if (!field) { field = document.createElement("input"); field.type = "hidden"; field.name = name; form.append(field); }
  field.value = value;
}
HTMLFormElement.prototype.submit.call(form);
"""
# What planted markup would leave behind: the marker, what was loaded, handlers on elements.
PLANTED = """
return [window.__pp_pwned || null, performance.getEntriesByType("resource").map(entry => entry.name),
        [...document.querySelectorAll("*")].flatMap(element => [...element.attributes]
            .filter(attribute => /^on|^srcdoc$/i.test(attribute.name)).map(attribute => attribute.name))];
"""


def the_csp_is_off(browser):
    """The browser runs what a page's CSP would stop: else this test would pass on the CSP alone."""
    browser.execute_script("document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=window.__pp_probe=1>')")
    return wait_until(lambda: browser.execute_script("return window.__pp_probe"))


def planted_pauses(url, lure, keys):
    """Pauses whose every part an agent writes is planted markup, in each state a page shows."""
    test, live = ({"Authorization": f"Bearer {keys[name]}"} for name in ("test_api_key", "api_key"))
    options = [lure.short("opt1"), lure.short("opt2")]
    question = {
        "title": lure.short("title"), "message": lure.long("message"), "options": options,
        "timeout_hours": 4, "timeout_default": options[1],
        "metadata": {lure.short("key"): lure.long("value"), "hidden": lure.short("meta"),
                     "display": [lure.short("key")]},
        "fields": {"amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True,
                              "label": lure.short("amount")},
                   "note": {"type": "string", "value": lure.short("note"), "editable": True, "label": lure.short("nl")},
                   "kind": {"type": "enum", "value": lure.short("c1"), "choices": [lure.short("c1"), "plain"],
                            "editable": True, "label": lure.short("kl")},
                   "rush": {"type": "boolean", "value": True, "editable": True, "label": lure.short("rl")},
                   "fixed": {"type": "string", "value": lure.short("fixed"), "editable": False}}}
    team = {**question, "quorum": {"choice": options[0], "count": 2},
            "recipients": [{"recipient": lure.middle("to1"), "channel": "link"},
                           {"recipient": lure.middle("to2"), "channel": "link"},
                           {"recipient": "+15550100", "channel": "sms"}]}

    def ask(body, headers=test):
        answer = requests.post(f"{url}/v1/pause", headers=headers, json=body)
        assert answer.status_code == 201, answer.text
        return answer.json()

    pauses = {"team": ask(team), "one": ask({**question, "recipient": lure.middle("one"), "channel": "link"}),
              "late": ask({**question, "recipient": lure.short("late"), "channel": "link"}),
              "gone": ask({**question, "recipient": lure.short("gone"), "channel": "link"}),
              "mail": ask({**question, "recipient": "ada@example.com", "channel": "email"}, live)}
    voted = requests.post(f"{url}/v1/respond/{token_of(pauses['team']['recipients'][0]['respond_url'])}", json={
        "choice": options[0], "comment": lure.long("vote"), "fields": {"amount": 400, "note": lure.short("edit")}})
    assert voted.status_code == 200, voted.text
    assert requests.post(f"{url}/v1/pause/{pauses['gone']['pause_id']}/cancel", headers=test).status_code == 200
    for headers, where in ((test, "hook"), (live, "livehook")):
        hook = requests.post(f"{url}/v1/webhooks", headers=headers, json={
            "url": f"https://hooks.example.com/'\"`><img/src=//{lure.origin}/pp-{where}/onerror=__pp_pwned=1>",
            "events": ["pause.created", "pause.responded"]})
        assert hook.status_code == 201, hook.text
        pauses[where] = hook.json()
    return pauses


def respond_pages(visits, lure, pauses, config):
    """The respond page in each state, and its form's refusal of what was typed into it."""
    asked = ("pp-title", "pp-message", "pp-key", "pp-value", "pp-devname")
    options = ("pp-opt1", "pp-opt2")
    team = [token_of(person["respond_url"]) for person in pauses["team"]["recipients"]]
    visits.get(f"/respond/{team[1]}", *asked, *options, "pp-amount", "pp-nl", "pp-kl", "pp-rl", "pp-c1", "pp-edit", "pp-fixed")
    visits.get(f"/respond/{team[0]}", *asked, "pp-opt1")
    visits.get(f"/respond/{team[1]}?choice={urllib.parse.quote(lure.short('opt2'))}", *asked, *options)
    one = token_of(pauses["one"]["respond_url"])
    visits.post(f"/respond/{one}", f"/respond/{one}", {
        "choice": lure.short("badchoice"), "comment": lure.long("typed"), "field.amount": lure.short("typednum"),
        "field.note": lure.short("typednote")}, *asked, *options, "pp-typed", "pp-typednum", "pp-typednote", status=422)
    visits.post(f"/respond/{one}", f"/respond/{one}", {"choice": lure.short("opt1"), "comment": lure.long("typed"),
                "field.amount": "-1"}, *asked, *options, "pp-typed", status=422)
    answered = visits.http.post(f"{visits.url}/respond/{one}", data={
        "choice": lure.short("opt1"), "comment": lure.long("comment"), "field.note": lure.short("edited"),
        "field.kind": "plain", "field.amount": "340", "field.rush": "true"})
    assert answered.status_code == 200 and "Recorded" in answered.text, answered.text[-2000:]
    visits.get(f"/respond/{one}", *asked, "pp-opt1", "pp-comment", "pp-edited", "pp-note")
    run_out(config, pauses["late"]["pause_id"])
    wait_until(lambda: stored(config, "SELECT 1 FROM pauses WHERE id = ? AND status = 'timed_out'",
                              pauses["late"]["pause_id"]))
    visits.get(f"/respond/{token_of(pauses['late']['respond_url'])}", *asked, "pp-opt2")
    visits.get(f"/respond/{token_of(pauses['gone']['respond_url'])}", *asked)


def signed_out_pages(visits, lure):
    """The sign-up and log-in forms, given back with what was typed and what is wrong with it."""
    visits.get("/dashboard/login?next=" + urllib.parse.quote(lure.short("next")), status=200)
    visits.get(f"/respond/{urllib.parse.quote(lure.short('token'), safe='')}", status=404)
    visits.post("/dashboard/signup", "/dashboard/signup", {
        "email": lure.short("suemail"), "name": lure.short("suname"), "password": PASSWORD},
        "pp-suemail", "pp-suname", status=422)
    visits.post("/dashboard/signup", "/dashboard/signup", {
        "email": "su@example.com", "name": lure.short("suname"), "password": "short"}, "pp-suname", status=422)
    visits.post("/dashboard/login", "/dashboard/login", {
        "email": lure.short("liemail"), "password": "wrong password", "next": lure.short("linext")},
        "pp-liemail", status=401)


def dashboard_pages(visits, lure, pauses):
    """Every dashboard page, in both modes, with what the query or a form carried given back."""
    asked = ("pp-message", "pp-opt1")
    quoted = {name: urllib.parse.quote(lure.short(name), safe="") for name in ("q1", "q2", "q3", "q4", "q5")}
    visits.get("/dashboard/overview", EMAIL)
    visits.get("/dashboard/pauses", *asked, "pp-one")
    visits.get(f"/dashboard/pauses?status={quoted['q1']}", status=422)
    visits.get(f"/dashboard/pauses?cursor={quoted['q2']}", status=422)
    visits.get(f"/dashboard/pauses/{pauses['team']['pause_id']}", *asked, "pp-to1", "pp-vote", "pp-edit",
               "pp-meta", "pp-amount", "pp-fixed")
    visits.get(f"/dashboard/pauses/{pauses['one']['pause_id']}", *asked, "pp-comment", "pp-edited", "pp-one")
    visits.get(f"/dashboard/pauses/{pauses['late']['pause_id']}", *asked, "pp-opt2")
    visits.get(f"/dashboard/pauses/{pauses['gone']['pause_id']}", *asked)
    visits.get(f"/dashboard/pauses/{quoted['q3']}", status=404)
    visits.get("/dashboard/audit", "pp-message", "pp-comment", "pp-ua")
    visits.get(f"/dashboard/audit?pause_id={quoted['q4']}", "pp-q4")
    visits.get(f"/dashboard/audit?event_type={quoted['q5']}", status=422)
    visits.get(f"/dashboard/audit?cursor={quoted['q5']}", status=422)
    hook = pauses["hook"]["webhook_id"]
    visits.get("/dashboard/webhooks", "pp-hook")
    visits.get(f"/dashboard/webhooks/{hook}", "pp-hook")
    visits.get(f"/dashboard/webhooks/{hook}?cursor={quoted['q1']}", status=422)
    visits.get(f"/dashboard/webhooks/{quoted['q2']}", status=404)
    visits.post("/dashboard/webhooks", "/dashboard/webhooks", {"url": lure.short("newhook"), "password": PASSWORD},
                "pp-newhook", status=422)
    visits.post("/dashboard/webhooks", "/dashboard/webhooks", {
        "url": f"https://hooks.example.com/{lure.short('newhook')}", "password": "wrong password"}, "pp-newhook",
        status=401)
    visits.get("/dashboard/keys")
    visits.post("/dashboard/keys", "/dashboard/keys/rotate", {"key": "live", "password": "wrong password"}, status=401)
    visits.get("/dashboard/operator", "pp-devname", "pp-dev2name", EMAIL)
    visits.get(f"/dashboard/operator?cursor={quoted['q3']}", status=422)
    visits.get("/dashboard/logout", EMAIL)
    visits.post("/dashboard/overview", "/dashboard/mode", {"mode": "live", "back": lure.short("back")}, EMAIL)
    visits.get("/dashboard/pauses", "pp-message")
    visits.get(f"/dashboard/pauses/{pauses['mail']['pause_id']}", *asked)
    visits.get(f"/dashboard/webhooks/{pauses['livehook']['webhook_id']}", "pp-livehook")
    # Each key's rotation lists the endpoints it set, once: the live key's over HTTP, the test key's in the browser.
    rotated = visits.http.post(f"{visits.url}/dashboard/keys/rotate", data={
        "key": "live", "password": PASSWORD, "csrf": visits.csrf("/dashboard/keys")})
    assert rotated.url.endswith("/dashboard/keys/shown"), rotated.url
    markup_of_ours_alone(rotated.text, ["pp-livehook"])
    visits.browser.get(f"{visits.url}/dashboard/keys")
    visits.browser.find_element("id", "rotate-password").send_keys(PASSWORD)
    visits.browser.find_element("css selector", "form[action='/dashboard/keys/rotate'] button").click()
    wait_until(lambda: visits.browser.current_url.endswith("/dashboard/keys/shown"))
    assert "pp-hook" in visits.browser.find_element("id", "endpoints-to-check").text
    visits.nothing_ran("/dashboard/keys/shown")


def test_nothing_anyone_writes_runs_or_loads_on_any_page_or_in_an_email(tmp_path, first_start, smtp_server,
                                                                        browser, lure):
    with serving(tmp_path, first_start, **test_channels.smtp_settings(smtp_server)) as server:
        url, config = server.url, server.app.runtime.config
        visits = Visits(url, browser, lure)
        visits.browser.get(url + "/dashboard/login")
        assert the_csp_is_off(browser)
        browser.execute_cdp_cmd("Network.setUserAgentOverride", {"userAgent": lure.short("ua")})
        visits.http.headers["User-Agent"] = lure.short("ua")
        signed_out_pages(visits, lure)
        keys = requests.post(f"{url}/v1/auth/register",
                             json={"email": EMAIL, "name": lure.short("devname"), "password": PASSWORD}).json()
        requests.post(f"{url}/v1/auth/register",
                      json={"email": "b@example.com", "name": lure.short("dev2name"), "password": PASSWORD})
        stored(config, "UPDATE developers SET is_operator = 1 WHERE email = ?", EMAIL)
        pauses = planted_pauses(url, lure, keys)
        respond_pages(visits, lure, pauses, config)

        browser.get(url + "/dashboard/login")
        browser.find_element("id", "email").send_keys(EMAIL)
        browser.find_element("id", "password").send_keys(PASSWORD)
        browser.find_element("css selector", "form.stack button").click()
        wait_until(lambda: "/dashboard/login" not in browser.current_url)
        visits.signed_in_as_the_browser()
        dashboard_pages(visits, lure, pauses)

        wait_until(lambda: smtp_server.messages)
        mail = smtp_server.messages[0].get_body(("html",)).get_content()
        markup_of_ours_alone(mail, ["pp-title", "pp-message", "pp-opt1", "pp-opt2", "pp-value", "pp-amount"],
                             styled=True)
        (tmp_path / "mail.html").write_text(mail)
        browser.get(f"file://{tmp_path / 'mail.html'}")
        visits.nothing_ran("the email")
    assert visits.seen > 40
