"""The dashboard, through its forms as a browser posts them (WebTest keeps the cookies)."""

import concurrent.futures
import datetime as dt
import json
import re
import socket
import urllib.parse

import bcrypt
import pytest

from conftest import PASSWORD, Api, run_out, serving, stored, wait_until
import pausepoint

XSS = '<script>alert(1)</script><img src=x onerror=alert(2)>'


def sign_up(api, email="dev@example.com", name="Dev", password=PASSWORD):
    """Sign up through the form; returns (the page that shows the keys, {label: key})."""
    form = api.get("/dashboard/signup").forms[0]
    form["email"], form["name"], form["password"] = email, name, password
    page = form.submit(status=303).follow()
    keys = {field["id"]: field["value"] for field in page.html.select("input.secret")}
    return page, {"live": keys["key-0"], "test": keys["key-1"]}


def log_in(api, email="dev@example.com", password=PASSWORD, status=303, start="/dashboard/login"):
    form = api.get(start).maybe_follow().forms[0]
    form["email"], form["password"] = email, password
    return form.submit(status=status)


def timeline(page):
    return [item.select_one("strong").text for item in page.html.select("#timeline li")]


def add_endpoint(api, url, password=PASSWORD):
    """The dashboard's form adding a webhook endpoint, submitted."""
    return post_form(api, api.get("/dashboard/webhooks"), "/dashboard/webhooks", url=url, password=password)


def post_form(api, page, to, action=None, **fields):
    """Submit the form of `page` that posts to `to`, with these fields changed, by its
    button named action with this value (if it has several)."""
    form = next(f for f in page.forms.values() if f.action == to)
    for name, value in fields.items():
        form[name] = value
    if action is None:
        return form.submit(status="*")
    return form.submit("action", value=action, status="*")


def change_the_password(api, new_password="a brand new passphrase"):
    return post_form(api, api.get("/dashboard/keys"), "/dashboard/password", password=PASSWORD,
                     new_password=new_password)


def test_signing_up_shows_both_keys_once_and_signs_in(api):
    form = api.get("/dashboard/signup").forms[0]
    form["email"], form["name"], form["password"] = "dev@example.com", "Dev", PASSWORD
    answer = form.submit(status=303)                 # to a page of its own: a reload cannot sign up twice
    cookie = next(c for c in answer.headers.getall("Set-Cookie") if c.startswith("pp_session="))
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Path=/dashboard" in cookie
    assert "Secure" not in cookie                                   # base_url is http here
    page = answer.follow()
    keys = [field["value"] for field in page.html.select("input.secret")]
    assert keys[0].startswith("pp_live_") and keys[1].startswith("pp_test_")
    assert "you will not see these again" in page.text and page.headers["Cache-Control"] == "no-store"
    assert keys[1] in page.html.select_one("#try-it").text and "http://127.0.0.1:8080/v1/pause" in page.text
    assert api.get("/v1/pause", headers=api.as_key(keys[1])).status_code == 200     # the keys work
    again = api.get("/dashboard/keys/shown")                        # a reload: gone
    assert again.status_code == 303 and again.headers["Location"].endswith("/dashboard/keys")
    overview = api.get("/dashboard/overview")
    assert overview.status_code == 200 and "dev@example.com" in overview.text
    assert keys[1] not in api.get("/dashboard/keys").text


def test_the_form_cookie_is_strict_and_only_for_the_dashboard(api):
    cookie = api.get("/dashboard/login").headers["Set-Cookie"]
    assert cookie.startswith("pp_form=") and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert "Path=/dashboard" in cookie


def https_api(running_api):
    api = running_api(**{"server.base_url": "https://approvals.example.com"})
    api.extra_environ["wsgi.url_scheme"] = "https"             # as the browser sees it, behind the TLS proxy
    return api


def test_over_https_every_cookie_is_one_only_this_host_name_can_set(running_api):
    api = https_api(running_api)
    form_page = api.get("/dashboard/signup")
    sent = form_page.headers.getall("Set-Cookie")
    form = form_page.forms[0]
    form["email"], form["name"], form["password"] = "s@example.com", "S", PASSWORD
    signed_up = form.submit(status=303)
    sent += signed_up.headers.getall("Set-Cookie")
    shown = signed_up.follow()                                  # the keys, once: marks the page
    sent += shown.headers.getall("Set-Cookie") + api.get("/dashboard/keys").headers.getall("Set-Cookie")
    names = [cookie.split("=")[0] for cookie in sent]
    assert sorted(set(names)) == ["__Host-pp_device", "__Host-pp_form", "__Host-pp_session", "__Host-pp_shown"]
    # What a browser requires of a __Host- cookie, or it drops it.
    for cookie in sent:
        attributes = [part.strip().lower() for part in cookie.split(";")[1:]]
        assert "secure" in attributes and "path=/" in attributes, cookie
        assert not any(part.startswith("domain") for part in attributes), cookie
    assert shown.html.select("input.secret") and api.get("/dashboard/overview").status_code == 200


def test_over_https_a_sign_in_or_form_token_planted_without_the_prefix_counts_for_nothing(running_api):
    """A page on a sibling host name can set `pp_session` for the whole domain, but not a
    __Host- cookie: the server reads only those."""
    api = https_api(running_api)
    sign_up(api, email="planter@example.com")
    planted = api.cookies["__Host-pp_session"]
    api.reset()
    assert api.get("/dashboard/overview", headers={"Cookie": f"pp_session={planted}"}).status_code == 303
    form = api.get("/dashboard/login").forms[0]
    api.reset()
    token = "t" * 43
    answer = api.post("/dashboard/login", {"email": "planter@example.com", "password": PASSWORD, "csrf": token},
                      headers={"Cookie": f"pp_form={token}"}, status="*")
    assert answer.status_code == 403 and "__Host-pp_session" not in api.cookies
    assert form["csrf"].value                                   # the real form carries a token of its own


def test_over_https_every_answer_tells_browsers_to_keep_to_https(running_api):
    api = https_api(running_api)
    _, keys = sign_up(api)
    answers = [api.get("/dashboard/login"), api.get("/dashboard"), api.get("/v1/pause", headers=api.as_key(keys["test"])),
               api.get("/v1/pause", status=401), api.get("/no/such/page", status=404),
               api.get("/respond/" + "x" * 43, status="*")]
    assert [a.headers.get("Strict-Transport-Security") for a in answers] == ["max-age=31536000"] * len(answers)


def test_over_https_the_errors_the_server_answers_before_the_app_tell_browsers_to_keep_to_https(
        tmp_path, first_start):
    """A form too large for server.max_body_bytes (a long comment pasted) is refused before
    any route sees it: that answer too is one of the site's."""
    with serving(tmp_path, first_start, **{"server.base_url": "https://approvals.example.com"}) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /respond/x HTTP/1.1\r\nHost: approvals.example.com\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536) or b"\r\n\r\n"
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "413"
    assert "Strict-Transport-Security: max-age=31536000" in lines[1:]


def test_over_plain_http_no_answer_pins_the_host_to_https(api):
    _, keys = sign_up(api)
    answers = [api.get("/dashboard/login"), api.get("/v1/pause", headers=api.as_key(keys["test"])),
               api.get("/no/such/page", status=404)]
    assert not any("Strict-Transport-Security" in a.headers for a in answers)


@pytest.mark.parametrize("cookie", [
    "_ga=GA1.2.3; pp_session={token}",
    "_ga=GA1.2.3, pp_session={token}",                  # two Cookie headers, as waitress joins them
    'pp_session="{token}"',                             # quoted, as the cookie syntax allows
    "pp_session=a%20b; pp_session={token}",             # another path's cookie of that name first
])
def test_the_sign_in_cookie_is_found_however_the_browser_sends_it(api, cookie):
    sign_up(api)
    token = api.cookies["pp_session"]
    api.reset()
    page = api.get("/dashboard/overview", headers={"Cookie": cookie.format(token=token)})
    assert page.status_code == 200


def test_logging_out_ends_the_session_and_logging_in_starts_one(api):
    page, _ = sign_up(api)
    token = api.cookies["pp_session"]
    post_form(api, api.get("/dashboard/overview"), "/dashboard/logout")
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    api.set_cookie("pp_session", token)                         # the old cookie, replayed
    assert api.get("/dashboard/pauses").status_code == 303
    api.reset()
    answer = log_in(api, start="/dashboard/login?next=/dashboard/pauses")
    assert answer.headers["Location"].endswith("/dashboard/pauses")
    assert api.get("/dashboard/pauses").status_code == 200


