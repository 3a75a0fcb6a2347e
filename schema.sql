-- PausePoint's data model. The whole truth of the service lives here: the
-- scheduler only ever reads due work out of these tables, so a restart, a
-- missed run or a crash never loses or doubles an event.
--
-- Conventions:
--   * Times are UTC text, 'YYYY-MM-DDTHH:MM:SS.mmmZ'. One fixed width means text
--     comparison is time comparison, so due-work queries can use plain indexes.
--   * livemode is 1 for pp_live_ keys and 0 for pp_test_ keys. Every table an
--     API key can read is filtered by (developer_id, livemode): test and live
--     data never mix.
--   * JSON columns hold compact JSON text written by pausepoint.py.
--   * What may be deleted, and by whom: only the pruning job in pausepoint.py
--     (prune_expired_data) deletes, and only what is past its retention
--     (retention.* settings): decided test-mode pauses with their notifications,
--     people, steps and idempotency keys; the oldest test-mode audit events of each
--     developer's chain, up to the first one within retention; finished webhook events
--     with their deliveries and attempts; idempotency keys older than 24 hours. Past
--     retention.test_pauses_kept test pauses, a developer's older decided ones go
--     sooner, with their chain's and test event feed's part from before the oldest kept.
--     Live pauses and live audit events are never deleted (a trigger enforces the latter).
-- Later changes are numbered migrations in pausepoint.py (MIGRATIONS), each
-- recorded in schema_migrations.

-- Which migrations this database has had. A fresh database is created from
-- this file and recorded as the newest version.
CREATE TABLE schema_migrations (
    version     INTEGER PRIMARY KEY,
    applied_at  TEXT NOT NULL
);

-- A developer is one tenant: an account with a password and a plan.
CREATE TABLE developers (
    id             TEXT PRIMARY KEY,                 -- 'dev_' + 32 hex
    email          TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name           TEXT NOT NULL,
    password_hash  TEXT NOT NULL,                    -- bcrypt
    plan           TEXT NOT NULL DEFAULT 'free',     -- a name under [plans] in the config
    created_at     TEXT NOT NULL,
    is_operator    INTEGER NOT NULL DEFAULT 0        -- 1: may use the dashboard's operator page (set-operator)
);

-- Settings the operator changed on the dashboard; each overrides the config file's value
-- for as long as its row exists.
CREATE TABLE server_settings (
    key         TEXT PRIMARY KEY,                    -- a config key: 'registration.open'
    value       TEXT NOT NULL,                       -- JSON
    changed_by  TEXT NOT NULL,                       -- 'operator:<email>'
    changed_at  TEXT NOT NULL
);

-- API keys. Only the SHA-256 digest of a key is kept: a copy of the database
-- does not let anyone call the API. A rotated key keeps its row, with
-- revoked_at set, so the audit log can still name it.
CREATE TABLE api_keys (
    key_hash      TEXT PRIMARY KEY,                  -- hex SHA-256 of the whole key; serves authentication
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    livemode      INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    hint          TEXT NOT NULL,                     -- 'pp_live_…Wx9z': enough to recognise, useless to attack
    created_at    TEXT NOT NULL,
    revoked_at    TEXT                               -- NULL while the key works
);
-- At most one working key per developer and mode; rotation revokes before it inserts.
CREATE UNIQUE INDEX api_keys_one_active ON api_keys(developer_id, livemode) WHERE revoked_at IS NULL;

-- Dashboard sign-ins. The cookie carries a 256-bit token; only its SHA-256 is
-- kept, as for API keys. Logging out deletes the row; changing the password
-- deletes all of a developer's. A row past either limit (dashboard.session_*)
-- is refused and deleted when next used, or else by the hourly pruning.
CREATE TABLE dashboard_sessions (
    token_hash    TEXT PRIMARY KEY,                  -- hex SHA-256 of the cookie's token; serves the lookup
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    csrf_token    TEXT NOT NULL,                     -- every form of the session carries it back
    livemode      INTEGER NOT NULL DEFAULT 0 CHECK (livemode IN (0, 1)),   -- the mode its pages show
    created_at    TEXT NOT NULL,                     -- the absolute limit counts from here
    last_seen_at  TEXT NOT NULL                      -- the idle limit from here (updated once a minute at most)
);
CREATE INDEX dashboard_sessions_by_developer ON dashboard_sessions(developer_id);
CREATE INDEX dashboard_sessions_by_last_seen ON dashboard_sessions(last_seen_at);

