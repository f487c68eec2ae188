//! The checksum of an event's stored fields, and the checks every read of an event row runs.
//!
//! SQLite keeps no checksum of a row: a flipped bit in a payload or an id reads back as if
//! it had been stored that way. So the writer stores, with each event, a 64-bit checksum of
//! every stored field of the row, and each read recomputes it from the bytes SQLite lends
//! and compares. The fields are hashed with XXH3 in one unambiguous encoding, without
//! copying them: the payload is hashed with a seed folded from the stream, the version,
//! the schema version and the event type's hash (see [`core_hash`]); the other byte fields
//! (event id, metadata) are hashed on their own, then a fixed sequence of little-endian
//! words: that core hash, the position, both times, whether there is metadata, and each
//! byte field's length and hash.
//!
//! The checksum has two 32-bit halves (see [`StoredEvent::checksum`]): one over what a
//! replay hands out, one over the whole row. A replay, the hot path of every command, reads
//! and checks the five columns it needs and no more: each column read through SQLite's API
//! costs about as much as hashing a whole row. Every other read checks both halves. 32 bits
//! per half leave one damaged row in four billion undetected by it.

use std::borrow::Cow;

use eventfold_core::{Error, Metadata, registry};
use uuid::Uuid;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The fields of an event row as they are stored, each lent by SQLite (or by the writer
/// before the insert).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredEvent<'r> {
    pub(crate) position: i64,
    pub(crate) event_id: &'r [u8],
    pub(crate) aggregate_type: &'r [u8],
    pub(crate) aggregate_id: &'r [u8],
    pub(crate) version: i64,
    pub(crate) event_type: &'r [u8],
    pub(crate) schema_version: i64,
    pub(crate) occurred_at: i64,
    pub(crate) recorded_at: i64,
    pub(crate) metadata: Option<&'r [u8]>,
    pub(crate) payload: &'r [u8],
}

/// XXH3 over a fixed sequence of little-endian words.
fn hash_words<const N: usize>(words: [u64; N]) -> u64 {
    // N is 4, 7 or 9: the buffer is on the stack and the loop unrolls.
    let mut bytes = [[0u8; 8]; N];
    for (chunk, word) in bytes.iter_mut().zip(words) {
        *chunk = word.to_le_bytes();
    }
    xxh3_64(bytes.as_flattened())
}

/// A byte field as two words: its length and its hash.
fn field(bytes: &[u8]) -> [u64; 2] {
    [bytes.len() as u64, xxh3_64(bytes)]
}

/// The hash of a stream's identity, the same for all its events: a replay computes it
/// once.
pub(crate) fn stream_hash(aggregate_type: &[u8], aggregate_id: &[u8]) -> u64 {
    let [type_len, type_hash] = field(aggregate_type);
    let [id_len, id_hash] = field(aggregate_id);
    hash_words([type_len, type_hash, id_len, id_hash])
}

