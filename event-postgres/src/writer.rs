//! The writer: one task owning one connection, fed by a channel of appends, committing
//! whatever is queued with one call of the server-side function `ef_append` (group
//! commit: one round trip and one commit for many appends).
//!
//! The function takes the head row's lock first and holds it to its commit, checks every
//! append's expected version in queue order against the versions the group's earlier
//! appends leave, and numbers the stored events densely in commit order. Event ids are
//! left to the unique index: a call that meets a stored one is rolled back and runs again
//! with the ids looked up, refusing the appends that repeat stored ids (the writer then
//! judges each: an exact repeat returns its first outcome). A refused append fails alone; the group commits. If the
//! session breaks during the call (the commit may have happened), the writer runs the call
//! again on a new session: the appends are recognised by their ids, so that is safe. If the
//! call fails otherwise, every append of the group fails: with the server's error kind
//! (nothing is stored), or as `OutcomeUnknown` when the second call could not settle it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use eventfold_core::metrics::StoreMetrics;
use eventfold_core::{AppendOutcome, AppendRequest, Error, ExpectedVersion, NewEvent, StreamId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::error::{Fault, store_error};
use crate::sql::{self, check_text, nanos};

/// How long the writer waits, at most, for the appenders of its last call to send their
/// next appends before it calls with fewer: a small part of a commit's few milliseconds.
const GATHER: Duration = Duration::from_micros(250);

/// Where an append's result goes.
pub(crate) type Reply = oneshot::Sender<eventfold_core::Result<Vec<AppendOutcome>>>;

/// Work for the writer task.
pub(crate) enum Command {
    /// One append, or a batch of appends to several streams, stored all or none.
    Append {
        requests: Vec<AppendRequest>,
        reply: Reply,
    },
    /// Stops the writer after the appends queued before it.
    Close(oneshot::Sender<()>),
}

/// What the writer has done, for [`WriterStatistics`](crate::WriterStatistics).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) call_micros: AtomicU64,
}

/// One queued append (or batch), checked and encoded.
struct Unit {
    requests: Vec<AppendRequest>,
    reply: Reply,
}

const CALL: &str = "SELECT out_request, out_status, out_version, out_position FROM \
     ef_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// Connects a session for the store, and drives its connection on a task of its own.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection of the store ended");
        }
    });
    Ok(client)
}

/// The writer's connection and queue.
pub(crate) struct Writer {
    config: tokio_postgres::Config,
    client: Option<Client>,
    statement: Option<Statement>,
    commands: mpsc::Receiver<Command>,
    /// A command taken from the queue that did not fit the last group.
    next: Option<Command>,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    metrics: StoreMetrics,
    /// The NOTIFY channel, `None` with notifications off.
    channel: Option<String>,
    max_appends: usize,
    max_events: usize,
    /// The last commit time given out, so recorded times never run backwards here.
    last_recorded_at: i64,
    /// How many appends the last call took.
    last_group: usize,
}

/// The arrays of one `ef_append` call.
#[derive(Default)]
struct Call<'a> {
    s_type: Vec<&'a str>,
    s_id: Vec<&'a str>,
    r_stream: Vec<i32>,
    r_expected: Vec<i64>,
    r_unit: Vec<i32>,
    r_count: Vec<i32>,
    e_req: Vec<i32>,
    e_off: Vec<i32>,
    e_id: Vec<Uuid>,
    e_type: Vec<&'a str>,
    e_schema: Vec<i64>,
    e_occurred: Vec<i64>,
    e_metadata: Vec<Option<String>>,
    e_payload: Vec<&'a str>,
}

impl Call<'_> {
    /// Runs the call of `ef_append` with these arrays.
    async fn run(
        &self,
        client: &Client,
        statement: &Statement,
        recorded_at: i64,
        channel: Option<&str>,
        check_ids: bool,
        counters: &Counters,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let started = Instant::now();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 17] = [
            &self.s_type,
            &self.s_id,
            &self.r_stream,
            &self.r_expected,
            &self.r_unit,
            &self.r_count,
            &self.e_req,
            &self.e_off,
            &self.e_id,
            &self.e_type,
            &self.e_schema,
            &self.e_occurred,
            &self.e_metadata,
            &self.e_payload,
            &recorded_at,
            &channel,
            &check_ids,
        ];
        let result = client.query(statement, &params).await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.call_micros.fetch_add(micros, Ordering::Relaxed);
        result
    }
}