-- Browsers that have signed in: the digest of a long-lived device cookie, once per
-- developer it signed in as. Failed sign-ins for an email are not held against a
-- browser that signed in as that developer before, so failing on purpose cannot lock
-- anyone out of their usual browser. At most DEVICES_PER_DEVELOPER per developer (those
-- that signed in last), all but the changing one deleted when the password changes, and
-- each a year after it last signed in.
CREATE TABLE dashboard_devices (
    token_hash    TEXT NOT NULL,                     -- hex SHA-256 of the cookie's token
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    signed_in_at  TEXT NOT NULL,                     -- its last sign-in as this developer
    PRIMARY KEY (token_hash, developer_id)
);
CREATE INDEX dashboard_devices_by_developer ON dashboard_devices(developer_id, signed_in_at);
CREATE INDEX dashboard_devices_by_age ON dashboard_devices(signed_in_at);

-- A pause: one question put to one human (recipient, channel), or to a team (pause_recipients), and its outcome.
CREATE TABLE pauses (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT, -- creation order; list and cursor order
    id               TEXT NOT NULL UNIQUE,            -- 'psr_' + 32 hex, the first 12 the creation time (ms)
    developer_id     TEXT NOT NULL REFERENCES developers(id),
    livemode         INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    recipient        TEXT NOT NULL,
    channel          TEXT NOT NULL,
    message          TEXT NOT NULL,
    options          TEXT NOT NULL,                   -- JSON array of 2-10 distinct strings
    timeout_default  TEXT,                            -- one of options, or NULL: a timeout then decides nothing
    metadata         TEXT,                            -- the agent's JSON object, returned verbatim
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'responded', 'timed_out', 'cancelled')),
    choice           TEXT,                            -- the option chosen, or timeout_default on timeout
    comment          TEXT,                            -- the human's free-text comment
    decided_at       TEXT,
    decided_by       TEXT,                            -- 'recipient:<recipient>', 'timeout' or 'api:<key hint>'
    respond_token    TEXT NOT NULL UNIQUE,            -- 256-bit secret in respond_url; the unique index serves lookups.
                                                      -- Kept (not hashed) because notifications are rendered and
                                                      -- resent from it after a restart.
    reply_code       TEXT,                            -- sms/whatsapp: 'K7', names this pause in a text reply; unique
                                                      -- among the recipient's pending pauses (index below)
    created_at       TEXT NOT NULL,
    expires_at       TEXT NOT NULL,
    title            TEXT,                            -- what it is about, shown above the question
    fields           TEXT,                            -- JSON object of named values the approver sees and may
                                                      -- change ({"amount": {"type": "number", "value": 340, …}});
                                                      -- the decision writes the final values here. NULL: none.
    edited           TEXT,                            -- once a pause with fields is decided: JSON object of the
                                                      -- ones the approver changed, {"amount": {"old": 340, "new": 300}}
    team             INTEGER NOT NULL DEFAULT 0,      -- 1: asked with recipients, a quorum or an escalation; its
                                                      -- people and their votes are in pause_recipients
    quorum           TEXT,                            -- JSON {"choice": "Approve", "count": 2}: decided that choice once
                                                      -- `count` people chose it, anything else at its first vote. NULL:
                                                      -- the first answer decides.
    receipt          TEXT,                            -- once decided: a compact JWS (EdDSA) of the outcome, signed with
                                                      -- the server's key (see receipt_claims() and Signer)
    test_weight      INTEGER NOT NULL DEFAULT 1       -- a test pause's share of its developer's test allowance: the
                                                      -- messages it may send times the 4 KiB units the agent wrote,
                                                      -- plus those its answers may write
                                                      -- (weight_in_test_mode() in pausepoint.py); 1 for a live one
);
-- The timeout job: "pending pauses whose expires_at has passed", oldest first.
CREATE INDEX pauses_pending_by_expiry ON pauses(expires_at) WHERE status = 'pending';
-- GET /v1/pause: a developer's pauses in one mode, newest first, optionally by status.
CREATE INDEX pauses_by_owner ON pauses(developer_id, livemode, seq);
CREATE INDEX pauses_by_owner_status ON pauses(developer_id, livemode, status, seq);
-- SMS replies: the pending live pauses sent to a phone number (no reply answers a test pause, and
-- any tenant may have thousands of those pending to a number: see pauses_pending_reply_code).
CREATE INDEX pauses_pending_by_recipient ON pauses(recipient, seq) WHERE status = 'pending' AND livemode = 1;
-- A reply code names exactly one pending pause to a number among those of its scope: every
-- developer's live pauses (the iif() is ''), or one developer's test pauses (their id), since no
-- reply answers a test pause (CODE_SCOPE in pausepoint.py). No other tenant's test pauses can use
-- up a number's codes.
CREATE UNIQUE INDEX pauses_pending_reply_code ON pauses(recipient, livemode, iif(livemode, '', developer_id), reply_code)
    WHERE status = 'pending' AND reply_code IS NOT NULL;