/// Folds a word into a running seed: a multiply-xorshift round, so that one flipped bit
/// of either changes about half the bits of the result.
fn fold(seed: u64, word: u64) -> u64 {
    let x = (seed ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// The hash of what a replay hands out: the stream, the version, the event type, the
/// schema version and the payload. It is the one hash on the hot path of every command,
/// so it hashes the payload once, seeded with the other fields folded together (XXH3
/// mixes its seed into every lane, and covers the payload's length): two XXH3 calls per
/// row, where hashing each field and then their words took three.
pub(crate) fn core_hash(
    stream_hash: u64,
    version: i64,
    event_type: &[u8],
    schema_version: i64,
    payload: &[u8],
) -> u64 {
    core_hash_of_type(
        stream_hash,
        version,
        type_hash(event_type),
        schema_version,
        payload,
    )
}

/// The hash of an event type name that [`core_hash`] folds in.
pub(crate) fn type_hash(event_type: &[u8]) -> u64 {
    xxh3_64(event_type)
}

/// [`core_hash`], given the [`type_hash`] of the row's event type: a read of many rows of
/// the same few types hashes each name once (see [`LastEventType`]).
pub(crate) fn core_hash_of_type(
    stream_hash: u64,
    version: i64,
    type_hash: u64,
    schema_version: i64,
    payload: &[u8],
) -> u64 {
    let seed = fold(
        fold(fold(stream_hash, version as u64), schema_version as u64),
        type_hash,
    );
    xxh3_64_with_seed(payload, seed)
}

/// The event type name of the last row read, checked as UTF-8, with its [`type_hash`]: a
/// stream, or a page of the log, repeats a few names row after row, so a read compares
/// the row's bytes with the last name's (a short `memcmp`) instead of validating and
/// hashing them again. A name that differs is validated and hashed as before, so what is
/// checked is the same for every row.
#[derive(Debug)]
pub(crate) struct LastEventType {
    name: String,
    hash: u64,
}

impl Default for LastEventType {
    fn default() -> Self {
        LastEventType {
            name: String::new(),
            hash: type_hash(b""),
        }
    }
}

impl LastEventType {
    /// The row's event type as text with its [`type_hash`], `None` if it is not UTF-8.
    pub(crate) fn get(&mut self, bytes: &[u8]) -> Option<(&str, u64)> {
        if self.name.as_bytes() != bytes {
            let name = std::str::from_utf8(bytes).ok()?;
            self.name.clear();
            self.name.push_str(name);
            self.hash = type_hash(bytes);
        }
        Some((&self.name, self.hash))
    }
}

/// True when the core half of a stored checksum matches `core` (see
/// [`StoredEvent::checksum`]).
pub(crate) fn core_matches(checksum: i64, core: u64) -> bool {
    (checksum as u64) >> 32 == core >> 32
}

impl<'r> StoredEvent<'r> {
    /// The checksum of the fields, as the store keeps it: the high 32 bits are those of
    /// the core hash ([`core_hash`]: what a replay hands out), the low 32 bits those of the
    /// hash of the core hash with every other field (position, event id, both times,
    /// metadata). A replay checks the core half without reading the other fields; every
    /// other read checks both halves, so each read checks every field it returns.
    pub(crate) fn checksum(&self) -> i64 {
        self.checksum_in(stream_hash(self.aggregate_type, self.aggregate_id))
    }

    /// [`checksum`](Self::checksum), given the [`stream_hash`] of the row's stream: the
    /// writer computes it once per append rather than once per event.
    pub(crate) fn checksum_in(&self, stream_hash: u64) -> i64 {
        debug_assert_eq!(
            stream_hash,
            self::stream_hash(self.aggregate_type, self.aggregate_id)
        );
        let core = core_hash(
            stream_hash,
            self.version,
            self.event_type,
            self.schema_version,
            self.payload,
        );
        self.checksum_of_core(core)
    }

    /// [`checksum`](Self::checksum), given the row's [`core_hash`].
    pub(crate) fn checksum_of_core(&self, core: u64) -> i64 {
        let [id_len, id_hash] = field(self.event_id);
        let [meta_len, meta_hash] = self.metadata.map_or([0, 0], field);
        let full = hash_words([
            core,
            self.position as u64,
            id_len,
            id_hash,
            self.occurred_at as u64,
            self.recorded_at as u64,
            u64::from(self.metadata.is_some()),
            meta_len,
            meta_hash,
        ]);
        ((core & 0xffff_ffff_0000_0000) | (full & 0xffff_ffff)) as i64
    }

    /// The event id, if it is one.
    pub(crate) fn id(&self) -> Option<Uuid> {
        Uuid::from_slice(self.event_id).ok()
    }

    /// Checks the row against its stored checksum and the store's ranges, and lends its
    /// text fields as `str` (but the metadata: see [`decode_metadata`]). Every problem found goes to `problems` (which stays empty, and
    /// so unallocated, for a sound row); the fields are returned only when there is none.
    pub(crate) fn check(
        &self,
        checksum: Option<i64>,
        problems: &mut Vec<String>,
    ) -> Option<CheckedEvent<'r>> {
        let stream_hash = stream_hash(self.aggregate_type, self.aggregate_id);
        self.check_in(stream_hash, checksum, problems)
    }

    /// [`check`](Self::check), given the [`stream_hash`] of the row's stream (see
    /// [`LastStream`]).
    pub(crate) fn check_in(
        &self,
        stream_hash: u64,
        checksum: Option<i64>,
        problems: &mut Vec<String>,
    ) -> Option<CheckedEvent<'r>> {
        match checksum {
            Some(stored) if stored == self.checksum_in(stream_hash) => {}
            Some(_) => problems.push("its checksum does not match its fields".to_owned()),
            None => problems.push("it has no checksum".to_owned()),
        }
        let event_id = self.id();
        if event_id.is_none() {
            problems.push(format!(
                "its event id is {} bytes long, not 16",
                self.event_id.len()
            ));
        }
        let mut text = |bytes: &'r [u8], what: &str| match std::str::from_utf8(bytes) {
            Ok(text) => Some(text),
            Err(e) => {
                problems.push(format!("its {what} is not UTF-8 ({e})"));
                None
            }
        };
        let aggregate_type = text(self.aggregate_type, "aggregate type");
        let aggregate_id = text(self.aggregate_id, "aggregate id");
        let event_type = text(self.event_type, "event type");
        let payload = text(self.payload, "payload");
        if self.position < 1 {
            problems.push(format!("its position {} is below 1", self.position));
        }
        if self.version < 1 {
            problems.push(format!("its version {} is below 1", self.version));
        }
        let schema_version = u32::try_from(self.schema_version).ok().filter(|v| *v >= 1);
        if schema_version.is_none() {
            problems.push(format!(
                "its schema version {} is out of range",
                self.schema_version
            ));
        }
        if !problems.is_empty() {
            return None;
        }
        Some(CheckedEvent {
            event_id: event_id?,
            aggregate_type: aggregate_type?,
            aggregate_id: aggregate_id?,
            version: self.version as u64,
            event_type: event_type?,
            schema_version: schema_version?,
            payload: payload?,
        })
    }

    /// The error of a row that failed [`check`](Self::check).
    pub(crate) fn corrupt(&self, problems: &[String]) -> Error {
        corrupt_event(self.id(), self.position, problems)
    }
}

