//! `dlq replay`: stores replay requests for the running services to carry out, and, with
//! `--wait`, waits for their outcomes.
//!
//! A replay runs the subscription's handler, which only the service that registers it
//! has: the command stores a request (`SubscriptionStore::request_replay`), and the
//! service's bus that runs the subscription carries it out after its next lease round
//! (within a third of its lease time, 10 s by default, plus the replay itself) and records
//! the outcome. `--wait` reads the request again every [`POLL`] until it has finished or
//! `--timeout` has passed.

use std::io::Write;
use std::time::Duration;

use eventfold::{EventStore, ReplayOutcome, ReplayRequest, ReplayTarget};
use serde::Serialize;

use crate::Outcome;
use crate::error::{CliError, Result};
use crate::output::{self, Table};
use crate::store::Store;

/// How often `--wait` reads a request again: a separate process cannot be woken by the
/// bus, and one indexed read this often costs the store next to nothing.
pub const POLL: Duration = Duration::from_millis(200);

/// What `dlq replay` asks for, from its arguments.
pub fn target(id: Option<u64>, subscription: Option<String>) -> ReplayTarget {
    match (id, subscription) {
        (Some(id), _) => ReplayTarget::DeadLetter { id },
        (None, Some(name)) => ReplayTarget::Subscription { name },
        (None, None) => ReplayTarget::All,
    }
}

#[derive(Serialize)]
struct Requested {
    /// The requests as stored, or, with `--wait`, as they ended (or still pending at the
    /// timeout).
    requests: Vec<ReplayRequest>,
    /// With `--wait`: true if a request was still pending at the timeout.
    timed_out: bool,
}

/// `dlq replay`: stores the request(s); with `wait`, waits up to it for their outcomes.
/// Exit code 1 if a replay failed (or kept dead letters) or did not finish in time.
pub async fn replay(
    store: &Store,
    target: ReplayTarget,
    wait: Option<Duration>,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let events = store.events();
    let mut requests = events.request_replay(target, chrono::Utc::now()).await?;
    let mut timed_out = false;
    if let Some(timeout) = wait {
        let spinner = output::spinner("waiting for the running service to replay");
        timed_out = !wait_for(&*events, &mut requests, timeout).await?;
        spinner.finish_and_clear();
    }
    let finding = timed_out
        || requests
            .iter()
            .any(|r| r.finished.as_ref().is_some_and(|f| !f.outcome.is_success()));
    if json {
        output::json(
            out,
            &Requested {
                requests,
                timed_out,
            },
        )?;
    } else if requests.is_empty() {
        writeln!(out, "no dead letters to replay")?;
    } else {
        print_requests(out, &requests)?;
        if timed_out {
            writeln!(
                out,
                "\nstill pending: no running service carried it out in time (is the \
                 subscription's service running?); it stays stored and runs when one does"
            )?;
        } else if wait.is_none() {
            writeln!(
                out,
                "\npending: the service running the subscription replays it after its next \
                 lease round; see `dlq show --request ID`"
            )?;
        }
    }
    Ok(if finding {
        Outcome::Finding
    } else {
        Outcome::Done
    })
}

/// Reads the requests again every [`POLL`] until each has finished (true) or `timeout`
/// has passed (false); `requests` then holds them as last read.
async fn wait_for(
    events: &dyn EventStore,
    requests: &mut [ReplayRequest],
    timeout: Duration,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        for request in requests.iter_mut().filter(|r| r.is_pending()) {
            match events.replay_request(request.id).await? {
                Some(now) => *request = now,
                None => {
                    return Err(CliError::Usage(format!(
                        "replay request {} is no longer stored",
                        request.id
                    )));
                }
            }
        }
        if requests.iter().all(|r| !r.is_pending()) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL)).await;
    }
}

/// A request's state in a word or two, and its outcome.
pub fn status(request: &ReplayRequest) -> (String, String) {
    match &request.finished {
        None => ("pending".to_owned(), "-".to_owned()),
        Some(finished) => match &finished.outcome {
            ReplayOutcome::Done {
                replayed,
                failed,
                held_back,
            } => (
                "done".to_owned(),
                format!("{replayed} replayed, {failed} failed, {held_back} held back"),
            ),
            ReplayOutcome::Failed { reason } => ("failed".to_owned(), reason.clone()),
        },
    }
}

/// Replay requests as a table.
pub fn print_requests(out: &mut impl Write, requests: &[ReplayRequest]) -> Result<()> {
    let mut table = Table::new(&[
        "REQUEST",
        "SUBSCRIPTION",
        "DEAD LETTER",
        "REQUESTED",
        "STATUS",
        "OUTCOME",
    ]);
    for r in requests {
        let (state, outcome) = status(r);
        table.row(vec![
            r.id.to_string(),
            r.subscription.clone(),
            r.dead_letter
                .map_or_else(|| "all".to_owned(), |id| id.to_string()),
            output::time(r.requested_at),
            state,
            outcome,
        ]);
    }
    table.print(out)
}

/// `dlq show --request ID`: a replay request and its outcome; exit code 1 if it failed.
pub async fn request_show(
    store: &Store,
    id: u64,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let request = store
        .events()
        .replay_request(id)
        .await?
        .ok_or_else(|| CliError::Usage(format!("no replay request with id {id}")))?;
    let failed = request
        .finished
        .as_ref()
        .is_some_and(|f| !f.outcome.is_success());
    if json {
        output::json(out, &request)?;
    } else {
        let (state, outcome) = status(&request);
        output::fields(
            out,
            &[
                ("replay request", request.id.to_string()),
                ("subscription", request.subscription.clone()),
                (
                    "dead letter",
                    request
                        .dead_letter
                        .map_or_else(|| "all".to_owned(), |id| id.to_string()),
                ),
                ("requested", output::time(request.requested_at)),
                ("status", state),
                ("outcome", outcome),
                (
                    "finished",
                    request
                        .finished
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |f| output::time(f.at)),
                ),
            ],
        )?;
    }
    Ok(if failed {
        Outcome::Finding
    } else {
        Outcome::Done
    })
}
