//! The binary as people use it: bad configs, management commands, doctor, and `serve` with signals.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A temp dir holding a config file (and, relative to it, the data dir and SQLite database).
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(yaml: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        Setup { dir, config }
    }

    /// A valid config on SQLite with JSON logs, plus `extra` YAML.
    fn valid(extra: &str) -> Setup {
        Setup::logging_json(&format!(
            "database: {{ url: \"sqlite://data/q.db\" }}\n{extra}"
        ))
    }

    /// JSON logs, plus `extra` YAML (which may set its own database).
    fn logging_json(extra: &str) -> Setup {
        Setup::new(&format!(
            "logging: {{ level: info, format: json }}\n{extra}"
        ))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotagate"));
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.env_remove("RUST_LOG");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts exit status 2 and a single stderr line naming the file and `key`.
fn assert_refused(out: &Output, config: &Path, key: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].contains(&config.display().to_string()), "{err}");
    assert!(lines[0].contains(key), "`{key}` not named: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        ("server: { prot: 8080 }", "server.prot"),
        ("sync: { redis_interval: 5 parsecs }", "sync.redis_interval"),
        (
            "providers:\n  - { name: p, base_url: \"http://x\", rate_limits: { rpm: -5 } }",
            "providers[0].rate_limits.rpm",
        ),
        (
            "database: { url: \"${QG_TEST_SURELY_UNSET_VAR}\" }",
            "QG_TEST_SURELY_UNSET_VAR",
        ),
        ("database: { url: \"mysql://x\" }", "database.url"),
        ("security: { master_key: \"abc\" }", "security.master_key"),
        ("server: [ not, a, map ]", "server"),
    ];
    for (yaml, key) in cases {
        let setup = Setup::new(yaml);
        let out = setup.run(&["serve"]);
        assert_refused(&out, &setup.config, key);
    }
}

#[test]
fn an_unknown_environment_override_is_refused() {
    let setup = Setup::valid("");
    let out = setup
        .command(&["migrate"])
        .env("QUOTAGATE__SERVER__PROT", "1")
        .output()
        .unwrap();
    assert_refused(&out, &setup.config, "QUOTAGATE__SERVER__PROT");
}

#[test]
fn a_missing_config_file_is_refused_clearly() {
    let setup = Setup::valid("");
    std::fs::remove_file(&setup.config).unwrap();
    let out = setup.run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("config.yaml"), "{}", stderr(&out));
}

#[test]
fn migrate_creates_the_database_beside_the_config_and_logs_json() {
    let setup = Setup::valid("");
    let out = setup.run(&["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(setup.dir.path().join("data/q.db").exists());
    assert!(stdout(&out).contains("applied"), "{}", stdout(&out));
    let mut logged = 0;
    for line in stderr(&out).lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(json.get(key).is_some(), "{key} missing: {line}");
        }
        logged += 1;
    }
    assert!(logged >= 1, "the applied migration is logged");
    let again = setup.run(&["migrate"]);
    assert!(stdout(&again).contains("up to date"), "{}", stdout(&again));
}