def test_the_log_out_address_typed_or_followed_asks_before_logging_out(api):
    sign_up(api)
    page = api.get("/dashboard/logout")
    assert page.status_code == 200 and "Log out dev@example.com in this browser?" in page
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(1,)]
    post_form(api, page, "/dashboard/logout")
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    assert api.get("/dashboard/logout").headers["Location"].endswith("/dashboard/login")


def test_a_logged_out_visitor_is_sent_to_log_in_and_back(api):
    sign_up(api)
    api.reset()
    answer = api.get("/dashboard/pauses?status=pending")
    assert answer.status_code == 303 and answer.headers["Location"].endswith(
        "/dashboard/login?next=%2Fdashboard%2Fpauses%3Fstatus%3Dpending")
    assert log_in(api, start=answer.headers["Location"]).headers["Location"].endswith("/dashboard/pauses?status=pending")


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/dashboard/../v1/pause",
                                    "/dashboard\\@evil.example", "javascript:alert(1)", "/dashboard/%2e%2e/v1/pause",
                                    "/dashboard/%2E%2E/v1/pause", "/dashboard/%2f%2fevil.example", "/dashboard/pauses?é"])
def test_after_logging_in_only_dashboard_paths_are_followed(api, target):
    sign_up(api)
    api.reset()
    location = urllib.parse.urlsplit(log_in(api, start=f"/dashboard/login?{urllib.parse.urlencode({'next': target})}")
                                     .headers["Location"])
    assert location.netloc in ("", "localhost", "localhost:80") and (location.path, location.query) == ("/dashboard", "")


def test_a_logged_out_visitor_to_an_overlong_address_is_still_shown_the_log_in_form(api):
    sign_up(api)
    api.reset()
    page = api.get("/dashboard/pauses/psr_" + "0" * 600).maybe_follow()
    assert page.status_int == 200 and page.forms[0].action == "/dashboard/login"
    assert log_in(api, start=page.request.url).headers["Location"].endswith("/dashboard")


def test_a_wrong_password_and_an_unknown_email_get_the_same_answer(api):
    sign_up(api)
    api.reset()
    wrong = log_in(api, password="wrong password", status=401)
    unknown = log_in(api, email="nobody@example.com", status=401)
    assert "Email or password is wrong." in wrong.text and "Email or password is wrong." in unknown.text
    assert "pp_session" not in api.cookies


def test_a_password_hashed_at_another_cost_is_checked_as_long_as_an_unknown_email_and_then_hashed_again(
        running_api, monkeypatch):
    api = running_api(**{"security.bcrypt_rounds": 6, "ratelimit.enabled": False})
    sign_up(api)
    older = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()     # as an older, lower setting made it
    stored(api.config, "UPDATE developers SET password_hash = ?", older)
    api.reset()
    costs, check = [], bcrypt.checkpw       # the cost of each hash a sign-in checks: the time it takes
    monkeypatch.setattr(bcrypt, "checkpw", lambda secret, hashed: costs.append(int(hashed.split(b"$")[2]))
                        or check(secret, hashed))
    work = {}
    for email in ("nobody@example.com", "dev@example.com"):
        costs.clear()
        log_in(api, email=email, password="wrong password", status=401)
        work[email] = sum(2 ** cost for cost in costs)     # bcrypt's time doubles with each step of cost
    # The same work whoever the email is: one check at cost 6 on top of the account's own at 4
    # was half as much again (a leak as large as a step between settings).
    assert work == {"nobody@example.com": 2 ** 6, "dev@example.com": 2 ** 6}
    assert stored(api.config, "SELECT password_hash FROM developers") == [(older,)]
    # Once the password is given, it is hashed again at the setting's cost, and still works.
    assert log_in(api).headers["Location"].endswith("/dashboard")
    [(again,)] = stored(api.config, "SELECT password_hash FROM developers")
    assert again.startswith("$2b$06$") and bcrypt.checkpw(PASSWORD.encode(), again.encode())
    api.reset()
    costs.clear()
    assert log_in(api).headers["Location"].endswith("/dashboard") and costs == [6]


def change_the_password_during_the_next(api, monkeypatch, call):
    """bcrypt's `call` (checkpw or hashpw: the library, patched) made such that while it next
    runs, as a request spends its time on the old password, the developer changes the
    password to "a new password" elsewhere."""
    conn, real = api.app.runtime.db(), getattr(bcrypt, call)

    def changed_meanwhile(*args):
        monkeypatch.setattr(bcrypt, call, real)
        answer = real(*args)
        pausepoint.change_password(conn, api.config, conn.execute("SELECT * FROM developers").fetchone(),
                                   "a new password")
        return answer
    monkeypatch.setattr(bcrypt, call, changed_meanwhile)


def test_the_old_password_makes_no_sign_in_once_a_change_commits_while_it_is_hashed_again(
        running_api, monkeypatch):
    api = running_api(**{"security.bcrypt_rounds": 5, "ratelimit.enabled": False})
    sign_up(api)
    stored(api.config, "UPDATE developers SET password_hash = ?",
           bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode())     # as an older, lower setting made it
    api.reset()
    change_the_password_during_the_next(api, monkeypatch, "hashpw")     # the sign-in's, at cost 5
    log_in(api, status=401)
    assert "pp_session" not in api.cookies
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    assert log_in(api, password="a new password").headers["Location"].endswith("/dashboard")


def test_two_sign_ins_hashing_the_same_password_again_at_once_both_sign_in(running_api, monkeypatch):
    api = running_api(**{"security.bcrypt_rounds": 5, "ratelimit.enabled": False})
    sign_up(api)
    stored(api.config, "UPDATE developers SET password_hash = ?",
           bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode())     # as an older, lower setting made it
    api.reset()
    api.app.runtime.hashing = pausepoint.Turns(2)        # two hashes at once, as on four cores
    other, hashpw = Api(api.app, extra_environ={"REMOTE_ADDR": "203.0.113.7"}), bcrypt.hashpw

    def other_signs_in_meanwhile(*args):
        monkeypatch.setattr(bcrypt, "hashpw", hashpw)
        answer = hashpw(*args)
        with concurrent.futures.ThreadPoolExecutor(1) as another_thread:      # and hashes it again first
            signed_in = another_thread.submit(log_in, other).result()
        assert signed_in.headers["Location"].endswith("/dashboard")
        return answer
    monkeypatch.setattr(bcrypt, "hashpw", other_signs_in_meanwhile)
    assert log_in(api).headers["Location"].endswith("/dashboard")
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(3,)]     # the sign-up's, and these


def test_the_old_password_makes_no_sign_in_once_a_change_commits_while_it_is_checked(running_api, monkeypatch):
    api = running_api(**{"ratelimit.enabled": False})      # hashed at the setting's cost: nothing to hash again
    sign_up(api)
    api.reset()
    change_the_password_during_the_next(api, monkeypatch, "checkpw")
    log_in(api, status=401)
    assert "pp_session" not in api.cookies
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    assert log_in(api, password="a new password").headers["Location"].endswith("/dashboard")


@pytest.mark.parametrize("then", ["rotate", "change"])
def test_the_old_password_rotates_no_key_and_sets_no_password_once_a_change_commits_while_it_is_checked(
        running_api, monkeypatch, then):
    api = running_api(**{"ratelimit.enabled": False})
    _, keys = sign_up(api)                          # signed in, as whoever holds the old password may be
    keys_page = api.get("/dashboard/keys")
    change_the_password_during_the_next(api, monkeypatch, "checkpw")
    if then == "rotate":
        api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"},
                      status=401)
        api.get("/v1/pause", headers=api.as_key(keys["live"]))        # the key it would have replaced still works
    else:
        refused = post_form(api, keys_page, "/dashboard/password", password=PASSWORD, new_password="the thief's one")
        assert refused.status_code == 401
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type IN ('key.rotated',"
                              " 'password.changed')") == [(2,)]      # the developer's own change, in each mode
    api.reset()
    log_in(api, password="the thief's one", status=401)
    assert log_in(api, password="a new password").headers["Location"].endswith("/dashboard")