/// The error naming a damaged event row.
pub(crate) fn corrupt_event(event_id: Option<Uuid>, position: i64, problems: &[String]) -> Error {
    Error::CorruptEvent {
        event_id,
        // Positions start at 1: 0 stands for one that cannot be read.
        position: u64::try_from(position).ok().filter(|p| *p > 0),
        reason: problems.join("; "),
    }
}

/// What a read of consecutive rows (a stream, or a page of the log written by batched
/// appends) keeps of the last row's stream and event type, so that each is checked,
/// hashed and looked up in the registry once per run of rows rather than once per row:
/// the stream's names as text with their [`stream_hash`] and the registry's copy of the
/// aggregate type name, and the event type as text with its [`type_hash`] and the
/// registry's copy of its name. A row whose bytes differ from the last ones is checked in
/// full, as before.
#[derive(Debug, Default)]
pub(crate) struct LastStream {
    stream: Option<KnownStream>,
    event_type: LastEventType,
    event_type_name: Option<Cow<'static, str>>,
}

/// The last stream of a [`LastStream`], its names checked as UTF-8.
#[derive(Debug)]
struct KnownStream {
    aggregate_type: String,
    aggregate_id: String,
    hash: u64,
    aggregate_type_name: Cow<'static, str>,
}

/// A row that passed every check of [`StoredEvent::check`], with the registry's copies of
/// its type names; its stream's names and its event type are lent by the [`LastStream`].
pub(crate) struct KnownEvent<'a> {
    pub(crate) checked: CheckedEvent<'a>,
    pub(crate) aggregate_type_name: Cow<'static, str>,
    pub(crate) event_type_name: Cow<'static, str>,
}

