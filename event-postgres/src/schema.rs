//! The schema: versioned migrations, run at open under an advisory lock, inside the
//! store's own PostgreSQL schema.

use eventfold_core::{Result, StoreErrorKind};
use tokio_postgres::Client;

use crate::error::{open_failed, open_refused};

/// The schema migrations, in order: migration `i` takes the store's schema from version
/// `i` to `i + 1`. `__SCHEMA__` stands for the store's schema name (checked to be a plain
/// identifier). A migration is only ever appended, never edited once released.
const MIGRATIONS: &[&str] = &[
    // Version 1. Times are nanoseconds since the Unix epoch (a `DateTime<Utc>` round-trips
    // exactly; `timestamptz` keeps microseconds). Payloads and metadata are `text`: they
    // come back byte for byte as appended (`jsonb` would reorder keys and drop spaces);
    // cast them (`payload::jsonb`) to query them. `u64`s the store never compares
    // (checkpoint positions, durations) are kept bit for bit in a `bigint`.
    r#"
    CREATE TABLE __SCHEMA__.ef_head (
        id       boolean PRIMARY KEY DEFAULT true CHECK (id),
        position bigint  NOT NULL DEFAULT 0
    );
    INSERT INTO __SCHEMA__.ef_head DEFAULT VALUES;
    CREATE TABLE __SCHEMA__.ef_events (
        position       bigint PRIMARY KEY,
        stream_type    text   NOT NULL,
        stream_id      text   NOT NULL,
        version        bigint NOT NULL,
        event_id       uuid   NOT NULL UNIQUE,
        event_type     text   NOT NULL,
        schema_version bigint NOT NULL,
        occurred_at    bigint NOT NULL,
        recorded_at    bigint NOT NULL,
        metadata       text,
        payload        text   NOT NULL,
        UNIQUE (stream_type, stream_id, version)
    );
    CREATE TABLE __SCHEMA__.ef_snapshots (
        stream_type    text   NOT NULL,
        stream_id      text   NOT NULL,
        version        bigint NOT NULL,
        schema_version bigint NOT NULL,
        state          text   NOT NULL,
        taken_at       bigint NOT NULL,
        PRIMARY KEY (stream_type, stream_id)
    );
    CREATE TABLE __SCHEMA__.ef_checkpoints (
        subscription text   PRIMARY KEY,
        position     bigint NOT NULL,
        updated_at   bigint NOT NULL
    );
    CREATE TABLE __SCHEMA__.ef_dead_letters (
        id              bigserial PRIMARY KEY,
        subscription    text   NOT NULL,
        event_id        uuid   NOT NULL,
        position        bigint NOT NULL,
        event_type      text   NOT NULL,
        error           text   NOT NULL,
        attempts        bigint NOT NULL,
        first_failed_at bigint NOT NULL,
        last_failed_at  bigint NOT NULL,
        UNIQUE (subscription, event_id, position)
    );
    CREATE INDEX ef_dead_letters_by_subscription ON __SCHEMA__.ef_dead_letters (subscription, id);
    CREATE TABLE __SCHEMA__.ef_failures (
        id              bigserial PRIMARY KEY,
        subscription    text   NOT NULL,
        event_id        uuid   NOT NULL,
        position        bigint NOT NULL,
        attempt         bigint NOT NULL,
        error           text   NOT NULL,
        duration_micros bigint NOT NULL,
        failed_at       bigint NOT NULL
    );
    CREATE INDEX ef_failures_by_subscription ON __SCHEMA__.ef_failures (subscription, id);

    -- One group commit of the writer, as one autocommit call. The head row is locked
    -- first and held to the commit, so positions are dense and in commit order; every
    -- statement after the lock sees every earlier append (READ COMMITTED takes a snapshot
    -- per statement), so the version checks need no retries.
    --
    -- Streams are given once (s_*), requests refer to them (r_stream, 1-based) and come in
    -- units (r_unit): the requests of one unit are stored all or none. Events (e_*) name
    -- their request (e_req) and offset in it (e_off, from 0). r_expected: -1 any version,
    -- -2 never matches, otherwise the version the stream must be at (0: no stream).
    -- Returns one row per stored request (status 0, its last version, its first position),
    -- one row per refused unit (its first refused request; status 1: version conflict,
    -- out_version the stream's version; status 2: an event id is stored already, judged
    -- by the caller), and a last row (request 0) with the head.
    CREATE FUNCTION __SCHEMA__.ef_append(
        s_type text[], s_id text[],
        r_stream int[], r_expected bigint[], r_unit int[], r_count int[],
        e_req int[], e_off int[], e_id uuid[], e_type text[], e_schema bigint[],
        e_occurred bigint[], e_metadata text[], e_payload text[],
        recorded bigint, channel text)
    RETURNS TABLE (out_request int, out_status smallint, out_version bigint, out_position bigint)
    LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE
        n int := coalesce(array_length(r_stream, 1), 0);
        head bigint;
        start_head bigint;
        cur bigint[];
        tent bigint[];
        taken int[];
        r_pos bigint[] := array_fill(NULL::bigint, ARRAY[n]);
        r_ver bigint[] := array_fill(NULL::bigint, ARRAY[n]);
        i int := 1;
        j int;
        u_end int;
        failed int;
        fail_status smallint;
        fail_version bigint;
        pos bigint;
        v bigint;
    BEGIN
        SELECT h.position INTO head FROM __SCHEMA__.ef_head h FOR UPDATE;
        start_head := head;
        SELECT array_agg(coalesce((SELECT max(e.version) FROM __SCHEMA__.ef_events e
                                   WHERE e.stream_type = t.st AND e.stream_id = t.si), 0)
                         ORDER BY t.ord)
          INTO cur FROM unnest(s_type, s_id) WITH ORDINALITY AS t(st, si, ord);
        -- One index probe per id, whatever the table's statistics said when this session
        -- planned the statement: a plan made while the table was small (a hash join over a
        -- sequential scan) would otherwise read the whole table on every call as it grows.
        SELECT coalesce(array_agg(DISTINCT t.req), '{}') INTO taken
          FROM unnest(e_id, e_req) AS t(id, req)
         CROSS JOIN LATERAL (SELECT 1 FROM __SCHEMA__.ef_events e
                              WHERE e.event_id = t.id LIMIT 1) AS stored;
        WHILE i <= n LOOP
            u_end := i;
            WHILE u_end < n AND r_unit[u_end + 1] = r_unit[i] LOOP
                u_end := u_end + 1;
            END LOOP;
            tent := cur;
            failed := NULL;
            pos := head;
            FOR j IN i .. u_end LOOP
                v := tent[r_stream[j]];
                IF j = ANY (taken) THEN
                    failed := j; fail_status := 2; fail_version := v;
                    EXIT;
                END IF;
                IF r_expected[j] <> -1 AND r_expected[j] <> v THEN
                    failed := j; fail_status := 1; fail_version := v;
                    EXIT;
                END IF;
                r_pos[j] := pos + 1;
                r_ver[j] := v + 1;
                pos := pos + r_count[j];
                tent[r_stream[j]] := v + r_count[j];
            END LOOP;
            IF failed IS NULL THEN
                cur := tent;
                head := pos;
                FOR j IN i .. u_end LOOP
                    out_request := j; out_status := 0;
                    out_version := r_ver[j] + r_count[j] - 1; out_position := r_pos[j];
                    RETURN NEXT;
                END LOOP;
            ELSE
                FOR j IN i .. u_end LOOP
                    r_pos[j] := NULL;
                END LOOP;
                out_request := failed; out_status := fail_status;
                out_version := fail_version; out_position := NULL;
                RETURN NEXT;
            END IF;
            i := u_end + 1;
        END LOOP;
        IF head > start_head THEN
            INSERT INTO __SCHEMA__.ef_events (position, stream_type, stream_id, version,
                event_id, event_type, schema_version, occurred_at, recorded_at, metadata,
                payload)
            SELECT r.pos + t.off, s.ty, s.id, r.ver + t.off, t.id, t.typ, t.sv, t.occ,
                   recorded, t.meta, t.pay
              FROM unnest(r_pos, r_ver, r_stream) WITH ORDINALITY AS r(pos, ver, st, idx)
              JOIN unnest(s_type, s_id) WITH ORDINALITY AS s(ty, id, idx) ON s.idx = r.st
              JOIN unnest(e_req, e_off, e_id, e_type, e_schema, e_occurred, e_metadata,
                          e_payload) AS t(req, off, id, typ, sv, occ, meta, pay)
                ON t.req = r.idx
             WHERE r.pos IS NOT NULL;
            UPDATE __SCHEMA__.ef_head SET position = head;
            IF channel IS NOT NULL THEN
                PERFORM pg_notify(channel, head::text);
            END IF;
        END IF;
        out_request := 0; out_status := 0; out_version := head; out_position := NULL;
        RETURN NEXT;
    END
    $fn$;
    "#,
    // Version 2: segment leases (eventfold::lease). Per subscription its stored segment
    // count (0: none, never claimed or reset since) and the epoch new segment rows start
    // from; per segment its lease (owner NULL: free); per member its membership's expiry.
    // Lease times are microseconds since the Unix epoch on the server's clock
    // (clock_timestamp()), so the machines sharing a store need not agree on the time.
    r#"
    CREATE TABLE __SCHEMA__.ef_lease_subscriptions (
        subscription text    PRIMARY KEY,
        segments     integer NOT NULL,
        epoch_floor  bigint  NOT NULL
    );
    CREATE TABLE __SCHEMA__.ef_segment_leases (
        subscription text    NOT NULL,
        segment      integer NOT NULL,
        segments     integer NOT NULL,
        owner        text,
        epoch        bigint  NOT NULL,
        expires_at   bigint,
        PRIMARY KEY (subscription, segment)
    );
    CREATE TABLE __SCHEMA__.ef_subscription_members (
        subscription text   NOT NULL,
        member       text   NOT NULL,
        expires_at   bigint NOT NULL,
        PRIMARY KEY (subscription, member)
    );
    "#,
    // Version 3: `ef_append` with a fast path (see its comment), measured in pg_perf.
    r#"
    DROP FUNCTION __SCHEMA__.ef_append(text[], text[], int[], bigint[], int[], int[], int[],
        int[], uuid[], text[], bigint[], bigint[], text[], text[], bigint, text);
    -- One group commit of the writer, as one autocommit call; the same contract as
    -- version 1's, planned for speed. The common group (every expected version holds)
    -- takes two statements: the head row's update, which locks it to the commit and
    -- numbers the group, then one statement that reads the streams' versions (a snapshot
    -- taken after the lock, so it sees every earlier append), checks them, and inserts.
    -- Only a group with a refused append takes the per-unit loop of version 1.
    --
    -- The fast path leaves event ids to the unique index: a stored id makes its insert
    -- fail (the call is rolled back whole), and the writer calls again with check_ids,
    -- which skips the fast path. The loop looks the ids up first, so a repeated append is
    -- refused as such (status 2, judged by the writer) before its stale expected version.
    CREATE FUNCTION __SCHEMA__.ef_append(
        s_type text[], s_id text[],
        r_stream int[], r_expected bigint[], r_unit int[], r_count int[],
        e_req int[], e_off int[], e_id uuid[], e_type text[], e_schema bigint[],
        e_occurred bigint[], e_metadata text[], e_payload text[],
        recorded bigint, channel text, check_ids boolean)
    RETURNS TABLE (out_request int, out_status smallint, out_version bigint, out_position bigint)
    LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE
        n int := coalesce(array_length(r_stream, 1), 0);
        head bigint;
        total bigint;
        start_head bigint;
        stored boolean;
        cur bigint[];
        tent bigint[];
        taken int[];
        r_pos bigint[];
        r_ver bigint[];
        i int := 1;
        j int;
        u_end int;
        failed int;
        fail_status smallint;
        fail_version bigint;
        pos bigint;
        v bigint;
    BEGIN
        IF n = 0 THEN
            SELECT h.position INTO head FROM __SCHEMA__.ef_head h;
            out_request := 0; out_status := 0; out_version := head; out_position := NULL;
            RETURN NEXT;
            RETURN;
        END IF;
        UPDATE __SCHEMA__.ef_head h SET position = h.position + t.total
          FROM (SELECT sum(c) AS total FROM unnest(r_count) AS c) AS t
        RETURNING h.position, t.total INTO head, total;
        start_head := head - total;
        IF NOT check_ids THEN
            WITH s AS (
                SELECT t.ord, coalesce((SELECT max(e.version) FROM __SCHEMA__.ef_events e
                                        WHERE e.stream_type = t.st AND e.stream_id = t.si),
                                       0) AS v
                  FROM unnest(s_type, s_id) WITH ORDINALITY AS t(st, si, ord)),
            r AS (
                SELECT r.idx, r.st, r.cnt, r.exp,
                       start_head + sum(r.cnt) OVER (ORDER BY r.idx) - r.cnt + 1 AS pos,
                       s.v + sum(r.cnt) OVER (PARTITION BY r.st ORDER BY r.idx) - r.cnt AS ver
                  FROM unnest(r_stream, r_expected, r_count) WITH ORDINALITY
                       AS r(st, exp, cnt, idx)
                  JOIN s ON s.ord = r.st),
            ok AS (SELECT bool_and(r.exp = -1 OR r.exp = r.ver) AS ok FROM r),
            ins AS (
                INSERT INTO __SCHEMA__.ef_events (position, stream_type, stream_id, version,
                    event_id, event_type, schema_version, occurred_at, recorded_at, metadata,
                    payload)
                SELECT r.pos + t.off, s_type[r.st], s_id[r.st], r.ver + 1 + t.off, t.id,
                       t.typ, t.sv, t.occ, recorded, t.meta, t.pay
                  FROM r
                  JOIN unnest(e_req, e_off, e_id, e_type, e_schema, e_occurred, e_metadata,
                              e_payload) AS t(req, off, id, typ, sv, occ, meta, pay)
                    ON t.req = r.idx
                 WHERE (SELECT ok.ok FROM ok))
            SELECT (SELECT ok.ok FROM ok),
                   array_agg(r.pos ORDER BY r.idx), array_agg(r.ver ORDER BY r.idx)
              INTO stored, r_pos, r_ver FROM r;
            IF stored THEN
                IF channel IS NOT NULL THEN
                    PERFORM pg_notify(channel, head::text);
                END IF;
                FOR j IN 1 .. n LOOP
                    out_request := j; out_status := 0;
                    out_version := r_ver[j] + r_count[j]; out_position := r_pos[j];
                    RETURN NEXT;
                END LOOP;
                out_request := 0; out_status := 0; out_version := head; out_position := NULL;
                RETURN NEXT;
                RETURN;
            END IF;
        END IF;
        -- Some append is refused (or ids are to be checked): judge unit by unit, as the
        -- lock is held, against the versions the earlier units leave.
        head := start_head;
        r_pos := array_fill(NULL::bigint, ARRAY[n]);
        r_ver := array_fill(NULL::bigint, ARRAY[n]);
        SELECT array_agg(coalesce((SELECT max(e.version) FROM __SCHEMA__.ef_events e
                                   WHERE e.stream_type = t.st AND e.stream_id = t.si), 0)
                         ORDER BY t.ord)
          INTO cur FROM unnest(s_type, s_id) WITH ORDINALITY AS t(st, si, ord);
        -- A repeated append is judged by its ids before its (by then stale) expected
        -- version. One index probe per id, whatever the statistics said when this session
        -- planned the statement.
        SELECT coalesce(array_agg(DISTINCT t.req), '{}') INTO taken
          FROM unnest(e_id, e_req) AS t(id, req)
         CROSS JOIN LATERAL (SELECT 1 FROM __SCHEMA__.ef_events e
                              WHERE e.event_id = t.id LIMIT 1) AS found;
        WHILE i <= n LOOP
            u_end := i;
            WHILE u_end < n AND r_unit[u_end + 1] = r_unit[i] LOOP
                u_end := u_end + 1;
            END LOOP;
            tent := cur;
            failed := NULL;
            pos := head;
            FOR j IN i .. u_end LOOP
                v := tent[r_stream[j]];
                IF j = ANY (taken) THEN
                    failed := j; fail_status := 2; fail_version := v;
                    EXIT;
                END IF;
                IF r_expected[j] <> -1 AND r_expected[j] <> v THEN
                    failed := j; fail_status := 1; fail_version := v;
                    EXIT;
                END IF;
                r_pos[j] := pos + 1;
                r_ver[j] := v + 1;
                pos := pos + r_count[j];
                tent[r_stream[j]] := v + r_count[j];
            END LOOP;
            IF failed IS NULL THEN
                cur := tent;
                head := pos;
                FOR j IN i .. u_end LOOP
                    out_request := j; out_status := 0;
                    out_version := r_ver[j] + r_count[j] - 1; out_position := r_pos[j];
                    RETURN NEXT;
                END LOOP;
            ELSE
                FOR j IN i .. u_end LOOP
                    r_pos[j] := NULL;
                END LOOP;
                out_request := failed; out_status := fail_status;
                out_version := fail_version; out_position := NULL;
                RETURN NEXT;
            END IF;
            i := u_end + 1;
        END LOOP;
        UPDATE __SCHEMA__.ef_head SET position = head;
        IF head > start_head THEN
            INSERT INTO __SCHEMA__.ef_events (position, stream_type, stream_id, version,
                event_id, event_type, schema_version, occurred_at, recorded_at, metadata,
                payload)
            SELECT r.pos + t.off, s_type[r.st], s_id[r.st], r.ver + t.off, t.id, t.typ, t.sv,
                   t.occ, recorded, t.meta, t.pay
              FROM unnest(r_pos, r_ver, r_stream) WITH ORDINALITY AS r(pos, ver, st, idx)
              JOIN unnest(e_req, e_off, e_id, e_type, e_schema, e_occurred, e_metadata,
                          e_payload) AS t(req, off, id, typ, sv, occ, meta, pay)
                ON t.req = r.idx
             WHERE r.pos IS NOT NULL;
            IF channel IS NOT NULL THEN
                PERFORM pg_notify(channel, head::text);
            END IF;
        END IF;
        out_request := 0; out_status := 0; out_version := head; out_position := NULL;
        RETURN NEXT;
    END
    $fn$;
    "#,
    // Version 4: `ef_append`'s statements keep the plan made at their first run in a
    // session. Left to `auto`, the server planned the fast path's statement afresh on
    // many calls (14% of the backend's time for a 100-event append, by perf); the plans
    // do not depend on the table's size (an index probe per stream, joins of the call's
    // own arrays), so one made on an empty table serves a large one.
    r#"
    ALTER FUNCTION __SCHEMA__.ef_append(text[], text[], int[], bigint[], int[], int[], int[],
        int[], uuid[], text[], bigint[], bigint[], text[], text[], bigint, text, boolean)
        SET plan_cache_mode = force_generic_plan;
    "#,
    // Version 5: replay requests (`SubscriptionStore::request_replay`), which a running
    // bus carries out. `dead_letter` NULL: every dead letter of the subscription. Pending
    // while `finished_at` is NULL; then `reason` NULL: done, with the three counts; else
    // failed. Times are nanoseconds since the Unix epoch.
    r#"
    CREATE TABLE __SCHEMA__.ef_replay_requests (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        subscription text   NOT NULL,
        dead_letter  bigint,
        requested_at bigint NOT NULL,
        finished_at  bigint,
        replayed     bigint,
        failed       bigint,
        held_back    bigint,
        reason       text
    );
    CREATE INDEX ef_replay_requests_pending ON __SCHEMA__.ef_replay_requests (subscription, id)
        WHERE finished_at IS NULL;
    "#,
    // Version 6: the archive horizon (eventfold::archive). One row per pruned archive, and
    // per stream the run of versions it lost into it; both are empty until a prune. Event
    // ids are `uuid`s, which PostgreSQL orders byte-wise as `Uuid` does, so an archive's
    // span of ids is a range. `ef_append` numbers a stream whose events were all pruned on
    // from its last pruned version (the horizon is read only for a stream with no stored
    // event: `coalesce` stops at its first non-null argument); otherwise unchanged.
    r#"
    CREATE TABLE __SCHEMA__.ef_archives (
        archive        uuid   PRIMARY KEY,
        path           text   NOT NULL,
        events         bigint NOT NULL,
        checksum       bigint NOT NULL,
        first_position bigint NOT NULL,
        last_position  bigint NOT NULL,
        first_event_id uuid   NOT NULL,
        last_event_id  uuid   NOT NULL,
        pruned_at      bigint NOT NULL
    );
    CREATE INDEX ef_archives_by_position ON __SCHEMA__.ef_archives (last_position, first_position);
    CREATE TABLE __SCHEMA__.ef_archived_streams (
        stream_type   text   NOT NULL,
        stream_id     text   NOT NULL,
        last_version  bigint NOT NULL,
        first_version bigint NOT NULL,
        archive       uuid   NOT NULL REFERENCES __SCHEMA__.ef_archives ON DELETE CASCADE,
        PRIMARY KEY (stream_type, stream_id, last_version)
    );
    CREATE INDEX ef_archived_streams_by_archive ON __SCHEMA__.ef_archived_streams (archive);
    CREATE OR REPLACE FUNCTION __SCHEMA__.ef_append(
        s_type text[], s_id text[],
        r_stream int[], r_expected bigint[], r_unit int[], r_count int[],
        e_req int[], e_off int[], e_id uuid[], e_type text[], e_schema bigint[],
        e_occurred bigint[], e_metadata text[], e_payload text[],
        recorded bigint, channel text, check_ids boolean)
    RETURNS TABLE (out_request int, out_status smallint, out_version bigint, out_position bigint)
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
    #variable_conflict use_column
    DECLARE
        n int := coalesce(array_length(r_stream, 1), 0);
        head bigint;
        total bigint;
        start_head bigint;
        stored boolean;
        cur bigint[];
        tent bigint[];
        taken int[];
        r_pos bigint[];
        r_ver bigint[];
        i int := 1;
        j int;
        u_end int;
        failed int;
        fail_status smallint;
        fail_version bigint;
        pos bigint;
        v bigint;
    BEGIN
        IF n = 0 THEN
            SELECT h.position INTO head FROM __SCHEMA__.ef_head h;
            out_request := 0; out_status := 0; out_version := head; out_position := NULL;
            RETURN NEXT;
            RETURN;
        END IF;
        UPDATE __SCHEMA__.ef_head h SET position = h.position + t.total
          FROM (SELECT sum(c) AS total FROM unnest(r_count) AS c) AS t
        RETURNING h.position, t.total INTO head, total;
        start_head := head - total;
        IF NOT check_ids THEN
            WITH s AS (
                SELECT t.ord, coalesce((SELECT max(e.version) FROM __SCHEMA__.ef_events e
                                        WHERE e.stream_type = t.st AND e.stream_id = t.si),
                                       (SELECT max(a.last_version)
                                          FROM __SCHEMA__.ef_archived_streams a
                                         WHERE a.stream_type = t.st AND a.stream_id = t.si),
                                       0) AS v
                  FROM unnest(s_type, s_id) WITH ORDINALITY AS t(st, si, ord)),
            r AS (
                SELECT r.idx, r.st, r.cnt, r.exp,
                       start_head + sum(r.cnt) OVER (ORDER BY r.idx) - r.cnt + 1 AS pos,
                       s.v + sum(r.cnt) OVER (PARTITION BY r.st ORDER BY r.idx) - r.cnt AS ver
                  FROM unnest(r_stream, r_expected, r_count) WITH ORDINALITY
                       AS r(st, exp, cnt, idx)
                  JOIN s ON s.ord = r.st),
            ok AS (SELECT bool_and(r.exp = -1 OR r.exp = r.ver) AS ok FROM r),
            ins AS (
                INSERT INTO __SCHEMA__.ef_events (position, stream_type, stream_id, version,
                    event_id, event_type, schema_version, occurred_at, recorded_at, metadata,
                    payload)
                SELECT r.pos + t.off, s_type[r.st], s_id[r.st], r.ver + 1 + t.off, t.id,
                       t.typ, t.sv, t.occ, recorded, t.meta, t.pay
                  FROM r
                  JOIN unnest(e_req, e_off, e_id, e_type, e_schema, e_occurred, e_metadata,
                              e_payload) AS t(req, off, id, typ, sv, occ, meta, pay)
                    ON t.req = r.idx
                 WHERE (SELECT ok.ok FROM ok))
            SELECT (SELECT ok.ok FROM ok),
                   array_agg(r.pos ORDER BY r.idx), array_agg(r.ver ORDER BY r.idx)
              INTO stored, r_pos, r_ver FROM r;
            IF stored THEN
                IF channel IS NOT NULL THEN
                    PERFORM pg_notify(channel, head::text);
                END IF;
                FOR j IN 1 .. n LOOP
                    out_request := j; out_status := 0;
                    out_version := r_ver[j] + r_count[j]; out_position := r_pos[j];
                    RETURN NEXT;
                END LOOP;
                out_request := 0; out_status := 0; out_version := head; out_position := NULL;
                RETURN NEXT;
                RETURN;
            END IF;
        END IF;
        -- Some append is refused (or ids are to be checked): judge unit by unit, as the
        -- lock is held, against the versions the earlier units leave.
        head := start_head;
        r_pos := array_fill(NULL::bigint, ARRAY[n]);
        r_ver := array_fill(NULL::bigint, ARRAY[n]);
        SELECT array_agg(coalesce((SELECT max(e.version) FROM __SCHEMA__.ef_events e
                                   WHERE e.stream_type = t.st AND e.stream_id = t.si),
                                  (SELECT max(a.last_version)
                                     FROM __SCHEMA__.ef_archived_streams a
                                    WHERE a.stream_type = t.st AND a.stream_id = t.si),
                                  0)
                         ORDER BY t.ord)
          INTO cur FROM unnest(s_type, s_id) WITH ORDINALITY AS t(st, si, ord);
        -- A repeated append is judged by its ids before its (by then stale) expected
        -- version. One index probe per id, whatever the statistics said when this session
        -- planned the statement.
        SELECT coalesce(array_agg(DISTINCT t.req), '{}') INTO taken
          FROM unnest(e_id, e_req) AS t(id, req)
         CROSS JOIN LATERAL (SELECT 1 FROM __SCHEMA__.ef_events e
                              WHERE e.event_id = t.id LIMIT 1) AS found;
        WHILE i <= n LOOP
            u_end := i;
            WHILE u_end < n AND r_unit[u_end + 1] = r_unit[i] LOOP
                u_end := u_end + 1;
            END LOOP;
            tent := cur;
            failed := NULL;
            pos := head;
            FOR j IN i .. u_end LOOP
                v := tent[r_stream[j]];
                IF j = ANY (taken) THEN
                    failed := j; fail_status := 2; fail_version := v;
                    EXIT;
                END IF;
                IF r_expected[j] <> -1 AND r_expected[j] <> v THEN
                    failed := j; fail_status := 1; fail_version := v;
                    EXIT;
                END IF;
                r_pos[j] := pos + 1;
                r_ver[j] := v + 1;
                pos := pos + r_count[j];
                tent[r_stream[j]] := v + r_count[j];
            END LOOP;
            IF failed IS NULL THEN
                cur := tent;
                head := pos;
                FOR j IN i .. u_end LOOP
                    out_request := j; out_status := 0;
                    out_version := r_ver[j] + r_count[j] - 1; out_position := r_pos[j];
                    RETURN NEXT;
                END LOOP;
            ELSE
                FOR j IN i .. u_end LOOP
                    r_pos[j] := NULL;
                END LOOP;
                out_request := failed; out_status := fail_status;
                out_version := fail_version; out_position := NULL;
                RETURN NEXT;
            END IF;
            i := u_end + 1;
        END LOOP;
        UPDATE __SCHEMA__.ef_head SET position = head;
        IF head > start_head THEN
            INSERT INTO __SCHEMA__.ef_events (position, stream_type, stream_id, version,
                event_id, event_type, schema_version, occurred_at, recorded_at, metadata,
                payload)
            SELECT r.pos + t.off, s_type[r.st], s_id[r.st], r.ver + t.off, t.id, t.typ, t.sv,
                   t.occ, recorded, t.meta, t.pay
              FROM unnest(r_pos, r_ver, r_stream) WITH ORDINALITY AS r(pos, ver, st, idx)
              JOIN unnest(e_req, e_off, e_id, e_type, e_schema, e_occurred, e_metadata,
                          e_payload) AS t(req, off, id, typ, sv, occ, meta, pay)
                ON t.req = r.idx
             WHERE r.pos IS NOT NULL;
            IF channel IS NOT NULL THEN
                PERFORM pg_notify(channel, head::text);
            END IF;
        END IF;
        out_request := 0; out_status := 0; out_version := head; out_position := NULL;
        RETURN NEXT;
    END
    $fn$;
    "#,
];