-- New codes also avoid those of the number's pauses (in the same scope) decided in the last week,
-- so a late reply to a decided pause never names a newer one: one seek tells whether a code was.
CREATE INDEX pauses_recent_reply_codes ON pauses(recipient, livemode, iif(livemode, '', developer_id), reply_code,
                                                 decided_at)
    WHERE reply_code IS NOT NULL;
-- SMS replies: the live pauses to a number decided lately (a reply without a code is not taken
-- as an answer to the one open while another in the conversation closed shortly before it).
CREATE INDEX pauses_closed_by_recipient ON pauses(recipient, decided_at)
    WHERE livemode = 1 AND channel IN ('sms', 'whatsapp');
-- Pruning: decided test-mode pauses, oldest decision first.
CREATE INDEX pauses_decided_test ON pauses(decided_at) WHERE livemode = 0 AND status != 'pending';
-- A developer's test pauses by weight: those pending, summed on each test create
-- (pauses.max_test_pending), and all, newest first, for pruning (retention.test_pauses_kept).
CREATE INDEX pauses_test_weights ON pauses(developer_id, status, seq, test_weight) WHERE livemode = 0;
-- The dashboard's overview: a developer's pauses created in its last 30 days.
CREATE INDEX pauses_by_owner_created ON pauses(developer_id, livemode, created_at);

-- Live pauses each developer created in each calendar month (UTC), counted by the create
-- that makes each one. The plan's quota is checked under the write lock on every live
-- create: counting the month's pauses there took 21 ms at 300,000 of them, one row is a seek.
CREATE TABLE monthly_usage (
    developer_id     TEXT NOT NULL REFERENCES developers(id),
    month            TEXT NOT NULL,                   -- '2026-05', as created_at begins
    live_pauses      INTEGER NOT NULL,
    PRIMARY KEY (developer_id, month)
) WITHOUT ROWID;

-- The people a team pause asks, one row each in the order they were asked, and each one's vote.
-- A pause asking one person has no rows here (the pause row says whom it asks). A team pause's
-- first person (position 0) is the pause's own recipient, with the pause's own token and code.
CREATE TABLE pause_recipients (
    pause_id       TEXT NOT NULL REFERENCES pauses(id),
    position       INTEGER NOT NULL,                  -- 0, 1, …: the order asked in; escalations come last
    livemode       INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    recipient      TEXT NOT NULL,
    channel        TEXT NOT NULL,
    respond_token  TEXT NOT NULL UNIQUE,              -- this person's 256-bit link secret; the index serves lookups
    reply_code     TEXT,                              -- sms/whatsapp: as pauses.reply_code, among this number's codes
    added_by       TEXT NOT NULL CHECK (added_by IN ('request', 'escalation')),
    added_at       TEXT NOT NULL,
    opened_at      TEXT,                              -- when their link was first opened
    choice         TEXT,                              -- their vote, once they cast it (at most one each)…
    comment        TEXT,
    edits          TEXT,                              -- …with the fields they changed, JSON {"amount": 300}, or NULL
    voted_at       TEXT,
    pause_decided_at TEXT,                            -- the pause's decided_at, NULL while it is pending: a copy,
                                                      -- so a number's open and recent codes are one index range
    developer_id   TEXT REFERENCES developers(id),    -- the pause's: a copy, for the reply codes' index (set on
                                                      -- every row; it may be NULL only as a later column)
    PRIMARY KEY (pause_id, position)
);
-- SMS replies and reply codes: the people after the first asked on a number (the first is in
-- pauses), in a reply code's scope (as pauses_pending_reply_code), those of pending pauses (NULL)
-- and of the pauses decided lately.
CREATE INDEX pause_recipients_by_number ON pause_recipients(recipient, livemode, iif(livemode, '', developer_id),
                                                            pause_decided_at)
    WHERE position > 0 AND reply_code IS NOT NULL;

