//! Segment leases across real processes: the member a child process runs, and the
//! scenario its parent checks (feature `testing`). A backend's test starts its own test
//! binary again as children that call [`run_member`] on a store of the shared database,
//! and runs [`kill_and_take_over`] in the parent: the children split the segments, one is
//! SIGKILLed, the others take its segments over once its leases expire; every lease they
//! report is checked (no two owners of one segment at once, one owner per epoch) and a
//! save with the killed child's last lease, from the parent, must be refused.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::lease::{LeaseStore, SegmentLease};
use crate::store::EventStore;

/// What the members of a scenario do.
#[derive(Debug, Clone)]
pub struct MemberPlan {
    /// The subscription they share.
    pub subscription: String,
    /// Its segment count.
    pub segments: u32,
    /// How many members there are: each waits to see them all before its first claim, so
    /// the segments are split.
    pub members: usize,
    /// Their lease and membership time.
    pub ttl: Duration,
    /// How often they heartbeat, renew, claim and save.
    pub tick: Duration,
    /// How long the parent waits for a condition before it fails.
    pub deadline: Duration,
}

impl Default for MemberPlan {
    /// 16 segments of `positions` over 4 members, 1.5 s leases renewed every 100 ms.
    fn default() -> Self {
        MemberPlan {
            subscription: "positions".to_owned(),
            segments: 16,
            members: 4,
            ttl: Duration::from_millis(1_500),
            tick: Duration::from_millis(100),
            deadline: Duration::from_secs(60),
        }
    }
}

/// A member until its process is killed: it heartbeats, claims its share of the segments
/// (the count over the live members, rounded up), renews what it holds and saves a
/// checkpoint on each, printing to stdout every lease it holds (`lease <segment> <epoch>
/// <expiry in ns>`) after each round, and each one it loses (`lost <segment> <epoch>`).
/// Panics on any other error than a lost lease.
pub async fn run_member(store: &dyn LeaseStore, plan: &MemberPlan, member: &str) {
    let subscription = plan.subscription.as_str();
    let mut held: BTreeMap<u32, SegmentLease> = BTreeMap::new();
    let mut position = 0;
    loop {
        let members = store
            .heartbeat(subscription, member, plan.ttl)
            .await
            .expect("a heartbeat");
        if members.len() >= plan.members || !held.is_empty() {
            let share = plan.segments.div_ceil(members.len() as u32);
            let leases: Vec<SegmentLease> = held.values().cloned().collect();
            let renewed = store
                .renew_leases(&leases, plan.ttl)
                .await
                .expect("a renewal");
            let kept: BTreeSet<u32> = renewed.iter().map(|l| l.segment).collect();
            for lost in leases.iter().filter(|l| !kept.contains(&l.segment)) {
                println!("lost {} {}", lost.segment, lost.epoch);
                held.remove(&lost.segment);
            }
            for lease in renewed {
                held.insert(lease.segment, lease);
            }
            let want = share.saturating_sub(held.len() as u32);
            if want > 0 {
                let claimed = store
                    .claim_segments(subscription, member, plan.segments, want, plan.ttl)
                    .await
                    .expect("a claim");
                for lease in claimed {
                    held.insert(lease.segment, lease);
                }
            }
            position += 1;
            let mut refused = Vec::new();
            for lease in held.values() {
                match store.save_segment_checkpoint(lease, position).await {
                    Ok(()) => {}
                    Err(Error::LeaseLost { segment, epoch, .. }) => {
                        println!("lost {segment} {epoch}");
                        refused.push(segment);
                    }
                    Err(other) => panic!("a save failed: {other}"),
                }
            }
            for segment in refused {
                held.remove(&segment);
            }
            for lease in held.values() {
                println!(
                    "lease {} {} {}",
                    lease.segment,
                    lease.epoch,
                    lease.expires_at.timestamp_nanos_opt().unwrap_or(i64::MAX)
                );
            }
        }
        tokio::time::sleep(plan.tick).await;
    }
}

/// One line a member printed.
enum Report {
    Lease {
        member: usize,
        segment: u32,
        epoch: u64,
        expires_at: DateTime<Utc>,
    },
    Lost,
}