def test_the_old_password_adds_no_endpoint_once_a_change_commits_while_it_is_checked(running_api, monkeypatch):
    api = running_api(**{"ratelimit.enabled": False})
    sign_up(api)                                    # signed in, as whoever holds the old password may be
    webhooks_page = api.get("/dashboard/webhooks")
    change_the_password_during_the_next(api, monkeypatch, "checkpw")
    refused = post_form(api, webhooks_page, "/dashboard/webhooks", url="https://thief.example/hook",
                        password=PASSWORD)
    assert refused.status_code == 401 and "no endpoint was added" in refused.text
    assert stored(api.config, "SELECT count(*) FROM webhooks") == [(0,)]
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'webhook.created'") == [(0,)]


def test_a_sign_in_remembers_no_browser_once_a_change_commits_after_its_session_started(running_api):
    api = running_api(**{"ratelimit.enabled": False})
    sign_up(api)
    api.reset()                                     # whoever holds the old password, in a browser of their own
    conn, elsewhere = api.app.runtime.db(), pausepoint.connect(api.config["database.path"])
    steps = []

    def change_between_the_session_and_the_browser(sql):
        """SQLite's trace: the developer's change commits as the sign-in, its session
        written, begins the transaction that remembers its browser."""
        if "INSERT INTO dashboard_sessions" in sql:
            steps.append("session started")
        elif steps == ["session started"] and sql.startswith("BEGIN"):
            steps.append("password changed")
            pausepoint.change_password(elsewhere, api.config, elsewhere.execute("SELECT * FROM developers").fetchone(),
                                       "a new password")
    conn.set_trace_callback(change_between_the_session_and_the_browser)
    try:
        log_in(api, status=401)
    finally:
        conn.set_trace_callback(None)
        elsewhere.close()
    assert steps == ["session started", "password changed"] and "pp_device" not in api.cookies
    assert stored(api.config, "SELECT count(*) FROM dashboard_devices") == [(0,)]     # none knew the new password
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]


def test_failed_logins_are_limited_per_address_and_successful_ones_are_not(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    sign_up(api)
    for _ in range(5):                                # an office behind one address signs in all day
        api.reset()
        log_in(api)
    sign_up(api, email="other@example.com")
    api.reset()
    for email in ("dev@example.com", "other@example.com", "nobody@example.com"):
        log_in(api, email=email, password="wrong password", status=401)
    assert "too many failed sign-ins from your address" in log_in(api, status=429).text.lower()


def test_rate_limit_buckets_stay_bounded_and_a_flood_forgets_the_least_spent():
    """Before, once 100,000 addresses had come, each new one cost a look through all of the
    buckets (4.6 ms, under the lock), and it forgot any limit's buckets by the current one's rate."""
    limiter, most = pausepoint.RateLimiter(True), pausepoint.RateLimiter.MAX_BUCKETS
    for _ in range(30):
        limiter.spend("respond", "exhausted", 30)
    limiter.spend("register", "other limit", 20)
    for n in range(most + 5_000):                               # each spent once
        limiter.spend("respond", f"2001:db8::{n:x}", 30)
    assert len(limiter.buckets["respond"]) == most
    assert limiter.retry_after("respond", "exhausted", 30) > 0
    assert "other limit" in limiter.buckets["register"]
    for _ in range(2):                                          # now the table is full of buckets spent twice
        for n in range(most):
            limiter.spend("respond", f"2001:db8:1::{n:x}", 30)
    for _ in range(30):                                         # and a new one is still counted
        limiter.spend("respond", "new", 30)
    assert limiter.retry_after("respond", "new", 30) > 0
    limiter.spend("fast", "refilled", 3.6e12)                   # full again a nanosecond later
    limiter.spend("fast", "next", 3.6e12)
    assert list(limiter.buckets["fast"]) == ["next"]


def test_no_flood_makes_a_password_failure_be_forgotten_before_it_is_refilled():
    """Whichever bucket a full table forgets, a flood can make it the one being guessed at:
    20,000 buckets spent twice, and a success (a spend given back) after each guess, let 100
    of 100 guesses at an email through. Password failures make no room."""
    limiter, most = pausepoint.RateLimiter(True), pausepoint.RateLimiter.MAX_BUCKETS
    for _ in range(2):
        for n in range(most):
            limiter.spend("password_failures_email", f"someone{n}", 20, make_room=False)
    for n in range(20):
        limiter.spend("password_failures_email", "target", 20, make_room=False)
        limiter.spend("password_failures_email", f"own account {n}", 20, make_room=False)
        limiter.give_back("password_failures_email", f"own account {n}", 20)
    assert limiter.retry_after("password_failures_email", "target", 20) > 0


def test_sign_ins_refused_for_want_of_a_hashing_turn_spend_no_budget(running_api, monkeypatch):
    """A 503 checked no password: were it a failure, anyone could use up an email's budget
    without a single hash, by keeping the hashing turns busy."""
    api = running_api(**{"ratelimit.login_per_hour": 2})
    sign_up(api)
    hashing = api.app.runtime.hashing = pausepoint.Turns(1)
    assert hashing.take("198.51.100.7", timeout=0)         # another address holds the one turn throughout
    monkeypatch.setattr(pausepoint, "HASH_WAIT_SECONDS", 0.01)
    for n in range(5):
        from_address(api, f"192.0.2.{100 + n}")
        log_in(api, password="wrong password", status=503)
    hashing.give()
    for n in range(2):                                      # the email's two failures are all still there
        from_address(api, f"192.0.2.{110 + n}")
        log_in(api, password="wrong password", status=401)
    from_address(api, "192.0.2.200")
    assert "failed sign-ins for this email" in log_in(api, status=429).text


def test_failed_logins_for_one_email_are_limited_from_any_address(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 2})
    sign_up(api)
    for n in range(2):
        api.reset()
        api.extra_environ["REMOTE_ADDR"] = f"192.0.2.{100 + n}"
        log_in(api, password="wrong password", status=401)
    api.reset()
    api.extra_environ["REMOTE_ADDR"] = "192.0.2.200"
    assert "failed sign-ins for this email" in log_in(api, status=429).text


def test_forms_without_the_csrf_token_are_refused_and_change_nothing(api):
    login_page = api.get("/dashboard/login")
    _, keys = sign_up(api)
    created = api.create_pause(keys["test"])
    page = api.get(f"/dashboard/pauses/{created['pause_id']}")
    for token in ("", "x" * 43):
        answer = post_form(api, page, f"/dashboard/pauses/{created['pause_id']}/cancel", csrf=token)
        assert answer.status_code == 403 and "did not come from this site" in answer.text
        assert answer.html.select_one("a[href='/dashboard']").text == "Back to the dashboard"
    assert api.pause(keys["test"], created["pause_id"])["status"] == "pending"
    api.reset()                                                  # a form from another site: no form cookie
    assert post_form(api, login_page, "/dashboard/login", email="dev@example.com", password=PASSWORD).status_code == 403


@pytest.mark.parametrize("sent_from", ["same-site", "cross-site"])
def test_a_form_another_site_sent_is_refused_even_with_a_cookie_and_token_that_match(api, sent_from):
    """A page on a sibling host name (evil.example.org beside approvals.example.org) may set this
    site's form cookie to a token it chose and post that token: the browser says where it came from."""
    _, keys = sign_up(api)
    api.reset()
    api.set_cookie("pp_form", "t" * 43)
    tossed = {"email": "dev@example.com", "password": PASSWORD, "csrf": "t" * 43}
    answer = api.post("/dashboard/login", tossed, headers={"Sec-Fetch-Site": sent_from}, status=403)
    assert "did not come from this site" in answer.text and "pp_session" not in api.cookies
    assert api.post("/dashboard/login", tossed, headers={"Sec-Fetch-Site": "same-origin"}, status=303)
    form = next(f for f in api.get("/dashboard/webhooks").forms.values() if f.action == "/dashboard/webhooks")
    signed_in = {"url": "https://example.org/hook", "password": PASSWORD, "csrf": form["csrf"].value}
    api.post("/dashboard/webhooks", signed_in, headers={"Sec-Fetch-Site": sent_from}, status=403)
    assert stored(api.config, "SELECT count(*) FROM webhooks") == [(0,)]


def test_the_mode_switch_goes_back_only_to_a_dashboard_page(api):
    sign_up(api)
    page = api.get("/dashboard/pauses")
    form = next(f for f in page.forms.values() if f.action == "/dashboard/mode")
    for back, landing in (("https://evil.example/", "/dashboard"), ("/dashboard/%2e%2e/v1/pause", "/dashboard"),
                          ("/dashboard/audité", "/dashboard"), ("/dashboard/audit", "/dashboard/audit")):
        form["back"] = back
        assert urllib.parse.urlsplit(form.submit(status=303).headers["Location"]).path == landing


