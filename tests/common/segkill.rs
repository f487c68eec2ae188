//! The kill scenario of issue 12, item 5, shared by the SQLite and PostgreSQL test files:
//! 4 processes (this test binary re-run) run one subscription of 16 segments over 20,000
//! events on 500 aggregates, while the parent SIGKILLs one of them at 5 random moments and
//! starts it again each time (under a new member id). Then:
//! - every event was handled at least once;
//! - first deliveries are in order per aggregate: the first delivery of version `v`
//!   started after the first delivery of `v - 1` ended (across processes: the times are
//!   the machine's wall clock, which every process here shares);
//! - no segment checkpoint ever passed an unhandled event: the parent samples the
//!   checkpoints (`segment_states`) all through the run, and each one is checked against
//!   what the children had logged when it was read (states first, logs after: a
//!   checkpoint is saved after its handlers returned, and a handler logs before it
//!   returns);
//! - no two live processes held one segment at once: per segment, one epoch (the fencing
//!   token, [`Delivery::lease_epoch`]) has one member in the logs and one owner in the
//!   store's samples, the epochs seen in the store only rise, each member's log never
//!   goes back to an older epoch, epochs begin in their order, and no delivery under an
//!   older epoch started after the first one under a newer epoch (a handler already
//!   under way may still end after it: nothing stops a running handler).
//!
//! The moments are drawn from a seeded RNG: the seed is printed, and
//! `EVENTFOLD_SEGKILL_SEED=<seed>` replays it.
//!
//! Waiting: the children report on their stdout (`common/reports.rs`) each event they
//! handled, each change of the segments they run, and each time their checkpoints are
//! saved up to the head (`wait_idle`); the parent tells them on their stdin when the head
//! is final. The parent samples the store's checkpoints and leases when a child reported
//! something or exited, and only then; each wait has a guard against a hang. The
//! children's own waits are the bus's (lease renewals every ttl / 3).

#![allow(dead_code)]

#[path = "reports.rs"]
mod reports;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventfold::backend::AppendRequest;
use eventfold::lease::segment_of;
use eventfold::prelude::*;
use eventfold::{Delivery, EventBus, NewEvent};
use serde::{Deserialize, Serialize};

/// The environment variable that makes the test binary a child:
/// `<store location>|<member id>`.
pub const CHILD: &str = "EVENTFOLD_SEGKILL_CHILD";
/// Overrides the seed of the kill moments.
pub const SEED: &str = "EVENTFOLD_SEGKILL_SEED";
pub const SUBSCRIPTION: &str = "meters";
pub const SEGMENTS: u32 = 16;
pub const CHILDREN: usize = 4;
pub const EVENTS: u64 = 20_000;
pub const AGGREGATES: u64 = 500;
pub const KILLS: usize = 5;
/// Short, so a killed child's segments are taken over soon.
pub const TTL: Duration = Duration::from_millis(1_500);
/// What a handler takes per event: an I/O-bound projection.
pub const HANDLER_TIME: Duration = Duration::from_millis(1);
/// Far beyond anything the scenario needs: only a hang reaches it.
pub const GUARD: Duration = Duration::from_secs(150);
/// What the parent writes on a child's stdin once every event is appended.
const APPENDED: &[u8] = b"appended\n";

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter")]
pub enum MeterEvent {
    Ticked {
        #[domain_event(aggregate_id)]
        meter: String,
        n: u64,
    },
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos()
}