impl LastStream {
    /// Runs the checks of [`StoredEvent::check`] on `stored` (the same checks, the
    /// stream's names and the event type checked once while they repeat): the row's
    /// fields if it passes them all, `None` if any fails (then [`StoredEvent::check`]
    /// names every problem).
    pub(crate) fn check<'a>(
        &'a mut self,
        stored: &StoredEvent<'a>,
        checksum: Option<i64>,
    ) -> Option<KnownEvent<'a>> {
        let sum = checksum?;
        let same = self.stream.as_ref().is_some_and(|known| {
            known.aggregate_type.as_bytes() == stored.aggregate_type
                && known.aggregate_id.as_bytes() == stored.aggregate_id
        });
        if !same {
            let aggregate_type = std::str::from_utf8(stored.aggregate_type).ok()?;
            let aggregate_id = std::str::from_utf8(stored.aggregate_id).ok()?;
            let known = self.stream.get_or_insert_with(|| KnownStream {
                aggregate_type: String::new(),
                aggregate_id: String::new(),
                hash: 0,
                aggregate_type_name: Cow::Borrowed(""),
            });
            if known.aggregate_type != aggregate_type {
                known.aggregate_type.clear();
                known.aggregate_type.push_str(aggregate_type);
                known.aggregate_type_name = registry().aggregate_type_name(aggregate_type);
            }
            known.aggregate_id.clear();
            known.aggregate_id.push_str(aggregate_id);
            known.hash = stream_hash(stored.aggregate_type, stored.aggregate_id);
        }
        let known = self.stream.as_ref()?;
        let changed = self.event_type.name.as_bytes() != stored.event_type;
        let (event_type, type_hash) = self.event_type.get(stored.event_type)?;
        if changed || self.event_type_name.is_none() {
            self.event_type_name = Some(registry().event_type_name(event_type));
        }
        let core = core_hash_of_type(
            known.hash,
            stored.version,
            type_hash,
            stored.schema_version,
            stored.payload,
        );
        if sum != stored.checksum_of_core(core) {
            return None;
        }
        let version = u64::try_from(stored.version).ok().filter(|v| *v >= 1)?;
        let schema_version = u32::try_from(stored.schema_version)
            .ok()
            .filter(|v| *v >= 1)?;
        if stored.position < 1 {
            return None;
        }
        Some(KnownEvent {
            checked: CheckedEvent {
                event_id: stored.id()?,
                aggregate_type: &known.aggregate_type,
                aggregate_id: &known.aggregate_id,
                version,
                event_type,
                schema_version,
                payload: std::str::from_utf8(stored.payload).ok()?,
            },
            aggregate_type_name: known.aggregate_type_name.clone(),
            event_type_name: self.event_type_name.clone()?,
        })
    }
}

/// The fields of a row that passed its checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckedEvent<'r> {
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: &'r str,
    pub(crate) aggregate_id: &'r str,
    pub(crate) version: u64,
    pub(crate) event_type: &'r str,
    pub(crate) schema_version: u32,
    pub(crate) payload: &'r str,
}