def test_sessions_end_when_idle_and_at_their_absolute_limit(running_api):
    api = running_api(**{"dashboard.session_idle_minutes": 30, "dashboard.session_max_hours": 24})
    sign_up(api)
    assert api.get("/dashboard/pauses").status_code == 200
    stored(api.config, "UPDATE dashboard_sessions SET last_seen_at = ?",
           pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(minutes=31)))
    assert api.get("/dashboard/pauses").status_code == 303
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    log_in(api)
    stored(api.config, "UPDATE dashboard_sessions SET created_at = ?",
           pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(hours=24, seconds=1)))
    assert api.get("/dashboard/pauses").status_code == 303


def test_a_pause_appears_in_the_list_and_its_page_and_can_be_cancelled_there(running_api):
    api = running_api()
    _, keys = sign_up(api)
    created = api.create_pause(keys["test"], message=f"Wire $340? {XSS}", metadata={"note": XSS, "to": "\u202e043$"},
                               title=f"Acme {XSS}")
    listing = api.get("/dashboard/pauses")
    assert created["pause_id"] in listing.text and XSS not in listing.text and "&lt;script&gt;" in listing.text
    assert listing.html.select_one("#test-mode") is not None           # the test-mode badge
    page = api.get(f"/dashboard/pauses/{created['pause_id']}")
    assert XSS not in page.text and timeline(page) == ["pause.created"]
    assert page.html.select_one("#title").text == f"Acme {XSS}"         # the title it was asked under, as text
    # Metadata shows as the JSON it is, a bidirectional override written as its escape, not obeyed.
    assert '"to": "\\u202e043$"' in page.html.select_one("pre.text").text and "\u202e" not in page.text
    api.step("notifications")
    page = api.get(f"/dashboard/pauses/{created['pause_id']}")
    post_form(api, page, f"/dashboard/pauses/{created['pause_id']}/cancel")
    assert api.pause(keys["test"], created["pause_id"])["status"] == "cancelled"
    page = api.get(f"/dashboard/pauses/{created['pause_id']}")
    assert timeline(page) == ["pause.created", "notification.simulated", "pause.cancelled"]
    assert re.search(r"by dashboard:dev@example.com", page.text)
    assert api.get("/dashboard/pauses?status=pending").html.select_one("#empty") is not None
    expired = api.create_pause(keys["test"])["pause_id"]
    run_out(api.config, expired)            # pending until the timeout job runs, which then decides it
    assert not [form for form in api.get(f"/dashboard/pauses/{expired}").forms.values() if "cancel" in form.action]


def test_the_mode_switch_shows_live_or_test_data_never_both(running_api, twilio):
    api = running_api(**twilio.settings())
    _, keys = sign_up(api)
    test_pause = api.create_pause(keys["test"])
    live_pause = api.create_pause(keys["live"])
    listing = api.get("/dashboard/pauses")
    assert test_pause["pause_id"] in listing.text and live_pause["pause_id"] not in listing.text
    listing = post_form(api, listing, "/dashboard/mode").maybe_follow()
    assert live_pause["pause_id"] in listing.text and test_pause["pause_id"] not in listing.text
    assert listing.html.select_one("#test-mode") is None
    missing = api.get(f"/dashboard/pauses/{test_pause['pause_id']}", status=404)
    assert "in your account's live mode" in missing.html.get_text() and "API key" not in missing.text
    assert "one of your test-mode pauses; switch to test data to see it" in missing.html.get_text()


def test_the_mode_switch_keeps_a_lists_filter_but_not_its_page(running_api, twilio):
    api = running_api(**twilio.settings())
    _, keys = sign_up(api)
    live_pause, _ = api.create_pause(keys["live"]), api.create_pause(keys["live"])
    cursors = {kind: api.get(f"/v1/{kind}?limit=1", headers=api.as_key(keys["live"])).json["next_cursor"]
               for kind in ("pause", "audit")}
    for page, landing in ((f"/dashboard/pauses?status=pending&cursor={cursors['pause']}",
                           "/dashboard/pauses?status=pending"),
                          (f"/dashboard/audit?event_type=pause.created&pause_id={live_pause['pause_id']}"
                           f"&cursor={cursors['audit']}", "/dashboard/audit?event_type=pause.created")):
        switched = post_form(api, api.get(page), "/dashboard/mode")
        assert switched.headers["Location"].endswith(landing)
        post_form(api, switched.follow(), "/dashboard/mode")        # back to test data for the next page
    listing = post_form(api, api.get("/dashboard/pauses?status=pending"), "/dashboard/mode").follow()
    assert live_pause["pause_id"] in listing.text and listing.html.select_one("option[selected]").text == "pending"


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/nothing-here"])
def test_a_mistyped_dashboard_address_is_a_page_that_leads_back_to_the_dashboard(api, path):
    page = api.get(path, status=404)
    assert page.content_type == "text/html" and page.html.select_one("a[href='/dashboard']") is not None


def test_a_second_developer_sees_none_of_the_firsts_data_even_by_url(api):
    _, keys = sign_up(api)
    created = api.create_pause(keys["test"])
    api.reset()
    sign_up(api, email="other@example.com")
    assert created["pause_id"] not in api.get("/dashboard/pauses").text
    assert api.get(f"/dashboard/pauses/{created['pause_id']}", status=404)
    assert created["pause_id"] not in api.get("/dashboard/audit").text
    assert created["pause_id"] not in api.get(f"/dashboard/audit.csv?pause_id={created['pause_id']}").text
    other_page = api.get("/dashboard/overview")
    cancel = api.post(f"/dashboard/pauses/{created['pause_id']}/cancel",
                      {"csrf": other_page.html.select_one("input[name=csrf]")["value"]}, status=404)
    assert cancel.status_code == 404 and stored(api.config, "SELECT status FROM pauses") == [("pending",)]


def test_the_audit_log_filters_and_downloads_as_csv(running_api):
    api = running_api()
    _, keys = sign_up(api)
    first = api.create_pause(keys["test"], metadata={"cell": "=HYPERLINK(\"http://evil\")", "to": "\u202e043$"})
    second = api.create_pause(keys["test"])
    api.post(f"/v1/pause/{first['pause_id']}/cancel", headers=api.as_key(keys["test"]))
    page = api.get("/dashboard/audit", {"event_type": "pause.cancelled"})
    assert [td.text for td in page.html.select("#events tbody tr td:nth-of-type(2)")] == ["pause.cancelled"]
    shown = next(form for form in page.forms.values() if form.action == "/dashboard/audit")["event_type"]
    assert shown.value == "pause.cancelled" and shown.options[0] == ("", False, "any")    # as applied; or none
    # Pause ids made in the same minute share their first digits (the time): each one's
    # short form tells them apart.
    shown = [code.text for code in api.get("/dashboard/audit").html.select("#events tbody tr td:nth-of-type(4) code")]
    assert len(set(shown)) == 2 and len(shown) == 3
    download = api.get("/dashboard/audit.csv")
    assert download.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in download.headers["Content-Disposition"]
    rows = list(pausepoint.csv.reader(download.text.splitlines()))
    assert rows[0] == ["id", "timestamp", "actor", "event_type", "pause_id", "livemode", "data"]
    assert [row[3] for row in rows[1:]] == ["pause.cancelled", "pause.created", "pause.created"]
    assert {row[4] for row in rows[1:]} == {first["pause_id"], second["pause_id"]}
    # What a developer's agent wrote is only ever inside the JSON of the last cell, which
    # opens with "{": no cell can start a spreadsheet formula.
    assert all(row[6].startswith("{") for row in rows[1:]) and '=HYPERLINK' in rows[3][6]
    # A bidirectional override is written as its escape: the same JSON, not obeyed by a viewer.
    assert "\u202e" not in download.text and json.loads(rows[3][6])["metadata"]["to"] == "\u202e043$"


