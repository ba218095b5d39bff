//! The benchmark's mock upstream (`scripts/bench-http`): the fast mode of the tests' mock
//! (`tests/common/upstream.rs`) as a process. Every POST gets one canned chat completion with
//! usage; nothing is parsed beyond the HTTP head and nothing is recorded.
//!
//!     cargo run --release --features bench-mock --example mock_upstream -- [ADDR]
//!
//! ADDR defaults to `127.0.0.1:0`; the bound address is printed as `listening on ADDR`. Runs until
//! killed.

#[path = "../common/upstream.rs"]
#[allow(dead_code)]
mod upstream;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let mock = upstream::MockUpstream::start_fast_on(&addr);
    println!("listening on 127.0.0.1:{}", mock.port());
    loop {
        std::thread::park();
    }
}