/// The child: if `CHILD` is set, runs the subscription on the store `open` gives for the
/// location until killed, reporting on stdout one `handled` line per handled event, a
/// `held` line per change of the segments it runs, and an `idle` line each time its
/// checkpoints are saved up to the head after something happened (an event handled, a
/// segment taken up, the parent's word on stdin that the head is final).
pub fn child_entry<F, Fut>(open: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Arc<dyn EventStore>>,
{
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (location, member) = spec.rsplit_once('|').unwrap();
    let (location, member) = (location.to_owned(), member.to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = open(location).await;
        let bus = EventBus::builder()
            .store(store)
            .workers(4)
            .lease_ttl(TTL)
            .member_id(member)
            .build()
            .unwrap();
        // Something happened after which the checkpoints may move: a permit is kept, so
        // nothing told while `wait_idle` runs is missed.
        let activity = Arc::new(tokio::sync::Notify::new());
        let handled = Arc::clone(&activity);
        bus.subscribe(SUBSCRIPTION, move |d: Delivery<MeterEvent>| {
            let started = now_nanos();
            let record = d.record();
            let stream = StreamId::new(record.aggregate_type.clone(), record.aggregate_id.clone());
            let head = format!(
                "handled {} {} {} {} {} {}",
                record.position,
                record.event_id,
                record.aggregate_id,
                record.version,
                segment_of(&stream, SEGMENTS),
                d.lease_epoch().unwrap_or(0),
            );
            let handled = Arc::clone(&handled);
            async move {
                // The workload, not a wait: each event takes the handler real time (a child
                // process, with real lease times), so the SIGKILLs land with deliveries in
                // flight. No test step waits on it; the parent waits on the reports.
                tokio::time::sleep(HANDLER_TIME).await;
                // Whole before the handler returns, so before its checkpoint is saved.
                reports::report(&format!("{head} {started} {}", now_nanos()))?;
                handled.notify_one();
                Ok::<_, std::io::Error>(())
            }
        })
        .segments(SEGMENTS)
        .register()
        .unwrap();
        bus.start().await.unwrap();
        let mut held = bus.watch_held_segments(SUBSCRIPTION).unwrap();
        let taken_up = Arc::clone(&activity);
        tokio::spawn(async move {
            loop {
                let segments = held.borrow_and_update().clone();
                reports::report(&format!("held {segments:?}")).unwrap();
                taken_up.notify_one();
                if held.changed().await.is_err() {
                    return;
                }
            }
        });
        // The parent's word that the head is final: segments with no event after their
        // last report still need their checkpoints saved up to it.
        let appended = Arc::clone(&activity);
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                if line.is_err() {
                    return;
                }
                appended.notify_one();
            }
        });
        loop {
            activity.notified().await;
            match bus.wait_idle().await {
                Ok(()) => reports::report("idle").unwrap(),
                // A store error (the file busy past its timeout under load): said, and
                // tried again, or the parent might wait on an idle that never comes.
                Err(error) => {
                    eprintln!("wait_idle failed, trying again: {error}");
                    reports::report(&format!("idle failed: {error}")).unwrap();
                    activity.notify_one();
                }
            }
        }
    });
}

/// One handled event, as a child logged it.
#[derive(Debug, Clone)]
struct Line {
    position: u64,
    event_id: String,
    aggregate: String,
    version: u64,
    segment: u32,
    epoch: u64,
    started: u128,
    ended: u128,
    member: Arc<str>,
}

fn parse(line: &str, member: &Arc<str>) -> Option<Line> {
    let f: Vec<&str> = line.split(' ').collect();
    let [
        position,
        event_id,
        aggregate,
        version,
        segment,
        epoch,
        started,
        ended,
    ] = f[..]
    else {
        return None;
    };
    Some(Line {
        position: position.parse().ok()?,
        event_id: event_id.to_owned(),
        aggregate: aggregate.to_owned(),
        version: version.parse().ok()?,
        segment: segment.parse().ok()?,
        epoch: epoch.parse().ok()?,
        started: started.parse().ok()?,
        ended: ended.parse().ok()?,
        member: Arc::clone(member),
    })
}

/// What the children reported handled.
#[derive(Default)]
struct Logs {
    lines: Vec<Line>,
    handled: HashSet<u64>,
    /// Per member, the last thing it reported other than a handled event (for a failure's
    /// message).
    last_said: BTreeMap<String, String>,
}

impl Logs {
    /// Takes in what the children's pipes hold now (a line cut short by a kill is never
    /// completed, and dropped); a child that exited unless killed fails the run.
    fn take(&mut self, label: &str, children: &mut Children) {
        for report in children.reports.drain() {
            match report {
                reports::Report::Line { child, text } => {
                    let Some(fields) = text.strip_prefix("handled ") else {
                        self.last_said.insert(child, text);
                        continue;
                    };
                    let line = parse(fields, &Arc::from(child))
                        .unwrap_or_else(|| panic!("a bad line: {text}"));
                    self.handled.insert(line.position);
                    self.lines.push(line);
                }
                reports::Report::Exited { child } => children.exited(label, &child),
            }
        }
    }
}

