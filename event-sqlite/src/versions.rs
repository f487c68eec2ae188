//! The versions the writer's committed appends left their streams at, so that an append
//! that expects its stream at the version the writer knows skips the version probe (a
//! query of its own, about a fifth of the writer's instructions per one-event append).
//!
//! A known version is never ahead of the stream: it is taken from appends only once their
//! transaction committed, and versions only grow. Everything is forgotten when another
//! connection committed (SQLite's `data_version` moved) or this connection changed the
//! database outside the writer's transactions (its total change count moved: work run on
//! the writer connection), and when the writer checks its connection after a failure. A
//! stream is looked up at most once per transaction: an append after the first to the
//! same stream in one transaction probes. A known version behind the stream is harmless:
//! the insert at the next version then breaks the stream's unique version, stores
//! nothing, and the append is judged again with the probe.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use eventfold_core::StreamId;

/// Streams kept at most; beyond, the writer starts over (a stream not kept probes).
const CAPACITY: usize = 1 << 16;

/// Hashes a map key that is already a hash (XXH3 of the stream) by passing it through:
/// hashing it again cost a few hundred instructions per append and look-up.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else is folded in byte by byte.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// A stream's known version.
struct Known {
    stream: StreamId,
    version: u64,
    /// The transaction that last looked it up.
    looked_up_in: u64,
}

/// The known versions, by [`checksum::stream_hash`](crate::checksum::stream_hash) (an
/// entry holds its stream, so two streams of one hash are told apart).
#[derive(Default)]
pub(crate) struct StreamVersions {
    known: HashMap<u64, Known, BuildHasherDefault<PassThrough>>,
    /// Counts the writer's transactions.
    transaction: u64,
    /// SQLite's `data_version` and the connection's total change count after the last
    /// commit (`None`: nothing is known).
    seen: Option<(i64, u64)>,
    /// The `data_version` of the open transaction.
    data_version: i64,
}

impl StreamVersions {
    /// Starts a transaction, given the connection's `data_version` and total change count
    /// read in it: forgets everything if either moved since the last commit.
    pub(crate) fn begin(&mut self, data_version: i64, total_changes: u64) {
        self.transaction += 1;
        if self.seen != Some((data_version, total_changes)) {
            self.forget();
        }
        self.data_version = data_version;
    }

    /// True when `stream` (of hash `hash`) is known at `expected` and was not looked up
    /// yet in this transaction. Every append looks its stream up, whatever it expects, so
    /// that a later append to it in the same transaction probes.
    pub(crate) fn at(&mut self, hash: u64, stream: &StreamId, expected: Option<u64>) -> bool {
        match self.known.get_mut(&hash) {
            Some(known) if known.stream == *stream => {
                let first = known.looked_up_in != self.transaction;
                known.looked_up_in = self.transaction;
                first && Some(known.version) == expected
            }
            _ => false,
        }
    }

    /// After a commit: `stream` is at least at `version`.
    pub(crate) fn committed(&mut self, hash: u64, stream: &StreamId, version: u64) {
        match self.known.get_mut(&hash) {
            Some(known) if known.stream == *stream => known.version = known.version.max(version),
            _ => {
                if self.known.len() >= CAPACITY {
                    self.known.clear();
                }
                self.known.insert(
                    hash,
                    Known {
                        stream: stream.clone(),
                        version,
                        looked_up_in: 0,
                    },
                );
            }
        }
    }

    /// After a commit: the connection's total change count now (its `data_version` is the
    /// one [`begin`](Self::begin) read: a connection's own commits leave it).
    pub(crate) fn seen(&mut self, total_changes: u64) {
        self.seen = Some((self.data_version, total_changes));
    }

    /// Forgets every known version.
    pub(crate) fn forget(&mut self) {
        self.known.clear();
        self.seen = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_known_once_per_transaction_and_only_at_its_committed_version() {
        let stream = StreamId::new("Note", "a");
        let mut versions = StreamVersions::default();
        versions.begin(1, 0);
        assert!(!versions.at(7, &stream, Some(0)), "nothing is known yet");
        versions.committed(7, &stream, 3);
        versions.seen(5);

        versions.begin(1, 5);
        assert!(!versions.at(7, &stream, Some(2)), "not at another version");
        assert!(
            !versions.at(7, &stream, Some(3)),
            "looked up already in this transaction"
        );
        versions.begin(1, 5);
        assert!(
            !versions.at(7, &StreamId::new("Note", "b"), Some(3)),
            "another stream of the same hash"
        );
        assert!(versions.at(7, &stream, Some(3)));

        versions.committed(7, &stream, 2);
        versions.seen(6);
        versions.begin(1, 6);
        assert!(
            versions.at(7, &stream, Some(3)),
            "a version never goes back"
        );

        versions.seen(6);
        versions.begin(2, 6);
        assert!(
            !versions.at(7, &stream, Some(3)),
            "another connection committed: all is forgotten"
        );
        versions.committed(7, &stream, 3);
        versions.seen(6);
        versions.begin(2, 7);
        assert!(
            !versions.at(7, &stream, Some(3)),
            "this connection changed the database outside a write: all is forgotten"
        );
    }
}