-- What a pending pause does later: each reminder and escalation it asked for, due at a time.
-- The step job claims due rows by compare-and-set, so each is done once, after a restart too,
-- and marks 'skipped' those whose pause was decided first.
CREATE TABLE pause_steps (
    id           INTEGER PRIMARY KEY,
    pause_id     TEXT NOT NULL REFERENCES pauses(id),
    kind         TEXT NOT NULL CHECK (kind IN ('reminder', 'escalation')),
    due_at       TEXT NOT NULL,
    recipient    TEXT,                                -- an escalation's target…
    channel      TEXT,                                -- …and its channel
    status       TEXT NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'done', 'skipped')),
    done_at      TEXT
);
-- The step job: scheduled steps, earliest first.
CREATE INDEX pause_steps_due ON pause_steps(due_at) WHERE status = 'scheduled';
-- Pruning: a pause's steps.
CREATE INDEX pause_steps_by_pause ON pause_steps(pause_id);

-- The notification outbox: each message to a person about a pause (the question, and any
-- reminders), written in the same transaction as what caused it, sent later by the
-- scheduler so the API never waits on a provider.
CREATE TABLE notifications (
    id                   TEXT PRIMARY KEY,            -- 'ntf_' + 32 hex
    pause_id             TEXT NOT NULL REFERENCES pauses(id),
    position             INTEGER NOT NULL DEFAULT 0,  -- whom of the pause's people (pause_recipients.position)
    kind                 TEXT NOT NULL DEFAULT 'ask' CHECK (kind IN ('ask', 'reminder')),
    developer_id         TEXT NOT NULL REFERENCES developers(id),  -- the pause's owner: sends are shared fairly by owner
    channel              TEXT NOT NULL,
    recipient            TEXT NOT NULL,
    livemode             INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    text                 TEXT NOT NULL,               -- exactly what is (or, in test mode, would be) sent
    status               TEXT NOT NULL DEFAULT 'queued'  -- 'cancelled': the pause was decided before it was sent
                         CHECK (status IN ('queued', 'sending', 'sent', 'simulated', 'failed', 'cancelled')),
                                                      -- 'failed': never sent, or sent and reported undelivered
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_attempt_at      TEXT NOT NULL,               -- when 'queued': due time; when 'sending': claim expiry
    provider_message_id  TEXT,
    last_error           TEXT,
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL,
    -- 1 once an attempt failed after its request went out and before the provider answered (a
    -- deadline, a dropped connection): it may have been sent, so a reply to it counts.
    may_have_reached     INTEGER NOT NULL DEFAULT 0 CHECK (may_have_reached IN (0, 1)),
    -- What Twilio's status callback last said became of a text it took (provider_message_id):
    -- 'delivered', 'read' (WhatsApp, after delivered), 'undelivered' or 'failed' (which fail the
    -- notification after it was sent); NULL: no such word yet, or not a text. The first of
    -- them stands but for 'read' after 'delivered': reports come again and out of order.
    delivery_status      TEXT CHECK (delivery_status IN ('delivered', 'read', 'undelivered', 'failed'))
);
-- A pause's messages: the API's notification (the first person's question), decisions cancelling
-- unsent ones, SMS replies checking that the question reached the number, pruning.
CREATE INDEX notifications_by_pause ON notifications(pause_id, position);
-- The send job, test mode: queued rows that are due (simulated in one batch).
CREATE INDEX notifications_due_test ON notifications(next_attempt_at) WHERE status IN ('queued', 'sending') AND livemode = 0;
-- The send job, live: each channel and developer with unsent notifications (skip-scans), then their
-- due rows and 'sending' claims a crash abandoned, so neither one developer's flood nor a backlog on
-- a hung channel hides anything else.
CREATE INDEX notifications_due_live ON notifications(channel, developer_id, next_attempt_at)
    WHERE status IN ('queued', 'sending') AND livemode = 1;
-- Twilio's status callbacks: the text a delivery report is about, by its MessageSid.
CREATE INDEX notifications_by_provider_message_id ON notifications(provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Twilio's reports on texts whose id is not stored yet: Twilio may post one before its answer
-- to the send reaches us, and posts each once. record_send() applies them, in the order they
-- came, as it stores the text's id; one no send claims is pruned after EARLY_REPORT_KEPT.
-- Each text's word is kept once, the first that came (only the first final word counts, and
-- 'read' after 'delivered'): a signed report posted again and again by whoever saw it, about a
-- text no send claims, would otherwise add a row each time, for a day.
CREATE TABLE early_delivery_reports (
    seq          INTEGER PRIMARY KEY,                 -- the order they came in
    message_sid  TEXT NOT NULL,                       -- Twilio's id of the text
    reported     TEXT NOT NULL,                       -- its MessageStatus: one DELIVERED or NOT_DELIVERED names
    error_code   TEXT NOT NULL,                       -- its ErrorCode, '' for none
    received_at  TEXT NOT NULL
);
-- record_send(): the reports waiting for the text it records; one row per text and word.
CREATE UNIQUE INDEX early_delivery_reports_by_sid ON early_delivery_reports(message_sid, reported);

-- Text replies taken from Twilio's webhook, by its MessageSid. A signed webhook carries no
-- time, so one sent again (Twilio retrying, or anyone who saw it replaying it to answer a
-- newer pause) is known only by its id: it decides nothing a second time. Live only (test
-- pauses are never answered by text), and kept, like the live audit log.
CREATE TABLE sms_replies (
    message_sid  TEXT PRIMARY KEY,
    received_at  TEXT NOT NULL
) WITHOUT ROWID;

-- The audit log: one row per thing that happened, written in the same
-- transaction as the change it records. Append-only (see the triggers below);
-- only test-mode rows past retention.test_days are ever deleted, by the pruning job.
CREATE TABLE audit_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- order and cursor; the API shows 'aud_<seq>'
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    livemode      INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    timestamp     TEXT NOT NULL,
    actor         TEXT NOT NULL,                      -- who did it: 'api:<key hint>', 'recipient:<recipient>',
                                                      -- 'timeout', 'system', 'respond_link', 'developer:<email>'
    event_type    TEXT NOT NULL,                      -- 'pause.created', 'pause.responded', …
    pause_id      TEXT,                               -- the pause it concerns, if any
    data          TEXT NOT NULL DEFAULT '{}',         -- JSON object with the event's details
    prev_hash     TEXT,                               -- the hash of the event before it in its chain (one chain per
                                                      -- developer and mode; 64 zeros for the first)
    hash          TEXT                                -- SHA-256 of this event and prev_hash (audit_hash() in
                                                      -- pausepoint.py says exactly what), so a changed, removed or
                                                      -- reordered event breaks the chain
);
-- GET /v1/audit, newest first, with its optional filters.
CREATE INDEX audit_by_owner ON audit_events(developer_id, livemode, seq);
CREATE INDEX audit_by_owner_type ON audit_events(developer_id, livemode, event_type, seq);
CREATE INDEX audit_by_pause ON audit_events(pause_id, seq) WHERE pause_id IS NOT NULL;
-- Pruning: test-mode events past retention, oldest first (each chain loses only its oldest part).
CREATE INDEX audit_test_by_age ON audit_events(timestamp) WHERE livemode = 0;