/// The events in the store, read on up to a position: (segment) by position.
#[derive(Default)]
struct Stored {
    /// Index `p - 1` holds the segment of position `p`.
    segments: Vec<u32>,
    /// Per segment, its positions in order.
    by_segment: BTreeMap<u32, Vec<u64>>,
    /// Per segment, how many of its first positions are known handled.
    verified: BTreeMap<u32, usize>,
}

impl Stored {
    async fn read_upto(&mut self, store: &dyn EventStore, position: u64) {
        while (self.segments.len() as u64) < position {
            let from = self.segments.len() as u64 + 1;
            let page = store.read_all(from, 1_000).await.unwrap();
            assert!(!page.is_empty(), "position {position} is not in the store");
            for event in page {
                assert_eq!(event.position, self.segments.len() as u64 + 1);
                let stream = StreamId::new(event.aggregate_type, event.aggregate_id);
                let segment = segment_of(&stream, SEGMENTS);
                self.segments.push(segment);
                self.by_segment
                    .entry(segment)
                    .or_default()
                    .push(event.position);
            }
        }
    }

    /// The segment's first position not yet handled, if it has one read.
    fn first_unhandled(&mut self, segment: u32, handled: &HashSet<u64>) -> Option<u64> {
        let positions = self.by_segment.get(&segment)?;
        let verified = self.verified.entry(segment).or_default();
        while *verified < positions.len() && handled.contains(&positions[*verified]) {
            *verified += 1;
        }
        positions.get(*verified).copied()
    }
}

/// What the run counted.
#[derive(Debug)]
pub struct Figures {
    pub events: u64,
    pub deliveries: usize,
    pub redeliveries: usize,
    /// Segments that changed hands: per segment, an epoch under which another member
    /// delivered than under the epoch before.
    pub takeovers: usize,
    /// Claims beyond each segment's first (the store's epochs).
    pub claims: u64,
    pub checkpoint_samples: usize,
}

/// The live children, killed when dropped (a failed test leaves none behind).
struct Children {
    test: String,
    location: String,
    dir: PathBuf,
    /// Per slot: the process and its member id.
    live: Vec<(Child, String)>,
    started: usize,
    /// Every child's stdout, live or not yet read to its end.
    reports: reports::Reports,
    /// The members this run killed: the only ones that may exit.
    killed: HashSet<String>,
    /// Whether every event is appended (and the live children were told).
    appended: bool,
}

