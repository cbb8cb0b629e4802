"""The PostgreSQL store's tables, created by ordered, named migrations.

Schema (``<prefix>`` is ``chatchain`` unless ``table_prefix`` says otherwise)::

    <prefix>_sessions(session_id text PK, created_at, updated_at timestamptz,
                      message_count bigint, summary text, summary_covers int)
    <prefix>_messages(session_id text -> sessions ON DELETE CASCADE, seq bigint,
                      message text, PK (session_id, seq))
    <prefix>_migrations(name text PK, applied_at timestamptz)
    <prefix>_usage(id text PK, seq bigint identity, at timestamptz, session_id, user_id,
                   model text, prompt/completion/total/cached/reasoning_tokens, requests bigint,
                   cost_usd double NULL, price_source text, latency_s double,
                   first_token_s double NULL, summary, estimated, cached boolean,
                   saved_usd double NULL)
    <prefix>_usage_totals(scope text, key text, PK (scope, key), prompt/completion/total/
                          cached/reasoning_tokens, requests bigint, cost_usd double (the
                          priced entries' sum), unpriced bigint, latency_s double,
                          turns, summaries, estimated, cached_turns bigint,
                          saved_usd double)
    <prefix>_budget_holds(id text PK, session_id, user_id text, tokens bigint,
                          cost_usd double, expires_at timestamptz)
    <prefix>_usage_days(scope, key text, day date, PK (scope, key, day), total_tokens bigint,
                        cost_usd double (the priced entries' sum))
    <prefix>_users(name text PK, token_hash text UNIQUE, created_at timestamptz,
                   budget_usd, daily_usd, monthly_usd double NULL, revoked boolean,
                   requests_per_minute, streams int NULL)
    <prefix>_pending_turns(session_id text PK, token text, record text)
    <prefix>_session_titles(session_id text PK, title text)
    <prefix>_throttle(user_name text PK, hits double[] (the times of the requests in the
                      window, Unix seconds), streams jsonb (stream slot -> lease expiry))

The tables are created by ordered, named migrations, each recorded in ``<prefix>_migrations``,
under an advisory lock so that processes opening the store at once apply each migration once.
"""

from __future__ import annotations

__all__ = ["_MIGRATIONS"]


