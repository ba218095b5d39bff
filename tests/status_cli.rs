//! `quotagate status` against a running test gateway (its admin API, the token from the
//! environment), with `--watch`, as JSON, and from the database once the gateway has stopped.

mod common;

use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::status::{StatusFixture, ACCOUNTS, PROVIDER};
use common::Behavior;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of the table that shows `account`.
fn line<'a>(text: &'a str, account: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(account))
        .unwrap_or_else(|| panic!("no line for {account}:\n{text}"))
}

#[actix_rt::test]
async fn the_status_command_shows_every_account_and_its_state_from_a_running_gateway() {
    let f = StatusFixture::start("").await;
    f.chat(3).await;
    // `idle` cools down after an upstream 429 (the request is retried elsewhere).
    f.mock.behave_times(
        "sk-status-idle-0123456789",
        Behavior::RateLimited { retry_after: 300 },
        1,
    );
    f.chat(3).await;

    let out =
        f.gw.command(&["status", "--url", &f.gw.url()])
            .env("QUOTAGATE_ADMIN_TOKEN", f.gw.admin_token())
            .output()
            .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains(&format!("from {}", f.gw.url())), "{text}");
    assert!(
        text.contains(&format!("{PROVIDER}  round_robin  available 2/3")),
        "{text}"
    );
    let stats = f.pool_stats().await;
    for member in stats["accounts_status"].as_array().unwrap() {
        let name = member["account"].as_str().unwrap();
        let row = line(&text, name);
        let used = member["quota_used"].as_u64().unwrap();
        match name {
            "idle" => {
                assert!(row.contains("cooling down"), "{row}");
                assert!(row.contains("the upstream answered 429"), "{row}");
            }
            _ => assert!(row.contains("active"), "{row}"),
        }
        let quota = if name == "spare" {
            format!("{} tokens, no limit", thousands(used))
        } else {
            format!("{}/100,000", thousands(used))
        };
        assert!(row.contains(&quota), "{row} should show {quota}");
        assert!(
            row.contains("rpm ") && row.contains("tpd "),
            "windows: {row}"
        );
    }
    assert!(!text.contains("sk-status-"), "no keys");

    // JSON, as the API answers it.
    let out =
        f.gw.command(&["status", "--json", "--url", &f.gw.url()])
            .env("QUOTAGATE_ADMIN_TOKEN", f.gw.admin_token())
            .output()
            .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let names: Vec<&str> = json["providers"][0]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["account"].as_str().unwrap())
        .collect();
    assert_eq!(names, ACCOUNTS);

    // Without the token a running gateway says what is missing.
    let out =
        f.gw.command(&["status", "--url", &f.gw.url()])
            .env_remove("QUOTAGATE_ADMIN_TOKEN")
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("QUOTAGATE_ADMIN_TOKEN"),
        "{out:?}"
    );
}

fn thousands(n: u64) -> String {
    quotagate::status::thousands(n)
}

#[actix_rt::test]
async fn watch_redraws_until_stopped() {
    let f = StatusFixture::start("").await;
    let mut child =
        f.gw.command(&[
            "status",
            "--watch",
            "--interval",
            "300ms",
            "--url",
            &f.gw.url(),
        ])
        .env("QUOTAGATE_ADMIN_TOKEN", f.gw.admin_token())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pipe = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(20);
        // Three frames, each starting with "home and clear".
        while text.matches("\x1b[H\x1b[2J").count() < 3 && Instant::now() < deadline {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    });
    // Traffic between frames shows in a later one.
    f.chat(2).await;
    let text = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let frames: Vec<&str> = text
        .split("\x1b[H\x1b[2J")
        .filter(|f| !f.is_empty())
        .collect();
    assert!(frames.len() >= 3, "{text}");
    for frame in &frames {
        for name in ACCOUNTS {
            assert!(
                frame.contains(name),
                "{name} missing from a frame:\n{frame}"
            );
        }
    }
}

#[actix_rt::test]
async fn without_a_running_gateway_the_status_comes_from_the_database() {
    let mut f = StatusFixture::start("sync: { database_interval: 1s }\n").await;
    f.chat(3).await;
    let stats = f.pool_stats().await;
    let url = f.gw.url();
    let exit = f.gw.sigterm();
    assert!(exit.status.success(), "{}", exit.stderr);

    let out =
        f.gw.command(&["status", "--url", &url])
            .env("QUOTAGATE_ADMIN_TOKEN", "whatever")
            .output()
            .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("from the database"), "{text}");
    for member in stats["accounts_status"].as_array().unwrap() {
        let name = member["account"].as_str().unwrap();
        let row = line(&text, name);
        assert!(row.contains("active"), "{row}");
        let used = thousands(member["quota_used"].as_u64().unwrap());
        assert!(
            row.contains(&used),
            "{row} should show {used} used (the last sync)"
        );
    }
    // `--offline` reads the database without trying the gateway, and leaves the clean-shutdown
    // mark alone: the next start is still a clean one.
    let out = f.gw.command(&["status", "--offline"]).output().unwrap();
    assert!(
        out.status.success() && stdout(&out).contains("busy"),
        "{out:?}"
    );
    f.gw.restart();
    assert!(
        f.gw.logs().contains("\"clean\":true"),
        "the restart after `status --offline` is clean:\n{}",
        f.gw.logs()
    );
}
