//! The status page in a real browser (issue 11): Debian's headless Chromium driven by
//! playwright-core (`tests/browser/status_page.cjs`), against the real binary with a provider
//! added through the admin API. It checks the login form, that nothing shows without the token,
//! the session cookie's flags, the account names and quota figures against the stats API, a live
//! update after new requests without a reload, the dark theme and a phone's width, and logout;
//! it saves screenshots under `target/` and measures the page's weight.
//!
//! Why playwright-core: it is one npm package with no dependencies that drives the system's
//! Chromium (no browser download), installs in about a second, and waits for the page by itself;
//! a Rust WebDriver or DevTools crate would add minutes of compilation on two cores to every
//! clean build for one test. `scripts/test` installs Chromium (apt) and playwright-core (npm,
//! pinned) into `target/browser-test` and exports where they are.
//!
//! `QUOTAGATE_UPDATE_SCREENSHOT=1` also rewrites `docs/status-page.png`, the README's picture.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::status::{StatusFixture, PROVIDER};
use common::{Behavior, MOCK_MODEL};

fn playwright() -> PathBuf {
    let dir = std::env::var("QUOTAGATE_TEST_PLAYWRIGHT").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/browser-test/node_modules/playwright-core"
        )
        .into()
    });
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("package.json").exists(),
        "playwright-core is not installed at {} (scripts/test installs it)",
        dir.display()
    );
    dir
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[actix_rt::test]
#[ignore = "needs chromium and playwright-core: run scripts/test"]
async fn the_status_page_works_in_a_real_browser() {
    let chromium = std::env::var("QUOTAGATE_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium} (scripts/test installs it)"
    );
    let playwright = playwright();
    let f = StatusFixture::start("").await;

    // Some history, and one account cooling down after an upstream 429 (its request is retried
    // on another account), so the page has something to show.
    f.mock.set_usage(None, 1200, 300);
    f.chat(6).await;
    f.mock.behave_times(
        "sk-status-idle-0123456789",
        Behavior::RateLimited { retry_after: 600 },
        1,
    );
    f.chat(3).await;
    f.wait_for_logged(9).await;

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    let _ = std::fs::remove_dir_all(&shots);
    let readme_shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
    let mut node = Command::new("node");
    node.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/status_page.cjs"
    ))
    .env("QG_PLAYWRIGHT", &playwright)
    .env("QG_CHROMIUM", &chromium)
    .env("QG_URL", f.gw.url())
    .env("QG_ADMIN", f.gw.admin_token())
    .env("QG_CLIENT", f.gw.client_key())
    .env("QG_MODEL", format!("{PROVIDER}/{MOCK_MODEL}"))
    .env("QG_PROVIDER", PROVIDER)
    .env("QG_SHOTS", &shots);
    if std::env::var("QUOTAGATE_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        node.env("QG_README_SHOT", &readme_shot);
    }
    let started = Instant::now();
    // The driver is bounded by its own waits; a hung browser is killed by the test's timeout.
    let output = tokio::task::spawn_blocking(move || node.output())
        .await
        .unwrap()
        .expect("running node (scripts/test installs it when missing)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "the browser test failed ({:?}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    for shot in [
        "status-login.png",
        "status-page.png",
        "status-page-dark.png",
        "status-page-phone.png",
    ] {
        assert!(
            is_png(&shots.join(shot)),
            "{shot} was not saved under {}",
            shots.display()
        );
    }
    assert!(
        is_png(&readme_shot),
        "the README's screenshot docs/status-page.png is missing"
    );
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("the driver's RESULT line");
    let result: serde_json::Value = serde_json::from_str(result).unwrap();
    println!("page weight: {result}");
    assert_eq!(
        result["first_load"]["requests"], 3,
        "HTML, CSS and script: {result}"
    );
    assert_eq!(result["live_update"]["requests"], 1, "{result}");
}