def test_the_audit_csv_is_read_a_page_at_a_time_as_it_is_sent(running_api):
    api = running_api()
    sign_up(api)
    developer = stored(api.config, "SELECT id FROM developers")[0][0]
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500)"
                       " INSERT INTO audit_events (timestamp, developer_id, livemode, actor, event_type, data)"
                       " SELECT '2026-01-01T00:00:00.000Z', ?, 0, 'api:x', 'test.event', '{}' FROM n", developer)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/dashboard/audit.csv", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "REMOTE_ADDR": "192.0.2.10",
               "HTTP_COOKIE": f"pp_session={api.cookies['pp_session']}", "wsgi.input": pausepoint.io.BytesIO(),
               "wsgi.errors": pausepoint.io.StringIO()}
    body = api.app(environ, lambda status, headers, exc_info=None: None)
    first = next(iter(body))                       # the first page of 1,000 is read; the rest not yet
    stored(api.config, "DELETE FROM audit_events WHERE seq <= 1500")
    rest = b"".join(body)
    lines = (first + rest).decode().splitlines()
    assert lines[0].startswith("id,") and len(lines) == 1 + 1000   # built in memory, it would hold all 2,500


def test_rotating_a_key_needs_the_password_and_shows_the_new_key_once(api):
    _, keys = sign_up(api)
    page = api.get("/dashboard/keys")
    wrong = post_form(api, page, "/dashboard/keys/rotate", key="test", password="not my password")
    assert wrong.status_code == 401 and api.get("/v1/pause", headers=api.as_key(keys["test"])).status_code == 200
    answer = post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD)
    assert answer.status_code == 303                 # a reload shows the page, not the form again
    shown = answer.follow()
    new_key = shown.html.select_one("input.secret")["value"]
    assert new_key.startswith("pp_test_") and new_key != keys["test"]
    assert api.get("/dashboard/keys/shown").status_code == 303    # once
    assert api.get("/v1/pause", headers=api.as_key(keys["test"]), status=401)
    assert api.get("/v1/pause", headers=api.as_key(new_key)).status_code == 200
    assert api.get("/v1/pause", headers=api.as_key(keys["live"])).status_code == 200    # the other mode's key stays
    assert new_key not in api.get("/dashboard/keys").text
    assert shown.html.select_one("#endpoints-to-check") is None


def test_a_rotation_in_the_dashboard_links_the_endpoints_the_old_key_pointed(api):
    _, keys = sign_up(api)
    url = "https://hooks.example.com/in?a=1&b=2"
    webhook = api.post_json("/v1/webhooks", {"url": url, "events": ["pause.created"]},
                            headers=api.as_key(keys["test"])).json
    shown = post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD).follow()
    [link] = shown.html.select("#endpoints-to-check a")
    assert link["href"] == f"/dashboard/webhooks/{webhook['webhook_id']}" and link.text == url
    assert "in?a=1&amp;b=2" in shown.text


def test_signing_in_over_another_sign_in_ends_the_one_it_replaces(api):
    """Its cookie is overwritten: left on the server, it would stay good, unseen, until its time ran out."""
    api.register(email="other@example.com")
    stale = api.get("/dashboard/login").forms[0]             # a tab left open on the log-in page
    sign_up(api)
    first = api.cookies["pp_session"]
    stale["email"], stale["password"] = "other@example.com", PASSWORD
    stale.submit(status=303)
    assert api.cookies["pp_session"] != first
    assert pausepoint.session_for(api.app.runtime.db(), api.config, first) is None
    assert stored(api.config, "SELECT d.email FROM dashboard_sessions s JOIN developers d ON d.id = s.developer_id") \
        == [("other@example.com",)]


def test_a_link_from_another_site_never_uses_up_a_secret_shown_once(running_api):
    """Followed while the redirect to the page is on its way, it would take the secret where nobody sees it."""
    api = running_api(**{"webhooks.allow_private": True})
    sign_up(api)
    for answer, shown in ((post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test",
                                     password=PASSWORD), "input.secret"),
                          (add_endpoint(api, "http://127.0.0.1:9/hook"), "#secret")):
        elsewhere = api.get(answer.headers["Location"], headers={"Sec-Fetch-Site": "cross-site"})
        assert elsewhere.status_code == 303 or elsewhere.html.select_one(shown) is None
        assert answer.follow(headers={"Sec-Fetch-Site": "same-origin"}).html.select_one(shown)["value"]


def test_changing_the_password_ends_every_session(api):
    sign_up(api)
    other_browser = Api(api.app, extra_environ=api.extra_environ)
    log_in(other_browser)                                        # a second sign-in
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(2,)]
    answer = change_the_password(api)
    assert answer.headers["Location"].endswith("/dashboard/login?notice=password")
    assert stored(api.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
    assert other_browser.get("/dashboard/pauses").status_code == 303
    api.reset()
    log_in(api, password=PASSWORD, status=401)
    log_in(api, password="a brand new passphrase")


@pytest.mark.parametrize("name", ["Acme\nBank", "x" * 150], ids=["two lines", "150 characters"])
def test_a_developer_whose_name_an_older_release_took_can_still_change_the_password(api, name):
    sign_up(api)
    stored(api.config, "UPDATE developers SET name = ?", name)
    assert change_the_password(api).headers["Location"].endswith("/dashboard/login?notice=password")
    log_in(api, password="a brand new passphrase")


def test_when_registration_is_closed_the_page_says_how_developers_are_added(running_api):
    api = running_api(**{"registration.open": False})
    page = api.get("/dashboard/signup", status=403)
    assert "create-developer" in page.text and not page.forms
    csrf_page = api.get("/dashboard/login")
    answer = api.post("/dashboard/signup", {"csrf": csrf_page.html.select_one("input[name=csrf]")["value"],
                                            "email": "x@example.com", "name": "X", "password": PASSWORD}, status=403)
    assert "create-developer" in answer.text and stored(api.config, "SELECT count(*) FROM developers") == [(0,)]


def test_the_overview_counts_outcomes_times_and_usage(running_api, twilio):
    api = running_api(**twilio.settings())
    _, keys = sign_up(api)
    key = keys["test"]
    approved, rejected, timed_out, cancelled, pending = (api.create_pause(key)["pause_id"] for _ in range(5))
    tokens = dict(stored(api.config, "SELECT id, respond_token FROM pauses"))
    api.post_json(f"/v1/respond/{tokens[approved]}", {"choice": "Approve"})
    api.post_json(f"/v1/respond/{tokens[rejected]}", {"choice": "Reject"})
    api.post(f"/v1/pause/{cancelled}/cancel", headers=api.as_key(key))
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", timed_out)
    api.step("timeouts")
    # Answers 60 s and 600 s after creation: median 60 s (nearest rank), p90 600 s.
    stored(api.config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '+60 seconds')"
                       " WHERE id = ?", approved)
    stored(api.config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '+600 seconds')"
                       " WHERE id = ?", rejected)
    api.create_pause(keys["live"])
    page = api.get("/dashboard/overview").html
    assert page.select_one("#total").text == "5"
    assert page.select_one("#median").text == "1.0 min" and page.select_one("#p90").text == "10.0 min"
    assert page.select_one("#timeout-share").text == "25%"                       # 1 of 4 decided
    assert page.select_one("#usage").text == "1 of 100"
    titles = sorted(t.text.split(": ")[1] for t in page.select("#chart rect title"))
    assert titles == ["1 approved", "1 cancelled", "1 pending", "1 rejected", "1 timed out"]
    assert pending in {row[0] for row in stored(api.config, "SELECT id FROM pauses WHERE status = 'pending'")}


def test_the_overview_says_what_its_timeout_share_is_a_share_of(running_api):
    api = running_api()
    _, keys = sign_up(api)
    answered, timed_out, *still_pending = (api.create_pause(keys["test"])["pause_id"] for _ in range(4))
    [(token,)] = stored(api.config, "SELECT respond_token FROM pauses WHERE id = ?", answered)
    api.post_json(f"/v1/respond/{token}", {"choice": "Approve"})
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", timed_out)
    api.step("timeouts")
    page = api.get("/dashboard/overview").html
    # 4 pauses, 1 timed out: 50% is of the 2 decided, which the page says, not of the 4.
    assert page.select_one("#total").text == "4" and page.select_one("#timeout-share").text == "50%"
    assert page.select_one("#timeout-share-of").text == "Timed out, of the 2 decided"


@pytest.mark.parametrize("timed_out, shown", [(0, "0%"), (1, "<1%"), (100, "50%"), (199, ">99%"), (200, "100%")])
def test_the_overview_shows_some_timeouts_as_neither_none_nor_all(running_api, timed_out, shown):
    api = running_api(**{"ratelimit.test_pauses_per_hour": 1000})
    _, keys = sign_up(api)
    for _ in range(200):
        api.create_pause(keys["test"])
    stored(api.config, "UPDATE pauses SET status = CASE WHEN rowid <= ? THEN 'timed_out' ELSE 'cancelled' END,"
                       " decided_at = created_at", timed_out)
    assert api.get("/dashboard/overview").html.select_one("#timeout-share").text == shown