/// The stored metadata, or the problem that keeps it from decoding. Read apart from
/// [`StoredEvent::check`]: a replay hashes the metadata but never hands it out.
pub(crate) fn decode_metadata(stored: Option<&[u8]>) -> Result<Metadata, String> {
    let Some(bytes) = stored else {
        return Ok(Metadata::default());
    };
    let json =
        std::str::from_utf8(bytes).map_err(|e| format!("its metadata is not UTF-8 ({e})"))?;
    serde_json::from_str(json).map_err(|e| format!("its metadata does not decode ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(payload: &'a [u8], metadata: Option<&'a [u8]>) -> StoredEvent<'a> {
        StoredEvent {
            position: 7,
            event_id: &[1; 16],
            aggregate_type: b"Meter",
            aggregate_id: b"m-1",
            version: 3,
            event_type: b"MeterRead",
            schema_version: 1,
            occurred_at: 11,
            recorded_at: 12,
            metadata,
            payload,
        }
    }

    #[test]
    fn one_flipped_bit_in_any_field_changes_the_checksum() {
        let payload = br#"{"units":7}"#.to_vec();
        let metadata = br#"{"values":{"by":"test"}}"#.to_vec();
        let base = row(&payload, Some(&metadata));
        let sum = base.checksum();
        let ints: [for<'a, 'b> fn(&'a mut StoredEvent<'b>) -> &'a mut i64; 5] = [
            |e| &mut e.position,
            |e| &mut e.version,
            |e| &mut e.schema_version,
            |e| &mut e.occurred_at,
            |e| &mut e.recorded_at,
        ];
        for field in ints {
            for bit in 0..64 {
                let mut event = base;
                *field(&mut event) ^= 1 << bit;
                assert_ne!(event.checksum(), sum);
            }
        }
        type Set = fn(&mut StoredEvent<'_>, &'static [u8]);
        let texts: [(&[u8], Set); 6] = [
            (&[1; 16], |e, b| e.event_id = b),
            (b"Meter", |e, b| e.aggregate_type = b),
            (b"m-1", |e, b| e.aggregate_id = b),
            (b"MeterRead", |e, b| e.event_type = b),
            (br#"{"values":{"by":"test"}}"#, |e, b| e.metadata = Some(b)),
            (br#"{"units":7}"#, |e, b| e.payload = b),
        ];
        for (bytes, set) in texts {
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut flipped = bytes.to_vec();
                    flipped[i] ^= 1 << bit;
                    let mut event = base;
                    set(&mut event, Vec::leak(flipped));
                    assert_ne!(event.checksum(), sum);
                }
            }
        }
    }

    #[test]
    fn the_core_half_covers_what_a_replay_hands_out_and_only_that() {
        let base = row(b"{}", Some(b"{}"));
        let core = |e: &StoredEvent<'_>| e.checksum() as u64 >> 32;
        let full = |e: &StoredEvent<'_>| e.checksum() as u64 & 0xffff_ffff;
        for other in [
            StoredEvent {
                position: 8,
                ..base
            },
            StoredEvent {
                event_id: &[2; 16],
                ..base
            },
            StoredEvent {
                occurred_at: 10,
                ..base
            },
            StoredEvent {
                recorded_at: 10,
                ..base
            },
            StoredEvent {
                metadata: None,
                ..base
            },
        ] {
            assert_eq!(core(&other), core(&base));
            assert_ne!(full(&other), full(&base));
        }
        for handed_out in [
            StoredEvent {
                aggregate_id: b"m-2",
                ..base
            },
            StoredEvent { version: 4, ..base },
            StoredEvent {
                event_type: b"MeterNoted",
                ..base
            },
            StoredEvent {
                schema_version: 2,
                ..base
            },
            StoredEvent {
                payload: b"[]",
                ..base
            },
        ] {
            assert_ne!(core(&handed_out), core(&base));
            assert_ne!(full(&handed_out), full(&base));
        }
        let replayed = core_hash(
            stream_hash(base.aggregate_type, base.aggregate_id),
            base.version,
            base.event_type,
            base.schema_version,
            base.payload,
        );
        assert!(core_matches(base.checksum(), replayed));
    }

    #[test]
    fn the_last_event_type_gives_the_core_hash_of_each_row_and_refuses_non_utf8() {
        let mut last = LastEventType::default();
        for name in [
            &b"MeterRead"[..],
            b"MeterRead",
            b"MeterReset",
            b"",
            b"MeterRead",
        ] {
            let (text, hash) = last.get(name).expect("UTF-8");
            assert_eq!(text.as_bytes(), name);
            assert_eq!(
                core_hash_of_type(11, 3, hash, 1, b"{}"),
                core_hash(11, 3, name, 1, b"{}")
            );
        }
        assert!(last.get(b"Meter\xffRead").is_none());
        // A refused name leaves the last one as it was.
        assert_eq!(last.get(b"MeterRead").map(|(t, _)| t), Some("MeterRead"));
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_checksum() {
        let a = StoredEvent {
            aggregate_id: b"m-1x",
            event_type: b"Read",
            ..row(b"{}", None)
        };
        let b = StoredEvent {
            aggregate_id: b"m-1",
            event_type: b"xRead",
            ..row(b"{}", None)
        };
        assert_ne!(a.checksum(), b.checksum());
        // No metadata and empty metadata differ too.
        assert_ne!(
            row(b"{}", None).checksum(),
            row(b"{}", Some(b"")).checksum()
        );
    }

    #[test]
    fn the_last_stream_passes_exactly_the_rows_a_full_check_passes() {
        let mut last = LastStream::default();
        let base = row(b"{\"n\":1}", None);
        let rows = [
            base,
            base,
            StoredEvent {
                aggregate_id: b"m-2",
                ..base
            },
            StoredEvent {
                aggregate_type: b"Mete",
                aggregate_id: b"rm-2",
                ..base
            },
            StoredEvent {
                event_type: b"MeterReset",
                ..base
            },
            base,
        ];
        for stored in rows {
            let sum = stored.checksum();
            let full = stored.check(Some(sum), &mut Vec::new()).expect("sound");
            let known = last.check(&stored, Some(sum)).expect("sound");
            let fast = known.checked;
            assert_eq!(
                (
                    fast.event_id,
                    fast.aggregate_type,
                    fast.aggregate_id,
                    fast.version
                ),
                (
                    full.event_id,
                    full.aggregate_type,
                    full.aggregate_id,
                    full.version
                )
            );
            assert_eq!(
                (fast.event_type, fast.schema_version, fast.payload),
                (full.event_type, full.schema_version, full.payload)
            );
            assert_eq!(known.aggregate_type_name, full.aggregate_type);
            assert_eq!(known.event_type_name, full.event_type);
            assert!(last.check(&stored, Some(sum ^ 1)).is_none());
            assert!(last.check(&stored, None).is_none());
        }
        // Damage the full check refuses, in a stream and type the last row had.
        let damaged = [
            StoredEvent {
                event_id: &[1; 3],
                ..base
            },
            StoredEvent {
                payload: b"\xff",
                ..base
            },
            StoredEvent {
                aggregate_id: b"m\xff",
                ..base
            },
            StoredEvent {
                event_type: b"Meter\xffRead",
                ..base
            },
            StoredEvent {
                position: 0,
                ..base
            },
            StoredEvent { version: 0, ..base },
            StoredEvent {
                schema_version: 0,
                ..base
            },
        ];
        for stored in damaged {
            let sum = stored.checksum();
            assert!(stored.check(Some(sum), &mut Vec::new()).is_none());
            assert!(last.check(&stored, Some(sum)).is_none());
        }
    }

    #[test]
    fn every_problem_of_a_row_is_listed() {
        let bad = StoredEvent {
            event_id: &[1; 3],
            payload: b"\xff",
            version: -1,
            schema_version: 0,
            ..row(b"{}", None)
        };
        let mut problems = Vec::new();
        assert!(bad.check(Some(bad.checksum()), &mut problems).is_none());
        assert_eq!(problems.len(), 4, "{problems:?}");
        let good = row(b"{}", None);
        let mut problems = Vec::new();
        assert!(
            good.check(Some(good.checksum() ^ 1), &mut problems)
                .is_none()
        );
        assert_eq!(problems, ["its checksum does not match its fields"]);
        let mut problems = Vec::new();
        assert!(good.check(Some(good.checksum()), &mut problems).is_some());
        assert!(problems.is_empty());
    }
}
