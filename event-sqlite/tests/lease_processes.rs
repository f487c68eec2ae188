//! Segment leases across real processes on one SQLite file: four children (this test
//! binary, started again) claim and renew the 16 segments of one subscription; one is
//! SIGKILLed; the others take its segments over once its leases expire. Every claim and
//! renewal the children report is checked: no two owners ever held one segment at once,
//! and each epoch belongs to one owner. A save with the killed child's last lease, made
//! from this (another) process, is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use eventfold_core::lease::{LeaseStore, SegmentLease};
use eventfold_core::{Error, SubscriptionStore};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

const CHILD_DATABASE: &str = "EVENTFOLD_SQLITE_LEASE_CHILD_DATABASE";
const CHILD_MEMBER: &str = "EVENTFOLD_SQLITE_LEASE_CHILD_MEMBER";
const SUBSCRIPTION: &str = "positions";
const SEGMENTS: u32 = 16;
const MEMBERS: usize = 4;
/// The children's lease and membership time; they renew every [`TICK`].
const TTL: Duration = Duration::from_millis(1_500);
const TICK: Duration = Duration::from_millis(100);
/// How long the test waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The child's work: a member of the subscription until killed. It heartbeats, claims its
/// share of the segments (16 over the live members, rounded up), renews what it holds and
/// saves a checkpoint on each, printing every lease it holds (`lease <segment> <epoch>
/// <expiry in ns>`) after each claim or renewal, and each one it loses. Does nothing in a
/// normal test run.
#[test]
fn lease_member_entry() {
    let (Ok(path), Ok(member)) = (std::env::var(CHILD_DATABASE), std::env::var(CHILD_MEMBER))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap();
        let mut held: BTreeMap<u32, SegmentLease> = BTreeMap::new();
        let mut position = 0;
        loop {
            let members = store.heartbeat(SUBSCRIPTION, &member, TTL).await.unwrap();
            // Waits for the others before the first claim, so the segments are split.
            if members.len() >= MEMBERS || !held.is_empty() {
                let share = SEGMENTS.div_ceil(members.len() as u32);
                let want = share.saturating_sub(held.len() as u32);
                let leases: Vec<SegmentLease> = held.values().cloned().collect();
                let renewed = store.renew_leases(&leases, TTL).await.unwrap();
                let kept: BTreeSet<u32> = renewed.iter().map(|l| l.segment).collect();
                for lost in leases.iter().filter(|l| !kept.contains(&l.segment)) {
                    println!("lost {} {}", lost.segment, lost.epoch);
                    held.remove(&lost.segment);
                }
                for lease in renewed {
                    held.insert(lease.segment, lease);
                }
                if want > 0 {
                    let claimed = store
                        .claim_segments(SUBSCRIPTION, &member, SEGMENTS, want, TTL)
                        .await
                        .unwrap();
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
                        lease.expires_at.timestamp_nanos_opt().unwrap()
                    );
                }
            }
            tokio::time::sleep(TICK).await;
        }
    });
}

/// One line a child printed.
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
            segment: segment.parse().unwrap(),
            epoch: epoch.parse().unwrap(),
            expires_at: DateTime::from_timestamp_nanos(expires.parse().unwrap()),
        }),
        ["lost", _, _] => Some(Report::Lost),
        _ => None,
    }
}

fn spawn_member(path: &Path, member: usize, reports: mpsc::Sender<Report>) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lease_member_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DATABASE, path)
        .env(CHILD_MEMBER, format!("member-{member}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if let Some(report) = parse(member, &line)
                && reports.send(report).is_err()
            {
                break;
            }
        }
    });
    child
}

/// One lease as the children reported it.
#[derive(Debug, Clone, Copy)]
struct Held {
    member: usize,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

/// Everything the children reported, and who holds each segment by their last reports.
#[derive(Default)]
struct Seen {
    /// Per segment and epoch: its owner, its first reported expiry (its claim time plus
    /// the ttl: a child reports a lease first in the tick it claims it) and its latest.
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
        reports: &mpsc::Receiver<Report>,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                Ok(report) => self.take(report),
                Err(_) => {
                    // A broken lease is the likelier cause: say so first.
                    self.assert_no_overlap();
                    panic!("{what}: not reached after {DEADLINE:?}")
                }
            }
        }
    }

    /// No two epochs of one segment were live at once: each lease was claimed (its first
    /// expiry less the ttl, on the store's clock) no earlier than the lease before it last
    /// expired. Returns how many takeovers (a segment going to another owner) it saw.
    fn assert_no_overlap(&self) -> usize {
        let ttl = chrono::Duration::from_std(TTL).unwrap();
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

/// The children, killed when the test ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn four_processes_split_sixteen_segments_and_take_over_a_killed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime
        .block_on(SqliteEventStore::open(&path, SqliteOptions::new()))
        .unwrap();

    let (send, reports) = mpsc::channel();
    let mut children = Children(
        (0..MEMBERS)
            .map(|member| spawn_member(&path, member, send.clone()))
            .collect(),
    );
    drop(send);
    let mut seen = Seen::default();
    seen.wait_until(&reports, "every member holds segments", |seen| {
        seen.holder.len() == SEGMENTS as usize && (0..MEMBERS).all(|m| !seen.held_by(m).is_empty())
    });

    // SIGKILL member 0; its last lease on its first segment is kept for a late save.
    let victim = 0;
    children.0[victim].kill().expect("SIGKILL");
    children.0[victim].wait().unwrap();
    while let Ok(report) = reports.try_recv() {
        seen.take(report);
    }
    let orphaned = seen.held_by(victim);
    let (segment, epoch) = orphaned[0];
    let expires_at = seen.leases[&(segment, epoch)].last;
    let late = SegmentLease {
        subscription: SUBSCRIPTION.to_owned(),
        segment,
        segments: SEGMENTS,
        owner: format!("member-{victim}"),
        epoch,
        expires_at,
        checkpoint: 0,
    };

    seen.wait_until(
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

    for child in &mut children.0[1..] {
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
    // The killed member's late save, from another process (this one, with every child
    // gone so nothing else writes), is refused and changes nothing.
    let name = late.checkpoint_name();
    let before = runtime.block_on(store.load_checkpoint(&name)).unwrap();
    match runtime.block_on(store.save_segment_checkpoint(&late, u64::MAX >> 1)) {
        Err(Error::LeaseLost {
            segment: s,
            epoch: e,
            ..
        }) => assert_eq!((s, e), (segment, epoch)),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert_eq!(
        runtime.block_on(store.load_checkpoint(&name)).unwrap(),
        before
    );
    assert!(before.is_some(), "the new owner saved checkpoints");

    // The rest of what they printed.
    for report in reports.iter() {
        seen.take(report);
    }
    let takeovers = seen.assert_no_overlap();
    assert!(takeovers >= orphaned.len(), "{takeovers} takeovers");
    let states = runtime
        .block_on(store.segment_states(SUBSCRIPTION))
        .unwrap();
    assert_eq!(states.len(), SEGMENTS as usize);
    for &(segment, epoch) in &orphaned {
        assert!(states[segment as usize].epoch > epoch);
    }
    eprintln!(
        "{} reports, {} leases, {takeovers} takeovers, {} losses; member-{victim} held {:?}",
        seen.reports,
        seen.leases.len(),
        seen.lost,
        orphaned
    );
    runtime.block_on(store.close()).unwrap();
}