#[test]
fn providers_accounts_and_keys_are_managed_from_the_command_line() {
    let setup = Setup::valid("");
    let out = setup.run(&[
        "provider",
        "add",
        "--name",
        "groq",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "llama",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&setup.run(&["provider", "list"]));
    assert!(list.contains("groq") && list.contains("llama"), "{list}");

    let out = setup.run_with_stdin(
        &[
            "account",
            "add",
            "--provider",
            "groq",
            "--name",
            "g1",
            "--quota-limit",
            "1000",
        ],
        "sk-cli-secret-7777\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = setup
        .command(&[
            "account",
            "add",
            "--provider",
            "groq",
            "--name",
            "g2",
            "--api-key-env",
            "QG_TEST_KEY",
        ])
        .env("QG_TEST_KEY", "sk-env-secret-8888")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let list = setup.run(&["account", "list"]);
    let text = stdout(&list) + &stderr(&list);
    assert!(
        text.contains("groq/g1") && text.contains("…7777") && text.contains("…8888"),
        "{text}"
    );
    assert!(
        !text.contains("sk-cli-secret") && !text.contains("sk-env-secret"),
        "{text}"
    );

    let out = setup.run(&["account", "disable", "g1", "--reason", "rotated"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&setup.run(&["account", "list"])).contains("no (rotated)"));
    let out = setup.run(&["account", "disable", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = setup.run(&["key", "create", "--name", "laptop", "--user", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = stdout(&out).lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("qg_"), "{key}");
    assert!(
        !stderr(&out).contains(&key),
        "secrets never go through the logger"
    );
    let listed = stdout(&setup.run(&["key", "list"]));
    assert!(
        listed.contains("laptop") && listed.contains("alice") && !listed.contains(&key),
        "{listed}"
    );
    assert!(setup.run(&["key", "revoke", "laptop"]).status.success());
    assert!(!stdout(&setup.run(&["key", "list"]))
        .lines()
        .nth(1)
        .unwrap()
        .ends_with(" -"));
}

#[test]
fn admin_token_rotation_prints_a_new_token_unless_one_is_configured() {
    let setup = Setup::valid("");
    let first = setup.run(&["admin-token", "rotate"]);
    let second = setup.run(&["admin-token", "rotate"]);
    let token = |o: &Output| stdout(o).lines().last().unwrap().trim().to_string();
    assert!(token(&first).starts_with("qga_"));
    assert_ne!(token(&first), token(&second));

    let configured =
        Setup::valid("security: { admin_token: \"a-configured-token-0123456789abcdef\" }");
    let out = configured.run(&["admin-token", "rotate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("security.admin_token"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn backup_copies_the_embedded_database() {
    let setup = Setup::valid("");
    assert!(setup
        .run(&["key", "create", "--name", "k"])
        .status
        .success());
    let target = setup.dir.path().join("backup.db");
    let out = setup.run(&["backup", "--to", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let copy = Setup::valid("");
    std::fs::create_dir_all(copy.dir.path().join("data")).unwrap();
    std::fs::copy(&target, copy.dir.path().join("data/q.db")).unwrap();
    assert!(stdout(&copy.run(&["key", "list"])).contains('k'));
    let again = setup.run(&["backup", "--to", target.to_str().unwrap()]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "an existing file is not overwritten"
    );
}

// ------------------------------------------------------------------------------------------------
// doctor
// ------------------------------------------------------------------------------------------------

#[test]
fn doctor_passes_on_the_embedded_default() {
    let setup = Setup::valid("");
    let out = setup.run(&["doctor"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("redis") && stdout(&out).contains("off"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn doctor_explains_an_unreachable_database() {
    let port = free_port();
    let setup = Setup::logging_json(&format!(
        "database: {{ url: \"postgres://qg:secretpw@127.0.0.1:{port}/qg\" }}"
    ));
    let out = setup.run(&["doctor"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("database"))
        .expect(&text);
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) || line.contains(&port.to_string()),
        "{text}"
    );
    assert!(text.contains("fix: start Postgres"), "{text}");
    assert!(
        !text.contains("secretpw"),
        "the password is redacted: {text}"
    );
}

#[test]
fn doctor_explains_that_redis_is_down() {
    let port = free_port();
    let setup = Setup::valid(&format!("redis: {{ host: \"127.0.0.1:{port}\" }}"));
    let out = setup.run(&["doctor"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("not reachable"), "{text}");
    assert!(text.contains("fix: start redis-server"), "{text}");
}

#[test]
#[ignore = "needs redis-server: run scripts/test"]
fn doctor_explains_a_wrong_redis_password() {
    let redis = common::TestRedis::start_with_password(Some("right-password"));
    let setup = Setup::valid(&format!(
        "redis: {{ host: \"127.0.0.1:{}\", password: \"wrong-password\" }}",
        redis.port()
    ));
    let out = setup.run(&["doctor"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("refused the password"), "{text}");
    assert!(text.contains("fix: set redis.password"), "{text}");
    assert!(!text.contains("wrong-password"), "{text}");

    let good = Setup::valid(&format!(
        "redis: {{ host: \"127.0.0.1:{}\", password: \"right-password\" }}",
        redis.port()
    ));
    let out = good.run(&["doctor"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
#[ignore = "needs postgres: run scripts/test"]
fn doctor_reports_pending_migrations_on_postgres() {
    let url = common::pg_database();
    let setup = Setup::logging_json(&format!("database: {{ url: \"{url}\" }}"));
    let out = setup.run(&["doctor"]);
    assert!(stdout(&out).contains("not applied"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("quotagate migrate"),
        "{}",
        stdout(&out)
    );
    assert!(setup.run(&["migrate"]).status.success());
    let out = setup.run(&["doctor"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("migrations applied"),
        "{}",
        stdout(&out)
    );
}

// ------------------------------------------------------------------------------------------------
// serve
// ------------------------------------------------------------------------------------------------

/// A running `quotagate serve`, killed on drop if a test fails before stopping it.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(setup: &Setup) -> Server {
        let port = free_port();
        let child = setup
            .command(&["serve"])
            .env("QUOTAGATE__SERVER__PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/healthz").is_none() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("serve exited early with {status}");
            }
            assert!(Instant::now() < deadline, "serve did not answer /healthz");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.port = port;
        server
    }

    /// Sends SIGTERM and returns the output once the process has exited.
    fn terminate(mut self) -> Output {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "serve did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET: `(status, body)`, or `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

#[test]
fn serve_hands_out_first_secrets_once_answers_health_and_stops_on_sigterm() {
    let setup = Setup::valid(
        "providers:\n  - name: local\n    base_url: http://127.0.0.1:9/v1\n    models: [m]\n    accounts:\n      - { name: a1, api_key: \"sk-serve-secret-1234\" }\n",
    );
    let server = Server::start(&setup);
    let (status, body) = http_get(server.port, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(server.port, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"database\":\"ok\"") && body.contains("\"redis\":\"disabled\""),
        "{body}"
    );
    let out = server.terminate();
    assert!(
        out.status.success(),
        "exit 0 after SIGTERM: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    let first = stdout(&out);
    assert!(first.contains("admin token: qga_"), "{first}");
    assert!(first.contains("client key: qg_"), "{first}");
    let logs = stderr(&out);
    for line in logs.lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(json["ts"].is_string() && json["level"].is_string() && json["msg"].is_string());
    }
    assert!(
        !logs.contains("qga_") && !logs.contains("qg_") && !logs.contains("sk-serve-secret"),
        "{logs}"
    );
    assert!(logs.contains("generated a new master key"), "{logs}");
    assert!(setup.dir.path().join("data/master.key").exists());

    let again = Server::start(&setup).terminate();
    assert!(again.status.success());
    assert!(
        !stdout(&again).contains("admin token"),
        "secrets are handed out only once"
    );
    assert!(!stderr(&again).contains("generated a new master key"));
}

#[test]
fn the_readme_example_of_free_tier_providers_is_a_valid_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Free-tier limits")
        .nth(1)
        .expect("the section exists");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a yaml block");
    let env: std::collections::BTreeMap<String, String> = [
        "GROQ_KEY_1",
        "GROQ_KEY_2",
        "CEREBRAS_KEY_1",
        "OPENROUTER_KEY_1",
    ]
    .into_iter()
    .map(|k| (k.to_string(), format!("sk-{k}-0000")))
    .collect();
    let config =
        quotagate::config::Config::from_yaml(yaml, Path::new("/tmp/readme/config.yaml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.providers.len(), 3);
}
