//! Rows of a real SQLite store file, decided by the input, read back through every read
//! API of the store and `Repository::load`; see `../harness/stored_rows.rs`.

#![no_main]

#[path = "../harness/stored_rows.rs"]
mod stored_rows;

libfuzzer_sys::fuzz_target!(|data: &[u8]| stored_rows::check(data));