/// The schema version this library writes.
pub(crate) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Creates the store's schema if it is missing and brings it to [`SCHEMA_VERSION`], in
/// one transaction under an advisory lock, so processes opening at once do not race. A
/// schema written by a newer version of this library is refused (`SchemaTooNew`).
pub(crate) async fn migrate(client: &mut Client, schema: &str, location: &str) -> Result<()> {
    let failed = |doing: &'static str| move |e| open_failed(location, doing, e);
    let encoding = client
        .query_one("SHOW server_encoding", &[])
        .await
        .map_err(failed("reading the server encoding"))?;
    let encoding: String = encoding.get(0);
    if encoding != "UTF8" {
        return Err(open_refused(
            StoreErrorKind::Other,
            location,
            format!("the database's encoding is {encoding}; the store needs UTF8"),
        ));
    }
    let tx = client
        .transaction()
        .await
        .map_err(failed("starting the migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("eventfold schema {schema}")],
    )
    .await
    .map_err(failed("taking the migration lock"))?;
    // Created only when missing: `CREATE SCHEMA IF NOT EXISTS` needs the right to create
    // schemas in the database even when the schema exists (a role may own just its own).
    let exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(failed("looking for the schema"))?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .map_err(failed("creating the schema"))?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {schema}.ef_schema (version integer NOT NULL)"
    ))
    .await
    .map_err(failed("creating the schema's version table"))?;
    let stored = tx
        .query_opt(&format!("SELECT max(version) FROM {schema}.ef_schema"), &[])
        .await
        .map_err(failed("reading the schema version"))?
        .and_then(|row| row.get::<_, Option<i32>>(0))
        .unwrap_or(0);
    if stored > SCHEMA_VERSION {
        return Err(open_refused(
            StoreErrorKind::SchemaTooNew,
            location,
            format!(
                "the schema `{schema}` is at version {stored}, newer than version \
                 {SCHEMA_VERSION} that this library writes"
            ),
        ));
    }
    if stored < 0 {
        return Err(open_refused(
            StoreErrorKind::Corrupt,
            location,
            format!("the schema `{schema}` says it is at version {stored}"),
        ));
    }
    for migration in &MIGRATIONS[stored as usize..] {
        tx.batch_execute(&migration.replace("__SCHEMA__", schema))
            .await
            .map_err(failed("migrating the schema"))?;
    }
    if stored < SCHEMA_VERSION {
        tx.batch_execute(&format!(
            "DELETE FROM {schema}.ef_schema; \
             INSERT INTO {schema}.ef_schema (version) VALUES ({SCHEMA_VERSION})"
        ))
        .await
        .map_err(failed("recording the schema version"))?;
    }
    tx.commit()
        .await
        .map_err(failed("committing the migration"))?;
    if stored < SCHEMA_VERSION {
        tracing::info!(
            schema,
            from = stored,
            to = SCHEMA_VERSION,
            "migrated the PostgreSQL event store"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use eventfold_core::{EventLog, ExpectedVersion, Metadata, NewEvent, StreamId};

    use super::{MIGRATIONS, SCHEMA_VERSION};
    use crate::{DEFAULT_URL, PostgresEventStore, PostgresOptions};

    fn event() -> NewEvent {
        NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "Counted".to_owned(),
            schema_version: 1,
            occurred_at: chrono::Utc::now(),
            metadata: Metadata::new(),
            payload: r#"{"n":1}"#.to_owned(),
        }
    }

    /// A store that an older library left at version 1, with an event appended by its
    /// `ef_append`, migrates at open: the event stays, and appends go on after it.
    #[tokio::test]
    async fn a_store_at_version_1_migrates_at_open() {
        let url = std::env::var("EVENTFOLD_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(e) => {
                assert_ne!(
                    std::env::var("EVENTFOLD_REQUIRE_PG").as_deref(),
                    Ok("1"),
                    "EVENTFOLD_REQUIRE_PG=1 but no PostgreSQL answers at {url} ({e})"
                );
                eprintln!("skipping: no PostgreSQL at {url} ({e})");
                return;
            }
        };
        let schema = format!("ef_migrate_v1_{}", std::process::id());
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; {} \
                 CREATE TABLE {schema}.ef_schema (version integer NOT NULL); \
                 INSERT INTO {schema}.ef_schema VALUES (1);",
                MIGRATIONS[0].replace("__SCHEMA__", &schema)
            ))
            .await
            .unwrap();
        let old = client
            .query(
                &format!(
                    "SELECT out_request, out_version, out_position FROM {schema}.ef_append(\
                     ARRAY['Tested'], ARRAY['a'], ARRAY[1], ARRAY[0]::bigint[], ARRAY[0], \
                     ARRAY[1], ARRAY[1], ARRAY[0], ARRAY[$1::uuid], ARRAY['Counted'], \
                     ARRAY[1]::bigint[], ARRAY[0]::bigint[], ARRAY[NULL]::text[], \
                     ARRAY['{{\"n\":0}}'], 0, NULL) ORDER BY out_request"
                ),
                &[&uuid::Uuid::now_v7()],
            )
            .await
            .unwrap();
        assert_eq!(old.len(), 2, "the head row and the append's");
        assert_eq!(old[1].get::<_, i64>(2), 1, "the first position");

        let store = PostgresEventStore::open(PostgresOptions::new(&url).schema(&schema))
            .await
            .unwrap();
        let version: i32 = client
            .query_one(&format!("SELECT version FROM {schema}.ef_schema"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, SCHEMA_VERSION);
        let a = StreamId::new("Tested", "a");
        let out = store
            .append(&a, ExpectedVersion::Exact(1), vec![event(), event()])
            .await
            .unwrap();
        assert_eq!(
            (out.version, out.first_position, out.last_position),
            (3, 2, 3)
        );
        let refused = store
            .append(&a, ExpectedVersion::Exact(1), vec![event()])
            .await;
        assert!(
            matches!(
                refused,
                Err(eventfold_core::Error::VersionConflict { actual: 3, .. })
            ),
            "{refused:?}"
        );
        assert_eq!(store.read_stream(&a, 1).await.unwrap().len(), 3);
        store.close().await.unwrap();
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