impl Children {
    fn spawn(&mut self, slot: usize) {
        let member = format!("child-{slot}.{}", self.started);
        self.started += 1;
        let stderr = std::fs::File::create(self.dir.join(format!("{member}.err"))).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &self.test, "--nocapture", "--test-threads=1"])
            .env(CHILD, format!("{}|{member}", self.location))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.reports
            .add(member.clone(), child.stdout.take().unwrap());
        if self.appended {
            tell_appended(&mut child);
        }
        if slot < self.live.len() {
            self.live[slot] = (child, member);
        } else {
            self.live.push((child, member));
        }
    }

    fn kill(&mut self, slot: usize) {
        let (child, member) = &mut self.live[slot];
        self.killed.insert(member.clone());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Kills every live child (reading on, their pipes end).
    fn kill_all(&mut self) {
        for slot in 0..self.live.len() {
            self.kill(slot);
        }
    }

    /// Tells the live children that the head is final (and those started from now on).
    fn appended(&mut self) {
        self.appended = true;
        for (child, _) in &mut self.live {
            tell_appended(child);
        }
    }

    /// What the live children wrote on stderr.
    fn stderr(&self) -> Vec<(String, String)> {
        self.live
            .iter()
            .map(|(_, member)| {
                let path = self.dir.join(format!("{member}.err"));
                (
                    member.clone(),
                    std::fs::read_to_string(path).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// A child's stdout ended: fails unless this run killed it.
    fn exited(&self, label: &str, member: &str) {
        assert!(
            self.killed.contains(member),
            "{label}: {member} exited unasked; its stderr:\n{}",
            std::fs::read_to_string(self.dir.join(format!("{member}.err"))).unwrap_or_default()
        );
    }
}

/// Writes `APPENDED` on a child's stdin. A child that died cannot read it, and its end is
/// reported on its stdout.
fn tell_appended(child: &mut Child) {
    let _ = child.stdin.as_mut().unwrap().write_all(APPENDED);
}

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.live {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// xorshift64: the kill moments' randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> u64 {
    match std::env::var(SEED) {
        Ok(seed) => seed.parse().expect("EVENTFOLD_SEGKILL_SEED is a number"),
        Err(_) => (now_nanos() as u64) | 1,
    }
}

/// Appends the scenario's events: 100 batches of 200 events, each batch two events on
/// each of 100 aggregates in one atomic step.
async fn append_all(store: Arc<dyn EventStore>) {
    let per_batch = 100;
    let mut n = 0;
    while n < EVENTS {
        let mut requests = Vec::new();
        for a in 0..per_batch {
            let meter = format!("m-{}", (n / 2 + a) % AGGREGATES);
            let events = (0..2)
                .map(|i| {
                    NewEvent::from_event(
                        &MeterEvent::Ticked {
                            meter: meter.clone(),
                            n: n + 2 * a + i,
                        },
                        Metadata::new(),
                    )
                    .unwrap()
                })
                .collect();
            requests.push(AppendRequest {
                stream: StreamId::new("Meter", meter),
                expected: ExpectedVersion::Any,
                events,
            });
        }
        store.append_batch(requests).await.unwrap();
        n += 2 * per_batch;
    }
}

/// Runs the scenario: the children are this test binary re-run with `--exact test` and
/// `CHILD` set (the test calls [`child_entry`] first); `location` tells them the store,
/// which `store` is in the parent. `label` names the store in the figures printed.
pub async fn run(test: &str, label: &str, location: &str, store: Arc<dyn EventStore>) -> Figures {
    let seed = seed();
    eprintln!("{label} kill test: seed {seed} (replay with {SEED}={seed})");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + GUARD;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_owned();
    // EVENTFOLD_SEGKILL_KEEP=1 keeps the children's stderr, to look into a failure.
    let _temp = match std::env::var_os("EVENTFOLD_SEGKILL_KEEP") {
        Some(_) => {
            eprintln!(
                "{label} kill test: stderr kept in {}",
                temp.keep().display()
            );
            None
        }
        None => Some(temp),
    };
    let mut children = Children {
        test: test.to_owned(),
        location: location.to_owned(),
        dir: dir.clone(),
        live: Vec::new(),
        started: 0,
        reports: reports::Reports::default(),
        killed: HashSet::new(),
        appended: false,
    };
    for slot in 0..CHILDREN {
        children.spawn(slot);
    }
    // The kill moments: when this many distinct events were handled.
    let mut moments: Vec<u64> = (0..KILLS)
        .map(|_| EVENTS / 20 + rng.next() % (EVENTS * 17 / 20))
        .collect();
    moments.sort_unstable();
    eprintln!("{label} kill test: kills when {moments:?} events are handled");

    let mut logs = Logs::default();
    // The children share the segments before the events come: a child reports a segment
    // it took up after its lease row names it.
    loop {
        let states = store.segment_states(SUBSCRIPTION).await.unwrap();
        let owners: HashSet<&str> = states.iter().filter_map(|s| s.owner.as_deref()).collect();
        if states.len() == SEGMENTS as usize
            && owners.len() == CHILDREN
            && states.iter().all(|s| s.owner.is_some())
        {
            break;
        }
        assert!(
            children.reports.wait(deadline).await,
            "{label}: the children never split the segments: {states:?}; last said {:?}; \
             stderr {:?}",
            logs.last_said,
            children.stderr()
        );
        logs.take(label, &mut children);
    }
    let mut appender = tokio::spawn(append_all(Arc::clone(&store)));

    let mut stored = Stored::default();
    let mut kills = 0;
    let mut samples = 0;
    // Per segment: the highest epoch seen in the store, and per (segment, epoch) its owner.
    let mut last_epoch: BTreeMap<u32, u64> = BTreeMap::new();
    let mut owner_of: HashMap<(u32, u64), String> = HashMap::new();
    loop {
        // States first, then the reports: a checkpoint read here was saved after its
        // events' handlers returned, so after their lines were written, and the drain
        // reads every line written before it began.
        let states = store.segment_states(SUBSCRIPTION).await.unwrap();
        logs.take(label, &mut children);
        let highest = states.iter().map(|s| s.checkpoint).max().unwrap_or(0);
        stored.read_upto(store.as_ref(), highest).await;
        for state in &states {
            if let Some(unhandled) = stored.first_unhandled(state.segment, &logs.handled) {
                assert!(
                    state.checkpoint < unhandled,
                    "{label}: segment {} has checkpoint {} past position {unhandled}, which no \
                     child handled",
                    state.segment,
                    state.checkpoint
                );
            }
            let last = last_epoch.entry(state.segment).or_default();
            assert!(
                state.epoch >= *last,
                "{label}: segment {}'s epoch fell from {last} to {}",
                state.segment,
                state.epoch
            );
            *last = state.epoch;
            if let Some(owner) = &state.owner {
                let first = owner_of
                    .entry((state.segment, state.epoch))
                    .or_insert_with(|| owner.clone());
                assert_eq!(
                    first, owner,
                    "{label}: segment {} epoch {} has two owners",
                    state.segment, state.epoch
                );
            }
        }
        samples += 1;

        let handled = logs.handled.len() as u64;
        if kills < KILLS && handled >= moments[kills] {
            // The victim: one of the children that hold segments now.
            let holders: Vec<usize> = (0..CHILDREN)
                .filter(|&slot| {
                    let member = &children.live[slot].1;
                    states.iter().any(|s| s.owner.as_ref() == Some(member))
                })
                .collect();
            if !holders.is_empty() {
                let slot = holders[(rng.next() % holders.len() as u64) as usize];
                eprintln!(
                    "{label} kill test: kill {} at {handled} handled ({:.1} s)",
                    children.live[slot].1,
                    started.elapsed().as_secs_f64()
                );
                children.kill(slot);
                children.spawn(slot);
                kills += 1;
            }
        }
        if children.appended
            && kills == KILLS
            && handled == EVENTS
            && states.len() == SEGMENTS as usize
            && states.iter().all(|s| s.checkpoint == EVENTS)
        {
            break;
        }
        // Until a child reports something or exits (or the appends are done).
        tokio::select! {
            reported = children.reports.wait(deadline) => {
                assert!(
                    reported,
                    "{label}: not done within the guard: {handled} of {EVENTS} events handled, \
                     {kills} kills, appended: {}; segments {states:?}; last said {:?}; \
                     stderr {:?}",
                    children.appended,
                    logs.last_said,
                    children.stderr()
                );
            }
            done = &mut appender, if !children.appended => {
                done.unwrap();
                children.appended();
            }
        }
    }
    let elapsed = started.elapsed();
    // Their last lines too (redeliveries, if any, after everything was checkpointed).
    children.kill_all();
    logs.take(label, &mut children);
    drop(children);
    stored.read_upto(store.as_ref(), EVENTS).await;
    assert_eq!(store.head_position().await.unwrap(), EVENTS);

    let figures = check(
        label,
        &logs,
        &store.segment_states(SUBSCRIPTION).await.unwrap(),
        samples,
    );
    eprintln!(
        "{label} kill test: {} events on {AGGREGATES} aggregates, {SEGMENTS} segments, \
         {CHILDREN} processes, {KILLS} SIGKILLs and restarts: {} deliveries, {} redeliveries, \
         {} takeovers ({} claims after the first per segment), {} checkpoint samples checked; \
         {:.1} s",
        figures.events,
        figures.deliveries,
        figures.redeliveries,
        figures.takeovers,
        figures.claims,
        figures.checkpoint_samples,
        elapsed.as_secs_f64()
    );
    figures
}

/// The checks on the whole logs once everything is handled.
fn check(
    label: &str,
    logs: &Logs,
    states: &[eventfold::backend::SegmentState],
    samples: usize,
) -> Figures {
    let lines = &logs.lines;
    // Every event at least once.
    for position in 1..=EVENTS {
        assert!(
            logs.handled.contains(&position),
            "{label}: position {position} was never handled"
        );
    }
    let ids: HashSet<&str> = lines.iter().map(|l| l.event_id.as_str()).collect();
    assert_eq!(ids.len() as u64, EVENTS, "{label}: one id per position");

    // First deliveries in order per aggregate.
    let mut first: HashMap<(&str, u64), &Line> = HashMap::new();
    for line in lines {
        let entry = first.entry((&line.aggregate, line.version)).or_insert(line);
        if line.ended < entry.ended {
            *entry = line;
        }
    }
    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for &(aggregate, version) in first.keys() {
        versions.entry(aggregate).or_default().push(version);
    }
    for (aggregate, mut vs) in versions {
        vs.sort_unstable();
        assert_eq!(
            vs,
            (1..=vs.len() as u64).collect::<Vec<_>>(),
            "{label}: {aggregate} has gaps"
        );
        for v in 2..=vs.len() as u64 {
            let (before, this) = (first[&(aggregate, v - 1)], first[&(aggregate, v)]);
            assert!(
                this.started >= before.ended,
                "{label}: {aggregate} version {v} (by {}) was first delivered before version {} \
                 (by {}) was done",
                this.member,
                v - 1,
                before.member
            );
        }
    }

    // Per segment and epoch: one member; epochs one after the other in time.
    let mut by_epoch: BTreeMap<(u32, u64), (BTreeSet<&str>, u128)> = BTreeMap::new();
    let mut last_in_log: HashMap<(&str, u32), u64> = HashMap::new();
    for line in lines {
        assert_ne!(line.epoch, 0, "{label}: a delivery without a lease epoch");
        let entry = by_epoch
            .entry((line.segment, line.epoch))
            .or_insert((BTreeSet::new(), u128::MAX));
        entry.0.insert(&line.member);
        entry.1 = entry.1.min(line.started);
        // A member's log (in its order) never goes back to an older epoch of a segment.
        let last = last_in_log.entry((&line.member, line.segment)).or_default();
        assert!(
            line.epoch >= *last,
            "{label}: {} delivered segment {} under epoch {} after epoch {last}",
            line.member,
            line.segment,
            line.epoch
        );
        *last = line.epoch;
    }
    let mut takeovers = 0;
    // The epoch before, of the same segment: (segment, epoch, member, first start).
    let mut previous: Option<(u32, u64, &str, u128)> = None;
    for (&(segment, epoch), (members, first_start)) in &by_epoch {
        assert_eq!(
            members.len(),
            1,
            "{label}: segment {segment} epoch {epoch} delivered by {members:?}"
        );
        let member = *members.first().unwrap();
        if let Some((s, e, m, start)) = previous
            && s == segment
        {
            assert!(
                start < *first_start,
                "{label}: segment {segment}: epoch {epoch} ({member}) began before epoch {e} ({m})"
            );
            if m != member {
                takeovers += 1;
            }
        }
        previous = Some((segment, epoch, member, *first_start));
    }
    // No delivery under an older epoch starts once a newer one began: a member stops
    // starting deliveries of a segment before its lease can pass to another. (A delivery
    // started before may still run: nothing can stop a handler under way.)
    for line in lines {
        let newer = by_epoch
            .range((line.segment, line.epoch + 1)..=(line.segment, u64::MAX))
            .next();
        if let Some((&(_, epoch), (members, first_start))) = newer {
            assert!(
                line.started < *first_start,
                "{label}: segment {}: {} started position {} under epoch {} {} µs after epoch \
                 {epoch} ({members:?}) began",
                line.segment,
                line.member,
                line.position,
                line.epoch,
                (line.started - first_start) / 1_000
            );
        }
    }
    for state in states {
        let highest = by_epoch
            .range((state.segment, 0)..=(state.segment, u64::MAX))
            .map(|(&(_, e), _)| e)
            .max()
            .unwrap_or(0);
        assert!(
            highest <= state.epoch,
            "{label}: an epoch beyond the store's"
        );
    }
    let claims = states.iter().map(|s| s.epoch).sum::<u64>() - u64::from(SEGMENTS);
    Figures {
        events: EVENTS,
        deliveries: lines.len(),
        redeliveries: lines.len() - EVENTS as usize,
        takeovers,
        claims,
        checkpoint_samples: samples,
    }
}