CREATE TRIGGER audit_events_are_never_updated BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
CREATE TRIGGER live_audit_events_are_never_deleted BEFORE DELETE ON audit_events WHEN OLD.livemode = 1
BEGIN SELECT RAISE(ABORT, 'live audit events are append-only'); END;

-- Idempotency-Key values seen on POST /v1/pause within the last 24 hours.
-- The same key with the same body replays the original pause; with another
-- body it is refused. Rows older than 24 hours are replaced on reuse.
CREATE TABLE idempotency_keys (
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    livemode      INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,                      -- SHA-256 of the canonical JSON body
    pause_id      TEXT NOT NULL REFERENCES pauses(id),
    created_at    TEXT NOT NULL,
    PRIMARY KEY (developer_id, livemode, key)
);
-- Pruning: keys past their 24 hours.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys(created_at);

-- Webhook endpoints a developer registered, each in the mode (test or live) of
-- the key that registered it, receiving only that mode's events.
CREATE TABLE webhooks (
    seq                         INTEGER PRIMARY KEY AUTOINCREMENT,  -- list order
    id                          TEXT NOT NULL UNIQUE,             -- 'wh_' + 32 hex
    developer_id                TEXT NOT NULL REFERENCES developers(id),
    livemode                    INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    url                         TEXT NOT NULL,
    events                      TEXT NOT NULL,                    -- JSON array of event types
    secret                      TEXT NOT NULL,                    -- HMAC key; kept because every call is signed with it
    previous_secret             TEXT,                             -- the secret before a rotation, still signed with…
    previous_secret_expires_at  TEXT,                             -- …until this time (24 h after the rotation)
    status                      TEXT NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    disabled_reason             TEXT,
    failing_since               TEXT,                             -- first failure since the last success; 3 days of it disables
    created_at                  TEXT NOT NULL,
    updated_at                  TEXT NOT NULL,
    deleted_at                  TEXT                              -- deleted endpoints keep their row for the delivery history
);
-- Fan-out on every event: a developer's live endpoints in one mode.
CREATE INDEX webhooks_by_owner ON webhooks(developer_id, livemode, seq) WHERE deleted_at IS NULL;