/// What the call said of one unit.
enum Said {
    Stored(Vec<AppendOutcome>),
    Conflict { request: usize, actual: u64 },
    Taken,
}

fn event_count(requests: &[AppendRequest]) -> usize {
    requests.iter().map(|r| r.events.len()).sum()
}

/// The `ef_append` encoding of an expected version.
fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::NoStream => 0,
        ExpectedVersion::Exact(v) => i64::try_from(v).unwrap_or(-2),
    }
}

/// Checks what the server would refuse for the whole group (a NUL in a text, a time out
/// of range), so that it fails this append alone, and serializes the metadata.
fn encode(requests: &[AppendRequest]) -> eventfold_core::Result<Vec<(Option<String>, i64)>> {
    let mut encoded = Vec::with_capacity(event_count(requests));
    for request in requests {
        let stream = &request.stream;
        check_text(&stream.aggregate_type, || {
            format!("the aggregate type of {stream}")
        })?;
        check_text(&stream.aggregate_id, || {
            format!("the aggregate id of {stream}")
        })?;
        for event in &request.events {
            check_text(&event.event_type, || {
                format!("the event type of event {}", event.event_id)
            })?;
            check_text(&event.payload, || {
                format!("the payload of event {}", event.event_id)
            })?;
            let occurred = nanos(event.occurred_at).ok_or_else(|| Error::InvalidAppend {
                reason: format!(
                    "event {} occurred at {}, outside the years 1677 to 2262 that the \
                     PostgreSQL store keeps exactly",
                    event.event_id, event.occurred_at
                ),
            })?;
            let metadata = if event.metadata.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_string(&event.metadata).map_err(|source| Error::Serialize {
                        event_type: event.event_type.clone(),
                        source,
                    })?,
                )
            };
            encoded.push((metadata, occurred));
        }
    }
    Ok(encoded)
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: tokio_postgres::Config,
        client: Client,
        commands: mpsc::Receiver<Command>,
        head: Arc<watch::Sender<u64>>,
        counters: Arc<Counters>,
        channel: Option<String>,
        max_appends: usize,
        max_events: usize,
    ) -> Self {
        Writer {
            config,
            client: Some(client),
            statement: None,
            commands,
            next: None,
            head,
            counters,
            metrics: StoreMetrics::new("postgres"),
            channel,
            max_appends,
            max_events,
            last_recorded_at: i64::MIN,
            last_group: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        let closed_by = loop {
            let command = match self.next.take() {
                Some(command) => command,
                None => match self.commands.recv().await {
                    Some(command) => command,
                    // Every handle of the store is gone.
                    None => break None,
                },
            };
            let (requests, reply) = match command {
                Command::Close(reply) => break Some(reply),
                Command::Append { requests, reply } => (requests, reply),
            };
            let mut events = event_count(&requests);
            let mut ids: HashSet<Uuid> = requests
                .iter()
                .flat_map(|r| r.events.iter().map(|e| e.event_id))
                .collect();
            let mut group = vec![Unit { requests, reply }];
            // The appenders the last call answered send their next appends a few
            // microseconds after their answers: had the writer called at once with the
            // first of them, the rest would wait for a whole call more. So it waits for as
            // many as the last group held, briefly, yielding to them.
            let expected = self.last_group.saturating_sub(1);
            if expected > 0 {
                let deadline = Instant::now() + GATHER;
                while self.commands.len() < expected && Instant::now() < deadline {
                    tokio::task::yield_now().await;
                }
            }
            // Whatever queued up while the last call ran joins this one.
            while group.len() < self.max_appends {
                match self.commands.try_recv() {
                    Ok(Command::Append { requests, reply }) => {
                        let more = event_count(&requests);
                        // An append repeating an id of this group waits for the next one,
                        // where the id is stored and the repeat is judged against it.
                        let overlaps = requests
                            .iter()
                            .flat_map(|r| r.events.iter())
                            .any(|e| ids.contains(&e.event_id));
                        if events + more > self.max_events || overlaps {
                            self.next = Some(Command::Append { requests, reply });
                            break;
                        }
                        events += more;
                        ids.extend(
                            requests
                                .iter()
                                .flat_map(|r| r.events.iter().map(|e| e.event_id)),
                        );
                        group.push(Unit { requests, reply });
                    }
                    Ok(close) => {
                        self.next = Some(close);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.last_group = group.len();
            self.commit_group(group).await;
        };
        // Refuse what is still queued (callers see the store closed), then disconnect.
        self.commands.close();
        self.next = None;
        while self.commands.try_recv().is_ok() {}
        self.statement = None;
        self.client = None;
        if let Some(reply) = closed_by {
            let _ = reply.send(());
        }
    }

    /// Connects again if the connection broke, and prepares the call.
    async fn ensure_connected(&mut self) -> eventfold_core::Result<()> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            self.statement = None;
            let client = connect(&self.config)
                .await
                .map_err(|e| store_error("reconnecting the writer to PostgreSQL", e))?;
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("the PostgreSQL writer reconnected");
            self.client = Some(client);
        }
        if self.statement.is_none()
            && let Some(client) = &self.client
        {
            let statement = client
                .prepare(CALL)
                .await
                .map_err(|e| store_error("preparing the append call", e))?;
            self.statement = Some(statement);
        }
        Ok(())
    }

    /// Stores a group of appends with one call and answers each.
    async fn commit_group(&mut self, group: Vec<Unit>) {
        let started = std::time::Instant::now();
        let mut units = Vec::with_capacity(group.len());
        for unit in group {
            match encode(&unit.requests) {
                Ok(encoded) => units.push((unit, encoded)),
                Err(error) => {
                    let _ = unit.reply.send(Err(error));
                }
            }
        }
        if units.is_empty() {
            return;
        }
        if let Err(error) = self.ensure_connected().await {
            let fault = Fault::before_call(&error);
            for (unit, _) in units {
                let _ = unit.reply.send(Err(fault.to_error()));
            }
            return;
        }
        let now = nanos(Utc::now()).unwrap_or(i64::MAX);
        self.last_recorded_at = self.last_recorded_at.max(now);

        // Requests numbered from 1 over the group: (unit, request in the unit).
        let mut index: Vec<(usize, usize)> = Vec::new();
        let mut saids: Vec<Option<Said>> = Vec::with_capacity(units.len());
        let result = {
            let mut call = Call::default();
            let mut streams: HashMap<&StreamId, i32> = HashMap::new();
            for (u, (unit, encoded)) in units.iter_mut().enumerate() {
                let mut encoded = encoded.drain(..);
                for (r, request) in unit.requests.iter().enumerate() {
                    let stream = *streams.entry(&request.stream).or_insert_with(|| {
                        call.s_type.push(&request.stream.aggregate_type);
                        call.s_id.push(&request.stream.aggregate_id);
                        call.s_type.len() as i32
                    });
                    index.push((u, r));
                    let req = index.len() as i32;
                    call.r_stream.push(stream);
                    call.r_expected.push(expected_code(request.expected));
                    call.r_unit.push(u as i32);
                    call.r_count.push(request.events.len() as i32);
                    for (offset, event) in request.events.iter().enumerate() {
                        let (metadata, occurred) = encoded.next().unwrap_or((None, 0));
                        call.e_req.push(req);
                        call.e_off.push(offset as i32);
                        call.e_id.push(event.event_id);
                        call.e_type.push(&event.event_type);
                        call.e_schema.push(i64::from(event.schema_version));
                        call.e_occurred.push(occurred);
                        call.e_metadata.push(metadata);
                        call.e_payload.push(&event.payload);
                    }
                }
                saids.push(None);
            }
            // The first failure that lost the session, once the call is run again.
            let mut lost: Option<Fault> = None;
            // The first call leaves duplicate event ids to the unique index; a call that
            // meets one runs again with the ids looked up, which refuses just the units
            // that repeat stored ids (the writer judges them) and stores the rest.
            let mut check_ids = false;
            loop {
                let (Some(client), Some(statement)) = (&self.client, &self.statement) else {
                    unreachable!("ensure_connected leaves a client and a statement");
                };
                let channel = self.channel.as_deref();
                let mut result = call
                    .run(
                        client,
                        statement,
                        self.last_recorded_at,
                        channel,
                        check_ids,
                        &self.counters,
                    )
                    .await;
                if result.as_ref().is_err_and(foreign_row) {
                    // A stored event id (an append repeated), or a row that a writer outside
                    // the store inserted and this call's checks could not see yet (it was
                    // not committed): the call was rolled back whole. Run again with the ids
                    // checked; it sees the row now and judges each append by it.
                    tracing::debug!(
                        check_ids,
                        "a group met a stored event id or a row written outside the store; \
                         calling again with the ids checked"
                    );
                    check_ids = true;
                    result = call
                        .run(
                            client,
                            statement,
                            self.last_recorded_at,
                            channel,
                            check_ids,
                            &self.counters,
                        )
                        .await;
                }
                let error = match result {
                    Ok(rows) => break Ok(rows),
                    Err(error) => error,
                };
                let fault = Fault::of_call(error);
                // The next call connects anew (the driver may not know yet that the server
                // ended the session).
                if fault.lost_the_session() || client.is_closed() {
                    self.client = None;
                    self.statement = None;
                }
                if let Some(first) = lost {
                    // The first call's outcome is still not known.
                    break Err(first);
                }
                if !fault.lost_the_session() {
                    break Err(fault);
                }
                // Whether the call ran is not known, but running it again is safe: the
                // appends are recognised by their event ids, so a group that was stored is
                // answered with its outcomes and one that was not is stored now. A server
                // that ended an idle session (a restart) then costs no caller an error.
                tracing::info!(error = %fault.to_error(), "the writer's session was lost during a call; calling again on a new one");
                if self.ensure_connected().await.is_err() {
                    break Err(fault);
                }
                lost = Some(fault);
                check_ids = true;
            }
        };
        let rows = match result {
            Ok(rows) => rows,
            Err(fault) => {
                tracing::warn!(error = %fault.to_error(), appends = units.len(), "a group commit failed");
                self.metrics.failed();
                for (unit, _) in units {
                    let _ = unit.reply.send(Err(fault.to_error()));
                }
                return;
            }
        };
        let mut head = None;
        for row in &rows {
            let request: i32 = row.get(0);
            let status: i16 = row.get(1);
            let version: i64 = row.get(2);
            let position: Option<i64> = row.get(3);
            if request == 0 {
                head = Some(version as u64);
                continue;
            }
            let Some(&(u, r)) = usize::try_from(request - 1).ok().and_then(|i| index.get(i)) else {
                continue;
            };
            match status {
                0 => {
                    let first = position.unwrap_or_default() as u64;
                    let count = units[u].0.requests[r].events.len() as u64;
                    let outcome = AppendOutcome {
                        version: version as u64,
                        first_position: first,
                        last_position: first + count - 1,
                    };
                    match &mut saids[u] {
                        Some(Said::Stored(outcomes)) => outcomes.push(outcome),
                        said => *said = Some(Said::Stored(vec![outcome])),
                    }
                }
                1 => {
                    saids[u] = Some(Said::Conflict {
                        request: r,
                        actual: version.max(0) as u64,
                    })
                }
                _ => saids[u] = Some(Said::Taken),
            }
        }
        // Published before the answers, so an appender that then looks at the watch sees
        // its own append.
        if let Some(head) = head {
            self.head.send_if_modified(|published| {
                let moved = head > *published;
                if moved {
                    *published = head;
                }
                moved
            });
        }
        let (mut appends, mut events) = (0, 0);
        for ((unit, _), said) in units.into_iter().zip(saids) {
            let answer = match said {
                Some(Said::Stored(outcomes)) if outcomes.len() == unit.requests.len() => {
                    appends += outcomes.len() as u64;
                    events += outcomes
                        .iter()
                        .map(|o| o.last_position + 1 - o.first_position)
                        .sum::<u64>();
                    Ok(outcomes)
                }
                Some(Said::Conflict { request, actual }) => {
                    let request = &unit.requests[request];
                    Err(Error::VersionConflict {
                        aggregate_type: request.stream.aggregate_type.clone(),
                        aggregate_id: request.stream.aggregate_id.clone(),
                        expected: request.expected,
                        actual,
                    })
                }
                Some(Said::Taken) => match &self.client {
                    Some(client) => judge(client, &unit.requests).await,
                    None => Err(crate::error::closed()),
                },
                _ => Err(Error::Store {
                    kind: eventfold_core::StoreErrorKind::Other,
                    message: "the append call returned no outcome for an append".to_owned(),
                    source: None,
                }),
            };
            let _ = unit.reply.send(answer);
        }
        self.counters.appends.fetch_add(appends, Ordering::Relaxed);
        self.metrics.committed(appends, events, started.elapsed());
    }
}

/// True for the failure of a call whose insert met a row committed meanwhile by a writer
/// outside the store: a unique violation of an event id or a stream version. (Positions
/// are the head row's to give; a violation of one is not this.)
fn foreign_row(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() != Some("ef_events_pkey")
    })
}