fn parse(member: usize, line: &str) -> Option<Report> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["lease", segment, epoch, expires] => Some(Report::Lease {
            member,
            segment: segment.parse().ok()?,
            epoch: epoch.parse().ok()?,
            expires_at: DateTime::from_timestamp_nanos(expires.parse().ok()?),
        }),
        ["lost", _, _] => Some(Report::Lost),
        _ => None,
    }
}

/// One lease as the members reported it.
#[derive(Debug, Clone, Copy)]
struct Held {
    member: usize,
    /// Its first reported expiry: its claim time plus the ttl (a member reports a lease
    /// first in the round it claims it).
    first: DateTime<Utc>,
    /// Its latest reported expiry.
    last: DateTime<Utc>,
}

/// Everything the members reported, and who holds each segment by their last reports.
#[derive(Default)]
struct Seen {
    leases: BTreeMap<(u32, u64), Held>,
    /// Per segment: the owner and epoch of its newest lease.
    holder: BTreeMap<u32, (usize, u64)>,
    reports: u64,
    lost: u64,
}

impl Seen {
    fn take(&mut self, report: Report) {
        self.reports += 1;
        let Report::Lease {
            member,
            segment,
            epoch,
            expires_at,
        } = report
        else {
            self.lost += 1;
            return;
        };
        let entry = self.leases.entry((segment, epoch)).or_insert(Held {
            member,
            first: expires_at,
            last: expires_at,
        });
        assert_eq!(
            entry.member, member,
            "segment {segment} epoch {epoch} is held by member-{} and member-{member}",
            entry.member
        );
        entry.last = entry.last.max(expires_at);
        let newest = self.holder.entry(segment).or_insert((member, epoch));
        if epoch >= newest.1 {
            *newest = (member, epoch);
        }
    }

    /// The segments whose newest lease `member` holds.
    fn held_by(&self, member: usize) -> Vec<(u32, u64)> {
        self.holder
            .iter()
            .filter(|(_, (owner, _))| *owner == member)
            .map(|(&segment, &(_, epoch))| (segment, epoch))
            .collect()
    }

    /// Takes reports until `done` holds; fails after [`DEADLINE`].
    fn wait_until(
        &mut self,
        plan: &MemberPlan,
        reports: &mpsc::Receiver<Report>,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + plan.deadline;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                Ok(report) => self.take(report),
                Err(_) => {
                    // A broken lease is the likelier cause: say so first.
                    self.assert_no_overlap(plan);
                    panic!("{what}: not reached after {:?}", plan.deadline)
                }
            }
        }
    }

    /// No two epochs of one segment were live at once: each lease was claimed (its first
    /// expiry less the ttl, on the store's clock) no earlier than the lease before it last
    /// expired. Returns how many takeovers (a segment going to another owner) it saw.
    fn assert_no_overlap(&self, plan: &MemberPlan) -> usize {
        let ttl = chrono::Duration::from_std(plan.ttl).expect("a ttl chrono can hold");
        let mut takeovers = 0;
        let mut previous: Option<(u32, u64, usize, DateTime<Utc>)> = None;
        for (
            &(segment, epoch),
            &Held {
                member,
                first,
                last,
            },
        ) in &self.leases
        {
            if let Some((seg, prev_epoch, prev_member, prev_last)) = previous
                && seg == segment
            {
                let claimed_at = first - ttl;
                assert!(
                    claimed_at >= prev_last,
                    "segment {segment}: epoch {epoch} (member-{member}) claimed at \
                     {claimed_at} while epoch {prev_epoch} (member-{prev_member}) was live \
                     until {prev_last}"
                );
                if prev_member != member {
                    takeovers += 1;
                }
            }
            previous = Some((segment, epoch, member, last));
        }
        takeovers
    }
}

/// The children, killed when the scenario ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What [`kill_and_take_over`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Lines the members printed.
    pub reports: u64,
    /// Leases seen (segment and epoch pairs).
    pub leases: usize,
    /// Times a segment went to another member.
    pub takeovers: usize,
    /// Leases the members reported lost.
    pub lost: u64,
    /// The member killed.
    pub victim: usize,
    /// The segments and epochs the killed member held by its last reports.
    pub orphaned: Vec<(u32, u64)>,
}

