//! What a request body can cost (issue 8 §8): a 4 MiB body of `[0,0,0,…]` used to become a
//! ~64 MiB JSON tree, cloned again for every attempt. The gateway now reads only the fields it
//! needs and forwards the client's bytes, so a request costs about its own size.

mod common;

use std::time::Duration;

use common::{Http, MockUpstream, TestGateway, MOCK_MODEL};

/// The gateway process's peak resident memory, in KiB (`VmHWM`).
fn peak_kib(gw: &TestGateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid().unwrap())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[actix_rt::test]
async fn a_huge_nested_body_costs_about_its_own_size() {
    let mock = MockUpstream::start();
    let gw = TestGateway::start(&format!(
        "providers:
  - name: p
    base_url: \"{}\"
    models: [{MOCK_MODEL}]
    accounts:
      - {{ name: a1, api_key: \"sk-bodies-1\" }}
      - {{ name: a2, api_key: \"sk-bodies-2\" }}",
        mock.base_url()
    ));
    // Just under the 4 MiB limit: `[0,0,0,…]` in a field the gateway does not read.
    let zeros = vec!["0"; 2 * 1024 * 1024 - 100].join(",");
    let body = format!(
        r#"{{"model":"{MOCK_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":5,"junk":[{zeros}]}}"#
    );
    assert!(body.len() < 4 * 1024 * 1024);
    let http = Http::with_timeout(Duration::from_secs(60));
    let url = format!("{}/v1/chat/completions", gw.url());
    let before = peak_kib(&gw);
    let send = || {
        http.send(
            "POST",
            &url,
            Some(gw.client_key()),
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    };
    let (a, b, c, d) = tokio::join!(send(), send(), send(), send());
    for r in [&a, &b, &c, &d] {
        assert_eq!(r.status, 200, "{r}");
    }
    let grown_mib = (peak_kib(&gw).saturating_sub(before)) / 1024;
    println!("bodies: four 4 MiB bodies in flight grew the peak memory by {grown_mib} MiB");
    // Four bodies of 4 MiB in flight, each held about three times (the server's read buffer, the
    // body, the upstream client's write buffer): ~50 MiB measured. A tree per body, cloned per
    // attempt, was 64 MiB or more each.
    assert!(
        grown_mib < 100,
        "four 4 MiB bodies grew the peak memory by {grown_mib} MiB"
    );
    // What the upstream received is the client's body (only the documented edits).
    let received = mock.stats("sk-bodies-1").bodies.len() + mock.stats("sk-bodies-2").bodies.len();
    assert_eq!(received, 4);
}