# Ordered and named; a migration, once released, never changes: add the next one instead.
_MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "0001_sessions_and_messages",
        [
            """CREATE TABLE IF NOT EXISTS {sessions} (
                session_id text PRIMARY KEY,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                message_count bigint NOT NULL DEFAULT 0,
                summary text,
                summary_covers integer
            )""",
            "CREATE INDEX IF NOT EXISTS {sessions_created} ON {sessions} (created_at)",
            "CREATE INDEX IF NOT EXISTS {sessions_updated} ON {sessions} (updated_at)",
            """CREATE TABLE IF NOT EXISTS {messages} (
                session_id text NOT NULL REFERENCES {sessions} ON DELETE CASCADE,
                seq bigint NOT NULL,
                message text NOT NULL,
                PRIMARY KEY (session_id, seq)
            )""",
        ],
    ),
    (
        "0002_usage_ledger",
        [
            """CREATE TABLE IF NOT EXISTS {usage} (
                id text PRIMARY KEY,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                at timestamptz NOT NULL,
                session_id text NOT NULL,
                user_id text,
                model text,
                prompt_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                total_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                reasoning_tokens bigint NOT NULL,
                requests bigint NOT NULL,
                cost_usd double precision,
                price_source text,
                latency_s double precision NOT NULL,
                first_token_s double precision,
                summary boolean NOT NULL,
                estimated boolean NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS {usage_session_at} ON {usage} (session_id, at, seq)",
            "CREATE INDEX IF NOT EXISTS {usage_user_at} ON {usage} (user_id, at, seq)",
            "CREATE INDEX IF NOT EXISTS {usage_at} ON {usage} (at, seq)",
            """CREATE TABLE IF NOT EXISTS {usage_totals} (
                scope text NOT NULL,
                key text NOT NULL,
                prompt_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                total_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                reasoning_tokens bigint NOT NULL,
                requests bigint NOT NULL,
                cost_usd double precision NOT NULL,
                unpriced bigint NOT NULL,
                latency_s double precision NOT NULL,
                turns bigint NOT NULL,
                summaries bigint NOT NULL,
                PRIMARY KEY (scope, key)
            )""",
            """CREATE TABLE IF NOT EXISTS {budget_holds} (
                id text PRIMARY KEY,
                session_id text NOT NULL,
                user_id text,
                tokens bigint NOT NULL,
                cost_usd double precision NOT NULL,
                expires_at timestamptz NOT NULL
            )""",
        ],
    ),
    (
        "0003_estimated_totals",
        [
            """ALTER TABLE {usage_totals}
                ADD COLUMN IF NOT EXISTS estimated bigint NOT NULL DEFAULT 0""",
            """UPDATE {usage_totals} AS t SET estimated = (
                SELECT count(*) FROM {usage} AS u WHERE u.estimated AND (
                    t.scope = 'all'
                    OR (t.scope = 'session' AND u.session_id = t.key)
                    OR (t.scope = 'user' AND u.user_id = t.key)
                )
            )""",
        ],
    ),
    (
        # Turns answered from the response cache (CHATCHAIN_CACHE), and what they would have
        # cost. No entry before this step was a cache hit: all 0.
        "0004_cached_turns",
        [
            """ALTER TABLE {usage}
                ADD COLUMN IF NOT EXISTS cached boolean NOT NULL DEFAULT false,
                ADD COLUMN IF NOT EXISTS saved_usd double precision""",
            """ALTER TABLE {usage_totals}
                ADD COLUMN IF NOT EXISTS cached_turns bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS saved_usd double precision NOT NULL DEFAULT 0""",
        ],
    ),
    (
        "0005_users",
        [
            """CREATE TABLE IF NOT EXISTS {users} (
                name text PRIMARY KEY,
                token_hash text NOT NULL UNIQUE,
                created_at timestamptz NOT NULL,
                budget_usd double precision,
                daily_usd double precision,
                monthly_usd double precision,
                revoked boolean NOT NULL DEFAULT false
            )""",
        ],
    ),
    (
        "0006_usage_days",
        [
            """CREATE TABLE IF NOT EXISTS {usage_days} (
                scope text NOT NULL,
                key text NOT NULL,
                day date NOT NULL,
                total_tokens bigint NOT NULL,
                cost_usd double precision NOT NULL,
                PRIMARY KEY (scope, key, day)
            )""",
            """INSERT INTO {usage_days} (scope, key, day, total_tokens, cost_usd)
            SELECT 'all', '', (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} GROUP BY 3
            UNION ALL
            SELECT 'session', session_id, (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} GROUP BY 2, 3
            UNION ALL
            SELECT 'user', user_id, (at AT TIME ZONE 'UTC')::date, sum(total_tokens),
                coalesce(sum(cost_usd), 0)
            FROM {usage} WHERE user_id IS NOT NULL GROUP BY 2, 3""",
        ],
    ),
    (
        # `session_infos` reads an id range in code point order ("C"), whatever the
        # database's collation (under most others "al:x" sorts between "al" and "alice").
        "0007_sessions_by_id",
        ['CREATE INDEX IF NOT EXISTS {sessions_id} ON {sessions} (session_id COLLATE "C")'],
    ),
    (
        # The write-ahead record of each session's turn in flight (`chatchain._pending`).
        "0008_pending_turns",
        [
            """CREATE TABLE IF NOT EXISTS {pending_turns} (
                session_id text PRIMARY KEY,
                token text NOT NULL,
                record text NOT NULL
            )"""
        ],
    ),
    (
        # The titles people give their sessions, apart from {sessions}: renaming never
        # touches a session's row or the turns' commit path.
        "0009_session_titles",
        [
            """CREATE TABLE IF NOT EXISTS {session_titles} (
                session_id text PRIMARY KEY,
                title text NOT NULL
            )"""
        ],
    ),
    (
        # The chat service's limits counted for every process on the database
        # (`ThrottleBackend`): one row per user, changed by one atomic upsert per check. A
        # user's own limits live with the user (NULL: the deployment's).
        "0010_throttle",
        [
            "ALTER TABLE {users} ADD COLUMN IF NOT EXISTS requests_per_minute integer",
            "ALTER TABLE {users} ADD COLUMN IF NOT EXISTS streams integer",
            """CREATE TABLE IF NOT EXISTS {throttle} (
                user_name text PRIMARY KEY,
                hits double precision[] NOT NULL DEFAULT '{{}}',
                streams jsonb NOT NULL DEFAULT '{{}}'
            )""",
        ],
    ),
]