/// Judges an append some of whose event ids are stored: an exact repeat of stored appends
/// returns their outcomes; an id stored with other content is `DuplicateEventId`; an
/// append that repeats some stored events but not all is `InvalidAppend`.
async fn judge(
    client: &Client,
    requests: &[AppendRequest],
) -> eventfold_core::Result<Vec<AppendOutcome>> {
    let ids: Vec<Uuid> = requests
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.event_id))
        .collect();
    let stored = sql::events_by_ids(client, &ids).await?;
    let by_id: HashMap<Uuid, &eventfold_core::RecordedEvent> =
        stored.iter().map(|e| (e.event_id, e)).collect();
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut fresh = false;
    for request in requests {
        match replayed(&request.stream, &request.events, &by_id)? {
            Some(outcome) => outcomes.push(outcome),
            None => fresh = true,
        }
    }
    if fresh {
        return Err(Error::InvalidAppend {
            reason: "the batch repeats some stored appends but not all".to_owned(),
        });
    }
    Ok(outcomes)
}

/// The outcome of an earlier append if `events` repeats it exactly; an error if any of
/// their ids is taken otherwise; `None` if all ids are new. The SQLite store's rules.
fn replayed(
    stream: &StreamId,
    events: &[NewEvent],
    stored: &HashMap<Uuid, &eventfold_core::RecordedEvent>,
) -> eventfold_core::Result<Option<AppendOutcome>> {
    let mut found = Vec::new();
    let mut new = None;
    for event in events {
        match stored.get(&event.event_id) {
            Some(recorded) => {
                if !event.same_content(stream, recorded) {
                    return Err(Error::DuplicateEventId {
                        event_id: event.event_id,
                    });
                }
                found.push(*recorded);
            }
            None => {
                new.get_or_insert(event.event_id);
            }
        }
    }
    let (Some(first), Some(last)) = (found.first(), found.last()) else {
        return Ok(None);
    };
    if let Some(new) = new {
        return Err(Error::InvalidAppend {
            reason: format!(
                "the append repeats some stored events but not all (event {new} is new)"
            ),
        });
    }
    let positions_follow = found
        .windows(2)
        .all(|w| w[0].position.checked_add(1) == Some(w[1].position));
    if !positions_follow {
        return Err(Error::DuplicateEventId {
            event_id: events[0].event_id,
        });
    }
    Ok(Some(AppendOutcome {
        version: last.version,
        first_position: first.position,
        last_position: last.position,
    }))
}