def test_the_overview_leaves_out_pauses_stamped_after_its_last_day(running_api):
    api = running_api()
    _, keys = sign_up(api)
    today, ahead = (api.create_pause(keys["test"])["pause_id"] for _ in range(2))
    # Made just past midnight while the page was being read, or stamped by a clock set back since.
    tomorrow = pausepoint.db_time(pausepoint.utcnow() + dt.timedelta(days=1))
    stored(api.config, "UPDATE pauses SET created_at = ? WHERE id = ?", tomorrow, ahead)
    page = api.get("/dashboard/overview").html
    assert page.select_one("#total").text == "1"
    assert [t.text.split(": ")[1] for t in page.select("#chart rect title")] == ["1 pending"]


def test_the_front_page_links_to_the_dashboard_and_the_api_description(api):
    page = api.get("/")
    assert {a["href"] for a in page.html.select("a")} >= {"/dashboard", "/dashboard/signup", "/v1/openapi.json"}


# -- webhooks --------------------------------------------------------------------------

def test_webhooks_are_added_tested_disabled_redelivered_and_deleted_from_the_dashboard(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    sign_up(api)
    answer = add_endpoint(api, receiver.url + "/hook")
    page = answer.follow()
    assert answer.status_code == 303 and "you will not see it again" in page.text
    secret = page.html.select_one("#secret")["value"]
    assert secret.startswith("whsec_")
    webhook_id = stored(api.config, "SELECT id FROM webhooks")[0][0]
    assert stored(api.config, "SELECT events FROM webhooks") == [
        ('["pause.responded","pause.timed_out","pause.cancelled","pause.notification_failed"]',)]
    page = api.get(f"/dashboard/webhooks/{webhook_id}")
    assert secret not in page.text
    post_form(api, page, f"/dashboard/webhooks/{webhook_id}", action="test")
    api.step("webhooks")
    call = receiver.wait_for(1)[0]
    assert call["json"]["type"] == "webhook.test"
    assert pausepoint.verify_signature(secret, call["headers"]["X-PausePoint-Signature"], call["body"])
    page = api.get(f"/dashboard/webhooks/{webhook_id}")
    assert "webhook.test" in page.html.select_one("#deliveries").text and "200" in page.text
    delivery_id = stored(api.config, "SELECT id FROM webhook_deliveries")[0][0]
    post_form(api, page, f"/dashboard/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")
    api.step("webhooks")
    assert len(receiver.wait_for(2)) == 2 and receiver.calls[1]["json"]["id"] == call["json"]["id"]
    page = post_form(api, api.get(f"/dashboard/webhooks/{webhook_id}"), f"/dashboard/webhooks/{webhook_id}",
                     action="disable").maybe_follow()
    assert page.html.select_one("#webhook-status").text.startswith("disabled: disabled by dashboard:dev@example.com")
    page = post_form(api, page, f"/dashboard/webhooks/{webhook_id}", action="enable").maybe_follow()
    assert page.html.select_one("#webhook-status").text == "enabled"
    post_form(api, page, f"/dashboard/webhooks/{webhook_id}", action="delete")
    assert api.get("/dashboard/webhooks").html.select_one("#empty") is not None
    assert [row[0] for row in stored(api.config, "SELECT event_type FROM audit_events WHERE actor LIKE 'dashboard:%'"
                                                 " ORDER BY seq")] == ["webhook.created", "webhook.disabled",
                                                                       "webhook.updated", "webhook.updated",
                                                                       "webhook.deleted"]


def test_a_bad_webhook_url_is_explained_and_the_form_kept(api):
    sign_up(api)
    page = add_endpoint(api, "http://127.0.0.1:9/x")
    assert page.status_code == 422 and "non-public address" in page.text
    assert page.html.select_one("#url")["value"] == "http://127.0.0.1:9/x"
    assert stored(api.config, "SELECT count(*) FROM webhooks") == [(0,)]


def test_an_endpoint_is_added_only_with_the_password_so_a_taken_over_sign_in_leaves_none_behind(running_api,
                                                                                               receiver):
    api = running_api(**{"webhooks.allow_private": True})
    sign_up(api)
    page = add_endpoint(api, receiver.url, password="not my password")
    assert page.status_code == 401 and "no endpoint was added" in page.text
    assert page.html.select_one("#url")["value"] == receiver.url and "not my password" not in page.text
    assert stored(api.config, "SELECT count(*) FROM webhooks") == [(0,)]
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'webhook.created'") == [(0,)]
    assert add_endpoint(api, receiver.url).status_code == 303


def test_another_developers_webhook_cannot_be_seen_or_changed_by_url(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    sign_up(api)
    add_endpoint(api, receiver.url)
    webhook_id = stored(api.config, "SELECT id FROM webhooks")[0][0]
    api.reset()
    sign_up(api, email="other@example.com")
    api.get(f"/dashboard/webhooks/{webhook_id}", status=404)
    csrf = api.get("/dashboard/webhooks").html.select_one("input[name=csrf]")["value"]
    api.post(f"/dashboard/webhooks/{webhook_id}", {"csrf": csrf, "action": "delete"}, status=404)
    assert stored(api.config, "SELECT deleted_at FROM webhooks") == [(None,)]


# -- the operator ---------------------------------------------------------------------------

def test_only_operators_see_the_operator_page(api):
    sign_up(api)
    assert "Operator" not in api.get("/dashboard/overview").text
    api.get("/dashboard/operator", status=404)
    csrf = api.get("/dashboard/keys").html.select_one("input[name=csrf]")["value"]
    api.post("/dashboard/operator/registration", {"csrf": csrf, "open": "false"}, status=404)
    api.post("/dashboard/operator/plan", {"csrf": csrf, "email": "dev@example.com", "plan": "team"}, status=404)
    assert stored(api.config, "SELECT count(*) FROM server_settings") == [(0,)]


def test_the_operator_sees_usage_changes_plans_and_closes_registration(running_api, twilio):
    api = running_api(**twilio.settings(), **{"plans.team.monthly_pauses": 5000})
    _, keys = sign_up(api, email="ops@example.com")
    api.reset()
    _, customer = sign_up(api, email="customer@example.com")
    for _ in range(2):
        api.create_pause(customer["live"])
    api.create_pause(customer["test"])
    assert pausepoint.main(["--db", api.config["database.path"], "set-operator", "--email", "ops@example.com"]) == 0
    api.reset()
    log_in(api, email="ops@example.com")
    page = api.get("/dashboard/operator")
    rows = {tr.select("td")[0].text: [td.text.strip() for td in tr.select("td")[1:4]]
            for tr in page.html.select("#developers tbody tr")}
    assert rows == {"customer@example.com": ["Dev", "2 of 100", "1"], "ops@example.com (operator)": ["Dev", "0 of 100", "0"]}
    post_form(api, page, "/dashboard/operator/plan", email="customer@example.com", plan="team")
    assert stored(api.config, "SELECT plan FROM developers WHERE email = 'customer@example.com'") == [("team",)]
    assert stored(api.config, "SELECT actor, event_type FROM audit_events WHERE event_type = 'plan.changed'") == [
        ("operator:ops@example.com", "plan.changed")]

    assert "as registration.open in the config says" in page.text
    page = post_form(api, api.get("/dashboard/operator"), "/dashboard/operator/registration").maybe_follow()
    assert "Registration is closed" in page.html.select_one("#registration").text
    assert stored(api.config, "SELECT d.email, a.livemode, a.actor, a.data FROM audit_events a JOIN developers d"
                              " ON d.id = a.developer_id WHERE event_type = 'registration.changed'") == [
        ("ops@example.com", 1, "operator:ops@example.com", '{"open":false}')]
    assert "as set here on the dashboard" in page.text
    assert api.post_json("/v1/auth/register", {"email": "new@example.com", "name": "N", "password": PASSWORD},
                         status=403).json["error"]["code"] == "registration_closed"
    api.reset()
    assert "create-developer" in api.get("/dashboard/signup", status=403).text


def test_opening_registration_on_the_dashboard_names_the_push_targets_anyone_who_registers_may_use(running_api):
    api = running_api(**{"registration.open": False, "channels.ops.url": "json://127.0.0.1:9/ops",
                         "channels.team.url": "json://127.0.0.1:9/team", "channels.team.developers": ["*"]})
    pausepoint.register_developer(api.app.runtime.db(), api.config, "ops@example.com", "Ops", PASSWORD)
    assert pausepoint.main(["--db", api.config["database.path"], "set-operator", "--email", "ops@example.com"]) == 0
    log_in(api, email="ops@example.com")
    page = api.get("/dashboard/operator")
    assert page.html.select("#registration-warnings li") == []
    page = post_form(api, page, "/dashboard/operator/registration").maybe_follow()
    assert "Registration is open" in page.html.select_one("#registration").text
    [warning] = [" ".join(li.text.split()) for li in page.html.select("#registration-warnings li")]
    assert warning.startswith("push target 'ops' has no developers list, and registration is open: anyone who")


def test_the_operator_page_names_a_developers_plan_the_config_no_longer_defines(running_api):
    """Not "0 of —" and a dropdown that only offers the plans there are: the plan, and that it is missing."""
    with_team = running_api(**{"plans.team.monthly_pauses": 5000})
    sign_up(with_team, email="ops@example.com")
    with_team.reset()
    sign_up(with_team, email="customer@example.com")
    pausepoint.change_plan(with_team.app.runtime.db(), with_team.config, "customer@example.com", "team", "cli")
    assert pausepoint.main(["--db", with_team.config["database.path"], "set-operator", "--email", "ops@example.com"]) == 0
    api = running_api()                     # the same database, started without plans.team
    log_in(api, email="ops@example.com")
    page = api.get("/dashboard/operator")
    row = next(tr for tr in page.html.select("#developers tbody tr") if "customer@" in tr.select("td")[0].text)
    assert "plan team is not configured" in " ".join(row.select("td")[2].text.split())
    chosen = row.select_one("select option[selected]")
    assert chosen["value"] == "team" and chosen.text == "team (not configured)"


def test_a_start_warns_of_developers_on_plans_the_config_no_longer_defines(running_api, spawn_server):
    """Their live pauses are all refused 403 unknown_plan: the operator should hear of it at once."""
    api = running_api(**{"plans.team.monthly_pauses": 5000})
    for email in ("a@example.com", "b@example.com"):
        api.register(email=email)
        pausepoint.change_plan(api.app.runtime.db(), api.config, email, "team", "cli")
    api.app.runtime.stop()
    warned = [line for line in spawn_server().output().splitlines() if "plans this config does not define" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "team (2 developers)" in warned[0]
    assert "403 unknown_plan" in warned[0] and "set-plan" in warned[0]


# -- guessing passwords, and locking people out ---------------------------------------------

def from_address(api, address):
    """A new browser (no cookies) at another address."""
    api.reset()
    api.extra_environ["REMOTE_ADDR"] = address


def test_nobody_can_lock_a_developer_out_of_the_browser_they_signed_in_with(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    sign_up(api)                                   # this browser is now known for dev@example.com
    usual = Api(api.app, extra_environ={"REMOTE_ADDR": "192.0.2.50"})
    log_in(usual)
    post_form(usual, usual.get("/dashboard/overview"), "/dashboard/logout")
    for n in range(3):                             # an attacker fails on purpose, from three addresses
        from_address(api, f"198.51.100.{n}")
        log_in(api, password="guess", status=401)
    from_address(api, "203.0.113.9")               # a browser never used before is refused, even with the password
    assert "failed sign-ins for this email" in log_in(api, status=429).text
    assert log_in(usual).headers["Location"].endswith("/dashboard")    # the usual browser still gets in


def test_api_key_rotation_spends_the_same_per_email_budget(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    api.register()
    for n in range(3):
        api.extra_environ["REMOTE_ADDR"] = f"198.51.100.{n}"
        api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": "guess", "key": "live"},
                      status=401)
    api.extra_environ["REMOTE_ADDR"] = "198.51.100.99"
    refused = api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"},
                            status=429).json["error"]
    assert "failed sign-ins for this email" in refused["message"]
    assert "a browser that has signed in as you before is not held to this" in refused["message"]     # the way out
    from_address(api, "203.0.113.9")
    assert log_in(api, status=429).status_code == 429


def test_a_signed_in_visitor_to_the_login_page_goes_to_the_dashboard(api):
    sign_up(api)
    assert api.get("/dashboard/login?next=/dashboard/audit").headers["Location"].endswith("/dashboard/audit")


def test_a_browser_is_remembered_once_per_developer_whatever_cookie_it_brought(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    sign_up(api)
    api.reset()
    sign_up(api, email="second@example.com")
    shared = Api(api.app, extra_environ={"REMOTE_ADDR": "192.0.2.50"})
    log_in(shared)
    post_form(shared, shared.get("/dashboard/overview"), "/dashboard/logout")
    stale = shared.cookies["pp_device"]
    stored(api.config, "DELETE FROM dashboard_devices")     # a cookie the server no longer knows
    for _ in range(3):                             # one browser, two accounts, signing in again and again
        for email in ("dev@example.com", "second@example.com"):
            log_in(shared, email=email)
            post_form(shared, shared.get("/dashboard/overview"), "/dashboard/logout")
    device = shared.cookies["pp_device"]
    assert device != stale
    assert stored(api.config, "SELECT count(*) FROM dashboard_devices WHERE token_hash = ?",
                  pausepoint.key_digest(device)) == [(2,)]
    for n in range(3):                             # both accounts' email budgets spent by an attacker
        for email in ("dev@example.com", "second@example.com"):
            from_address(api, f"198.51.100.{n}")
            log_in(api, email=email, password="guess", status=401)
    for email in ("dev@example.com", "second@example.com"):
        log_in(shared, email=email)                # still gets in to both
        post_form(shared, shared.get("/dashboard/overview"), "/dashboard/logout")


def test_a_password_change_forgets_browsers_and_a_developer_keeps_ten(running_api):
    api = running_api()
    sign_up(api)
    developer = stored(api.config, "SELECT id FROM developers")[0][0]
    for _ in range(12):
        log_in(Api(api.app, extra_environ=api.extra_environ))
    assert stored(api.config, "SELECT count(*) FROM dashboard_devices") == [(10,)]
    change_the_password(api)
    assert stored(api.config, "SELECT count(*) FROM dashboard_devices WHERE developer_id = ?", developer) == [(0,)]


def test_guesses_sent_all_at_once_stay_within_the_budget(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3, "security.bcrypt_rounds": 8})
    api.register()

    def guess(n):
        client = Api(api.app, extra_environ={"REMOTE_ADDR": f"198.51.100.{n}"})
        return client.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": f"guess {n}",
                                                         "key": "live"}, status="*").status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(guess, range(12)))
    assert answers.count(401) <= 3 and answers.count(401) + answers.count(429) == 12


