//! `verify`, `backup` and `archive export|verify|prune|restore`: the long commands, with
//! progress bars on a terminal. `archive prune` and `archive restore` change the store.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use eventfold::archive::{self, ArchiveManifest, ArchiveRange, ArchiveState, Progress};
use eventfold::{Error, StreamId};
use serde::Serialize;

use crate::Outcome;
use crate::error::{CliError, Result};
use crate::output;
use crate::store::Store;

/// Events per read of the PostgreSQL scan.
const PAGE: usize = 4_096;

#[derive(Serialize)]
struct VerifyView {
    clean: bool,
    events: u64,
    /// What each check covers on this backend.
    checks: &'static str,
    damaged: Vec<Damaged>,
    gaps: Vec<String>,
    integrity: Vec<String>,
}

#[derive(Serialize)]
struct Damaged {
    position: Option<u64>,
    event_id: Option<String>,
    problems: Vec<String>,
}

/// `verify`: on SQLite the store's own check (every row's checksum, the numbering,
/// `PRAGMA integrity_check`); on PostgreSQL, which keeps no checksums, a scan of the log
/// that every row reads back and that positions and versions run without gaps. Exit code
/// 1 when anything is found.
pub async fn verify(store: &Store, json: bool, out: &mut impl Write) -> Result<Outcome> {
    let view = match store {
        Store::Sqlite(sqlite) => {
            let bar = output::progress("verifying", 0);
            let report = sqlite
                .verify_with_progress({
                    let bar = bar.clone();
                    move |p| {
                        bar.set_length(p.total);
                        bar.set_position(p.done);
                    }
                })
                .await?;
            bar.finish_and_clear();
            VerifyView {
                clean: report.is_clean(),
                events: report.events,
                checks: "checksums of every event row, positions and versions, SQLite integrity_check",
                damaged: report
                    .damaged
                    .into_iter()
                    .map(|d| Damaged {
                        position: d.position,
                        event_id: d.event_id.map(|id| id.to_string()),
                        problems: d.problems,
                    })
                    .collect(),
                gaps: report.gaps,
                integrity: report.integrity,
            }
        }
        Store::Postgres(_) => scan_numbering(store).await?,
    };
    if json {
        output::json(out, &view)?;
    } else {
        writeln!(out, "checked:  {}", view.checks)?;
        writeln!(out, "events:   {}", view.events)?;
        for d in &view.damaged {
            let at = d.position.map_or_else(|| "?".to_owned(), |p| p.to_string());
            writeln!(out, "damaged:  position {at}: {}", d.problems.join("; "))?;
        }
        for gap in &view.gaps {
            writeln!(out, "gap:      {gap}")?;
        }
        for message in &view.integrity {
            writeln!(out, "file:     {message}")?;
        }
        writeln!(
            out,
            "result:   {}",
            if view.clean { "clean" } else { "DAMAGED" }
        )?;
    }
    Ok(if view.clean {
        Outcome::Done
    } else {
        Outcome::Finding
    })
}

/// The PostgreSQL check: reads every stored event and checks the numbering; positions and
/// versions that a pruned archive holds (the archive horizon) are not gaps.
async fn scan_numbering(store: &Store) -> Result<VerifyView> {
    let events = store.events();
    let head = events.head_position().await?;
    let horizon = store.archive().archive_horizon().await?;
    let mut spans: Vec<(u64, u64)> = horizon
        .iter()
        .map(|h| (h.first_position, h.last_position))
        .collect();
    spans.sort_unstable();
    // True when every position of `first..=last` lies in an archive's span.
    let pruned = |first: u64, last: u64| {
        let mut next = first;
        for &(from, to) in &spans {
            if from > next {
                break;
            }
            next = next.max(to.saturating_add(1));
        }
        next > last
    };
    let bar = output::progress("verifying", head);
    // A stream goes on from its last pruned version.
    let mut versions: HashMap<StreamId, u64> = HashMap::new();
    for stream in horizon.iter().flat_map(|h| &h.streams) {
        let version = versions.entry(stream.stream.clone()).or_insert(0);
        *version = (*version).max(stream.last_version);
    }
    let mut gaps = Vec::new();
    let mut integrity = Vec::new();
    let mut expected = 1;
    let mut count = 0;
    while expected <= head {
        let page = match store.archive().read_stored(expected, PAGE).await {
            Ok(page) => page,
            Err(error) => {
                integrity.push(format!(
                    "the log cannot be read from position {expected}: {}",
                    eventfold::backend::error_chain(&error)
                ));
                break;
            }
        };
        let Some(last) = page.last().map(|e| e.position) else {
            if !pruned(expected, head) {
                gaps.push(format!("positions {expected} to {head} are missing"));
            }
            break;
        };
        for event in &page {
            if event.position != expected && !pruned(expected, event.position - 1) {
                gaps.push(format!(
                    "positions {expected} to {} are missing",
                    event.position - 1
                ));
            }
            expected = event.position + 1;
            let version = versions.entry(event.stream_id()).or_insert(0);
            if event.version != *version + 1 {
                gaps.push(format!(
                    "stream {} goes from version {} to {}",
                    event.stream_id(),
                    version,
                    event.version
                ));
            }
            *version = event.version;
            count += 1;
        }
        bar.set_position(last);
    }
    bar.finish_and_clear();
    Ok(VerifyView {
        clean: gaps.is_empty() && integrity.is_empty(),
        events: count,
        checks: "every event reads back; positions and versions without gaps (PostgreSQL keeps no checksums)",
        damaged: Vec::new(),
        gaps,
        integrity,
    })
}

