//! Compile-time behaviour of `#[derive(DomainEvent)]`: every mistake it reports, with its
//! message and the tokens it points at (`tests/ui/*.rs`), and what must compile and run
//! (`tests/ui/pass/*.rs`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