def test_secrets_shown_once_wait_for_their_own_page(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    sign_up(api)
    first = add_endpoint(api, receiver.url + "/a")
    second = add_endpoint(api, receiver.url + "/b")
    rotated = post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD)
    assert api.head("/dashboard/keys/shown").status_code == 303         # a HEAD takes nothing
    secrets_shown = [page.follow().html.select_one("#secret")["value"] for page in (second, first)]
    assert len(set(secrets_shown)) == 2 and all(s.startswith("whsec_") for s in secrets_shown)
    assert rotated.follow().html.select_one("input.secret")["value"].startswith("pp_test_")
    assert first.follow().html.select_one("#secret") is None             # once


def test_failures_from_a_shared_address_do_not_lock_out_a_browser_that_signed_in_before(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    sign_up(api)                                   # this browser, at the office's address, is known
    post_form(api, api.get("/dashboard/overview"), "/dashboard/logout")
    coworker = Api(api.app, extra_environ=dict(api.extra_environ))
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        log_in(coworker, email=email, password="guess", status=401)
    assert log_in(coworker, status=429).status_code == 429       # the address's budget is spent
    assert log_in(api).headers["Location"].endswith("/dashboard")     # but not this browser's


def test_nobody_sharing_the_address_can_stop_a_signed_in_developer_rotating_or_changing_the_password(running_api):
    api = running_api(**{"ratelimit.rotate_per_hour": 3})
    sign_up(api)
    stranger = Api(api.app, extra_environ=dict(api.extra_environ))     # the same office, no account at all
    for n in range(3):
        stranger.post_json("/v1/auth/keys/rotate", {"email": f"x{n}@example.org", "password": "guess-guess",
                                                    "key": "live"}, status=401)
    assert stranger.post_json("/v1/auth/keys/rotate", {"email": "x@example.org", "password": "guess-guess",
                                                       "key": "live"}, status=429)     # the address's budget is spent
    rotated = post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="live", password=PASSWORD)
    assert rotated.headers["Location"].endswith("/dashboard/keys/shown")
    assert change_the_password(api).headers["Location"].endswith("/dashboard/login?notice=password")


