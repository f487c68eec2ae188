//! Replays the committed corpus of the fuzz target `stored_rows` (fuzz/) as an ordinary
//! test, so CI checks every input the fuzzer kept without building libFuzzer: rows of a
//! real store file, written with rusqlite, read back through every read API. A panic is a
//! finding; see `fuzz/harness/stored_rows.rs` for what is checked.

#[path = "../fuzz/harness/stored_rows.rs"]
mod stored_rows;

use std::path::Path;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stored_rows");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus at {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_corpus_input_reads_back_as_written_or_fails_cleanly() {
    let inputs = corpus();
    assert!(
        inputs.len() >= 10,
        "the corpus is there ({} inputs)",
        inputs.len()
    );
    for (name, data) in &inputs {
        let outcome = std::panic::catch_unwind(|| stored_rows::check(data));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!("corpus input {name}: {message}");
        }
    }
}
