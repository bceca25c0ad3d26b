-- The ledger of record: one row per ledger event (a charge, a refund, a cache hit).
-- Credits are integer millicredits, as in the store. `event` keeps the event exactly as the
-- gateway recorded it (tags included) for reports on fields that have no column.
CREATE TABLE ledger_events (
    id          text        PRIMARY KEY,   -- the event's unique id; "<team>/<entry id>" without one
    team        text        NOT NULL,
    event_time  timestamptz NOT NULL,      -- the store's clock when it appended the entry
    seq         bigint      NOT NULL,      -- with event_time, the store's entry id "<ms>-<seq>"
    key_id      text,
    model       text,
    route       text,
    kind        text        NOT NULL,      -- charge | refund
    cached      boolean     NOT NULL,
    credits     bigint      NOT NULL,      -- millicredits charged
    reserved    bigint,                    -- millicredits held before the answer
    saved       bigint      NOT NULL,      -- millicredits a cache hit saved
    request_id  text,
    period      text,                      -- the budget period the charge counts in
    event       jsonb       NOT NULL
);

-- One team's entries in order: the admin endpoint's pages and per-team reports.
CREATE INDEX ledger_events_team_time ON ledger_events (team, event_time, seq);

-- Every team over a time range (a month's report): rows arrive in time order, so a block range
-- holds a narrow slice of time and this index stays a few hundred kilobytes at 10^8 rows.
CREATE INDEX ledger_events_time_brin ON ledger_events USING brin (event_time)
    WITH (pages_per_range = 32, autosummarize = on);

-- Where each team's stream has been copied up to (the store's entry id, '-' = nothing yet).
CREATE TABLE ledger_cursors (
    team        text        PRIMARY KEY,
    after_id    text        NOT NULL DEFAULT '-',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