-- Events for webhooks: the exact JSON body, so every retry sends the same bytes.
-- Written in the same transaction as the state change it reports (the outbox).
-- Every event about a pause is recorded here, with or without an endpoint to send it to:
-- GET /v1/events reads them too.
CREATE TABLE webhook_events (
    id            TEXT PRIMARY KEY,                  -- 'evt_' + 32 hex; X-PausePoint-Event-Id
    developer_id  TEXT NOT NULL REFERENCES developers(id),
    livemode      INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    type          TEXT NOT NULL,                     -- 'pause.responded', …
    pause_id      TEXT,
    body          TEXT NOT NULL,                     -- the JSON sent
    created_at    TEXT NOT NULL
);
-- Pruning: events past retention.delivery_log_days, oldest first.
CREATE INDEX webhook_events_by_age ON webhook_events(created_at);
-- GET /v1/events: a developer's events in one mode after a given one, in rowid order, which is commit
-- order (one writer at a time, and no feed's newest row is ever pruned, so no rowid is used twice).
CREATE INDEX webhook_events_feed ON webhook_events(developer_id, livemode);

-- The newest event pruned from each developer's feed in each mode. The feed starts after it:
-- an event kept from before it (for a delivery still pending, as to a disabled endpoint) is no
-- longer in the feed, and a reader whose cursor is older gets 404, since events after it went.
-- (So rowids are part of the data: copy the file, or use the backup command; a text dump
-- renumbers them unless made with --preserve-rowids.)
CREATE TABLE event_feed_pruned (
    developer_id   TEXT NOT NULL REFERENCES developers(id),
    livemode       INTEGER NOT NULL CHECK (livemode IN (0, 1)),
    through_rowid  INTEGER NOT NULL,                  -- webhook_events.rowid of the newest one pruned
    PRIMARY KEY (developer_id, livemode)
) WITHOUT ROWID;

-- One event to one endpoint, retried until it succeeds or the schedule ends.
CREATE TABLE webhook_deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT, -- list order and cursor
    id               TEXT NOT NULL UNIQUE,            -- 'whd_' + 32 hex
    webhook_id       TEXT NOT NULL REFERENCES webhooks(id),
    event_id         TEXT NOT NULL REFERENCES webhook_events(id),
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivering', 'succeeded', 'failed', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,                            -- when 'pending': due time (NULL while the endpoint is
                                                      -- disabled); when 'delivering': claim expiry
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
-- The delivery job: each endpoint with deliveries pending (a skip-scan over webhook_id), then its due
-- rows and 'delivering' claims a crash abandoned, so one endpoint's backlog hides no other endpoint.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(webhook_id, next_attempt_at)
    WHERE status IN ('pending', 'delivering');
-- GET /v1/webhooks/{id}/deliveries, newest first.
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries(webhook_id, seq);
-- Pruning: an event's deliveries.
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries(event_id);

-- Every attempt at a delivery, for GET /v1/webhooks/{id}/deliveries.
CREATE TABLE webhook_attempts (
    delivery_id      TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempt          INTEGER NOT NULL,                -- 1, 2, …
    started_at       TEXT NOT NULL,
    status_code      INTEGER,                         -- the receiver's HTTP status, if it answered
    error            TEXT,                            -- why it failed, if it did
    duration_ms      INTEGER NOT NULL,
    next_attempt_at  TEXT,                            -- when the next try is due, if there is one
    PRIMARY KEY (delivery_id, attempt)
);