def test_a_signed_in_developer_has_a_budget_of_rotations_and_password_changes(running_api):
    api = running_api(**{"ratelimit.rotate_per_hour": 3})
    sign_up(api)
    for _ in range(2):
        post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD)
    post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password="not my password")
    post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD)
    refused = post_form(api, api.get("/dashboard/keys"), "/dashboard/keys/rotate", key="test", password=PASSWORD)
    assert refused.status_code == 429 and "key rotations, password changes and endpoints added for your account" in refused.text
    other_browser = Api(api.app, extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    log_in(other_browser)                          # the budget is the account's, wherever it signs in
    assert change_the_password(other_browser).status_code == 429


def test_whoever_took_a_sign_in_cannot_spend_the_budget_that_the_password_change_ending_it_needs(running_api):
    api = running_api(**{"ratelimit.rotate_per_hour": 3})
    sign_up(api)
    taker = Api(api.app, extra_environ={"REMOTE_ADDR": "203.0.113.66"})
    taker.set_cookie("pp_session", api.cookies["pp_session"])       # the sign-in's cookie, copied
    for _ in range(5):
        wrong = post_form(taker, taker.get("/dashboard/keys"), "/dashboard/password", password="a guess at it",
                          new_password="the taker's own password")
        assert wrong.status_code == 401
    assert change_the_password(api).headers["Location"].endswith("/dashboard/login?notice=password")
    assert taker.get("/dashboard/keys", status=303).headers["Location"].startswith("/dashboard/login")   # ended


def test_the_browser_that_changes_the_password_stays_known(running_api):
    api = running_api(**{"ratelimit.login_per_hour": 3})
    sign_up(api)
    for n in range(3):                             # someone is spending the email's budget
        attacker = Api(api.app, extra_environ={"REMOTE_ADDR": f"198.51.100.{n}"})
        log_in(attacker, password="guess", status=401)
    change_the_password(api)
    assert log_in(api, password="a brand new passphrase").headers["Location"].endswith("/dashboard")


def test_the_browsers_kept_are_those_that_signed_in_last(running_api):
    api = running_api()
    sign_up(api)
    everyday = api.cookies["pp_device"]
    post_form(api, api.get("/dashboard/overview"), "/dashboard/logout")
    for n in range(12):
        log_in(Api(api.app, extra_environ=api.extra_environ))
        if n == 5:
            log_in(api)                            # the everyday browser signs in again
            post_form(api, api.get("/dashboard/overview"), "/dashboard/logout")
    kept = {row[0] for row in stored(api.config, "SELECT token_hash FROM dashboard_devices")}
    assert len(kept) == 10 and pausepoint.key_digest(everyday) in kept        # the first seen, but used since


def test_rotating_needs_a_real_mode_and_two_rotations_show_both_keys(api):
    sign_up(api)
    page = api.get("/dashboard/keys")
    form = next(f for f in page.forms.values() if f.action == "/dashboard/keys/rotate")
    csrf = form["csrf"].value
    refused = api.post("/dashboard/keys/rotate", {"csrf": csrf, "key": "bogus", "password": PASSWORD}, status=422)
    assert "Key must be" in refused.text
    for mode in ("live", "test"):
        api.post("/dashboard/keys/rotate", {"csrf": csrf, "key": mode, "password": PASSWORD}, status=303)
    shown = [field["value"][:8] for field in api.get("/dashboard/keys/shown").html.select("input.secret")]
    assert shown == ["pp_live_", "pp_test_"]


def password_changed(api):
    assert change_the_password(api).headers["Location"].endswith("/dashboard/login?notice=password")


HASHING_FLOWS = {       # each: what it needs first, then the request that checks or sets a password
    "API registration": (lambda api: None, lambda api: api.post_json(
        "/v1/auth/register", {"email": "new@example.com", "name": "New", "password": PASSWORD})),
    "API key rotation": (Api.register, lambda api: api.post_json(
        "/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"})),
    "sign-up": (lambda api: None, sign_up),
    "sign-in": (Api.register, log_in),
    "password change": (sign_up, password_changed),
}


@pytest.mark.parametrize("flow", HASHING_FLOWS)
def test_every_password_hash_takes_a_hashing_turn_as_the_clients_address(running_api, monkeypatch, flow):
    api = running_api(remote_addr="192.0.2.55")
    api.extra_environ["HTTP_X_FORWARDED_FOR"] = "203.0.113.99"     # believed only from a trusted proxy
    before, request = HASHING_FLOWS[flow]
    before(api)
    hashing = api.app.runtime.hashing = pausepoint.Turns(1)
    outside, held = [], [True]      # hashes made while the test held the one turn, or while it was free
    for name in ("hashpw", "checkpw"):
        def hash_in_turn(*args, real=getattr(bcrypt, name)):
            if held[0]:
                outside.append(real.__name__)
            elif hashing.take("probe", timeout=0):
                hashing.give()
                outside.append(real.__name__)
            return real(*args)
        monkeypatch.setattr(bcrypt, name, hash_in_turn)
    assert hashing.take("198.51.100.7", timeout=0)         # the one turn, held by another address
    with concurrent.futures.ThreadPoolExecutor(1) as browser:
        answer = browser.submit(request, api)
        wait_until(lambda: hashing.waiting("192.0.2.55") == 1)
        held[0] = False
        hashing.give()
        answer.result()
    assert outside == [] and hashing.waiting() == 0


def test_with_hashing_busy_a_bad_new_password_is_refused_at_once_and_a_good_one_told_when_to_retry(
        running_api, monkeypatch):
    api = running_api()
    sign_up(api)
    hashing = api.app.runtime.hashing = pausepoint.Turns(1)
    assert hashing.take("198.51.100.7", timeout=0)         # another address holds the one turn throughout
    monkeypatch.setattr(pausepoint, "HASH_WAIT_SECONDS", 0.2)
    refused = change_the_password(api, new_password="short")
    assert refused.status_code == 422 and "at least 8 characters" in refused.text
    busy = change_the_password(api)
    assert busy.status_code == 503 and busy.headers["Retry-After"]
    hashing.give()
    password_changed(api)


def test_a_pause_with_more_events_than_its_page_shows_says_so_and_links_to_them_all(running_api):
    api = running_api()
    _, keys = sign_up(api)
    busy, quiet = (api.create_pause(keys["test"])["pause_id"] for _ in range(2))
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                       " INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data,"
                       " prev_hash, hash) SELECT developer_id, livemode, timestamp, 'system', 'respond_page.opened',"
                       " pause_id, data, prev_hash, hash FROM audit_events, n WHERE pause_id = ?",
           pausepoint.TIMELINE_EVENTS, busy)              # as many openings as the page shows events
    page = api.get(f"/dashboard/pauses/{busy}")
    shown = timeline(page)
    assert len(shown) == pausepoint.TIMELINE_EVENTS and "pause.created" not in shown
    assert page.html.select_one("#timeline-earlier a")["href"] == f"/dashboard/audit?pause_id={busy}"
    assert api.get(page.html.select_one("#timeline-earlier a")["href"]).status_code == 200
    assert api.get(f"/dashboard/pauses/{quiet}").html.select_one("#timeline-earlier") is None


def test_a_sign_in_is_known_good_for_the_http_fronts_turns_only_while_it_is_good(api):
    """The HTTP front gives a sign-in a party of its own (FairTaskDispatcher.party()) once the
    app has found it good; one made up, or ended since, is nobody in particular."""
    sign_up(api)
    token = api.cookies["pp_session"]
    api.get("/dashboard/overview", status=200)
    assert token in api.app.runtime.vouched
    api.get("/dashboard/overview", headers={"Cookie": "pp_session=made-up"}, status=303)
    assert "made-up" not in api.app.runtime.vouched
    post_form(api, api.get("/dashboard/logout"), "/dashboard/logout")
    api.get("/dashboard/overview", headers={"Cookie": f"pp_session={token}"}, status=303)
    assert token not in api.app.runtime.vouched