/// The scenario: starts `plan.members` children with `spawn(i)` (each a process that runs
/// [`run_member`] as `member-{i}`, with its stdout piped), waits until they hold every
/// segment, SIGKILLs the member holding the most, waits until its segments are held by
/// others with higher epochs, kills the rest, and then checks, on `store` (of the same database) run by
/// `runtime`: a save with the killed member's last lease is [`Error::LeaseLost`] and
/// leaves the checkpoint; over every report, each lease had one owner and none was claimed
/// before the one before it expired; the store's epochs of the orphaned segments rose.
/// Panics when a check fails or a wait passes `plan.deadline`.
pub fn kill_and_take_over(
    plan: &MemberPlan,
    runtime: &tokio::runtime::Runtime,
    store: Arc<dyn EventStore>,
    spawn: impl Fn(usize) -> Child,
) -> TakeoverReport {
    let (send, reports) = mpsc::channel();
    let mut children = Children(
        (0..plan.members)
            .map(|member| {
                let mut child = spawn(member);
                let stdout = BufReader::new(child.stdout.take().expect("a piped stdout"));
                let send = send.clone();
                std::thread::spawn(move || {
                    for line in stdout.lines() {
                        let Ok(line) = line else { break };
                        if let Some(report) = parse(member, &line)
                            && send.send(report).is_err()
                        {
                            break;
                        }
                    }
                });
                child
            })
            .collect(),
    );
    drop(send);
    let mut seen = Seen::default();
    seen.wait_until(plan, &reports, "every member holds segments", |seen| {
        seen.holder.len() == plan.segments as usize
            && (0..plan.members).all(|m| !seen.held_by(m).is_empty())
    });

    // The member holding the most segments goes.
    let victim = (0..plan.members)
        .max_by_key(|&m| seen.held_by(m).len())
        .unwrap_or(0);
    children.0[victim].kill().expect("SIGKILL");
    children.0[victim]
        .wait()
        .expect("the killed child is reaped");
    while let Ok(report) = reports.try_recv() {
        seen.take(report);
    }
    let orphaned = seen.held_by(victim);
    let Some(&(segment, epoch)) = orphaned.first() else {
        panic!("member-{victim} held no segment when it was killed");
    };
    let late = SegmentLease {
        subscription: plan.subscription.clone(),
        segment,
        segments: plan.segments,
        owner: format!("member-{victim}"),
        epoch,
        expires_at: seen.leases[&(segment, epoch)].last,
        checkpoint: 0,
    };
    seen.wait_until(
        plan,
        &reports,
        "the killed member's segments are taken over",
        |seen| {
            orphaned.iter().all(|&(segment, epoch)| {
                seen.holder
                    .get(&segment)
                    .is_some_and(|&(owner, newest)| owner != victim && newest > epoch)
            })
        },
    );
    for (member, child) in children.0.iter_mut().enumerate() {
        if member != victim {
            child.kill().expect("SIGKILL");
            child.wait().expect("a killed child is reaped");
        }
    }

    // The killed member's late save, from another process (this one, with every child
    // gone so nothing else writes), is refused and changes nothing.
    let name = late.checkpoint_name();
    let before = runtime
        .block_on(store.load_checkpoint(&name))
        .expect("a checkpoint load");
    assert!(before.is_some(), "the new owner saved checkpoints");
    match runtime.block_on(store.save_segment_checkpoint(&late, u64::MAX >> 1)) {
        Err(Error::LeaseLost {
            segment: s,
            epoch: e,
            ..
        }) => assert_eq!((s, e), (segment, epoch)),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert_eq!(
        runtime
            .block_on(store.load_checkpoint(&name))
            .expect("a checkpoint load"),
        before
    );

    // The rest of what they printed, until every reader has seen its pipe close.
    let deadline = Instant::now() + plan.deadline;
    loop {
        match reports.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(report) => seen.take(report),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "a killed member's output is still open after {:?}",
                    plan.deadline
                )
            }
        }
    }
    let takeovers = seen.assert_no_overlap(plan);
    assert!(takeovers >= orphaned.len(), "{takeovers} takeovers");
    let states = runtime
        .block_on(store.segment_states(&plan.subscription))
        .expect("segment states");
    assert_eq!(states.len(), plan.segments as usize);
    for &(segment, epoch) in &orphaned {
        assert!(states[segment as usize].epoch > epoch, "{states:?}");
    }
    TakeoverReport {
        reports: seen.reports,
        leases: seen.leases.len(),
        takeovers,
        lost: seen.lost,
        victim,
        orphaned,
    }
}