#[derive(Serialize)]
struct BackupView {
    backup: String,
    bytes: u64,
}

/// `backup PATH`: SQLite's online backup into a new file. A proper backup of a server
/// database is `pg_dump`'s job (`pg_dump --schema=SCHEMA`, or a base backup): on
/// PostgreSQL the command says so and exits 2.
pub async fn backup(
    store: &Store,
    path: &Path,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let sqlite = match store {
        Store::Sqlite(sqlite) => sqlite,
        Store::Postgres(postgres) => {
            return Err(CliError::Unsupported(format!(
                "backup of a PostgreSQL store is pg_dump's job: `pg_dump --schema={}` \
                 (or a base backup of the server); this command backs up SQLite files",
                postgres.options().schema_name()
            )));
        }
    };
    let bar = output::spinner("backing up");
    sqlite.backup(path).await?;
    bar.finish_and_clear();
    let view = BackupView {
        backup: path.display().to_string(),
        bytes: std::fs::metadata(path)?.len(),
    };
    if json {
        output::json(out, &view)?;
    } else {
        writeln!(
            out,
            "backed up to {} ({})",
            view.backup,
            output::bytes(view.bytes)
        )?;
    }
    Ok(Outcome::Done)
}

/// What the archive subcommands do.
pub enum ArchiveAction {
    /// Export the range to a new file.
    Export(ArchiveRange),
    /// Check the file against the store.
    Verify,
    /// Remove the file's events from the store.
    Prune,
    /// Bring them back.
    Restore,
}

#[derive(Serialize)]
struct ArchiveView {
    action: &'static str,
    path: String,
    /// `stored` or `pruned`, after a verify.
    state: Option<&'static str>,
    manifest: Option<ArchiveManifest>,
    /// The finding of a verify that failed.
    finding: Option<String>,
}

/// `archive export|verify|prune|restore PATH`, with the library's archive API, on either
/// backend. An archive that `verify` finds damaged or different from the store is a
/// finding (exit 1); a store without archiving (`Unsupported`) is exit 2.
pub async fn archive(
    store: &Store,
    action: ArchiveAction,
    path: &Path,
    json: bool,
    out: &mut impl Write,
) -> Result<Outcome> {
    let (name, what) = match &action {
        ArchiveAction::Export(_) => ("export", "exporting"),
        ArchiveAction::Verify => ("verify", "verifying"),
        ArchiveAction::Prune => ("prune", "pruning"),
        ArchiveAction::Restore => ("restore", "restoring"),
    };
    let bar = output::progress(what, 0);
    let mut progress = |p: Progress| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let archive_store = store.archive();
    let result = match action {
        ArchiveAction::Export(range) => archive::export(archive_store, range, path, &mut progress)
            .await
            .map(|m| (m, None)),
        ArchiveAction::Verify => archive::verify(archive_store, path, &mut progress)
            .await
            .map(|v| (v.manifest, Some(v.state))),
        ArchiveAction::Prune => archive::prune(archive_store, path, &mut progress)
            .await
            .map(|m| (m, None)),
        ArchiveAction::Restore => archive::restore(archive_store, path, &mut progress)
            .await
            .map(|m| (m, None)),
    };
    bar.finish_and_clear();
    let mut view = ArchiveView {
        action: name,
        path: path.display().to_string(),
        state: None,
        manifest: None,
        finding: None,
    };
    let outcome = match result {
        Ok((manifest, state)) => {
            view.state = state.map(|s| match s {
                ArchiveState::Stored => "stored",
                ArchiveState::Pruned => "pruned",
                _ => "other",
            });
            view.manifest = Some(manifest);
            Outcome::Done
        }
        Err(error @ (Error::ArchiveDamaged { .. } | Error::ArchiveMismatch { .. }))
            if name == "verify" =>
        {
            view.finding = Some(eventfold::backend::error_chain(&error));
            Outcome::Finding
        }
        Err(Error::Unsupported { operation, store }) => {
            return Err(CliError::Unsupported(format!(
                "archive {name}: the {store} store has no archiving ({operation})"
            )));
        }
        Err(error) => return Err(error.into()),
    };
    if json {
        output::json(out, &view)?;
        return Ok(outcome);
    }
    if let Some(finding) = &view.finding {
        writeln!(out, "{path}: {finding}", path = view.path)?;
        return Ok(outcome);
    }
    let m = view.manifest.as_ref().expect("a manifest when no finding");
    let range = |first: Option<u64>, last: Option<u64>| match (first, last) {
        (Some(f), Some(l)) => format!("{f}..={l}"),
        _ => "-".to_owned(),
    };
    let mut fields = vec![
        ("archive", m.archive.to_string()),
        ("file", view.path.clone()),
        ("events", m.events.to_string()),
        ("positions", range(m.first_position, m.last_position)),
        ("checksum", m.checksum.clone()),
        ("created", output::time(m.created_at)),
    ];
    if let Some(state) = view.state {
        fields.push(("state", state.to_owned()));
    }
    writeln!(out, "{name}: done")?;
    output::fields(out, &fields)?;
    Ok(outcome)
}
