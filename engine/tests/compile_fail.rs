//! The builder's typestate: an engine without a TCP transport does not compile, and the
//! compiler's message says what to add.

#[test]
fn builder_typestate() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    // A fabric engine must carry its TCP fallback.
    if cfg!(feature = "efa") {
        t.compile_fail("tests/ui-efa/*.rs");
    }
    if cfg!(feature = "rdma") {
        t.compile_fail("tests/ui-rdma/*.rs");
    }
}
