//! The real `quotagate serve` binary, run by the end-to-end tests, and small HTTP clients for it.
//!
//! [`TestGateway::start`] writes a config into a temp dir (SQLite `data/q.db` relative to it,
//! JSON logs, one actor arbiter, two HTTP workers, plus the caller's YAML — a section the caller
//! gives replaces the default one), picks a free port (`QUOTAGATE__SERVER__PORT`), spawns the
//! binary, waits for `/healthz`, and captures stdout (the generated `admin token: …` and
//! `client key: …` lines) and stderr (the JSON log lines). [`TestGateway::sigterm`],
//! [`TestGateway::sigkill`] and [`TestGateway::restart`] (same dir, same port) drive its life;
//! the process is killed on drop.
//!
//! [`Http`] (over awc; use it inside `#[actix_rt::test]`) returns [`Resp`] (status, headers,
//! body) and, for SSE, [`SseResp`] (the `data:` payloads as they came, optionally hanging up after
//! a few of them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::Stream;
use serde_json::Value;

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM may take before the test fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// What a stopped run printed.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running (or stopped) `quotagate serve`.
pub struct TestGateway {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// This run's output, appended by reader threads.
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Output of the previous runs.
    history_stdout: String,
    history_stderr: String,
    admin_token: Option<String>,
    client_key: Option<String>,
}

/// The sections [`TestGateway::start`] writes unless the caller's YAML has its own.
const DEFAULT_SECTIONS: &[(&str, &str)] = &[
    ("logging", "logging: { level: info, format: json }"),
    ("database", "database: { url: \"sqlite://data/q.db\" }"),
    ("runtime", "runtime: { arbiters: 1 }"),
    (
        "server",
        "server: { host: 127.0.0.1, workers: 2, shutdown_grace: 10s }",
    ),
];

/// The YAML [`TestGateway::start`] writes for `extra`.
pub fn config_yaml(extra: &str) -> String {
    let mut yaml = String::new();
    for (section, default) in DEFAULT_SECTIONS {
        let overridden = extra.lines().any(|l| l.starts_with(&format!("{section}:")));
        if !overridden {
            yaml.push_str(default);
            yaml.push('\n');
        }
    }
    yaml.push_str(extra);
    yaml.push('\n');
    yaml
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestGateway {
    /// Starts the gateway on a config of the defaults plus `yaml_extra`.
    #[track_caller]
    pub fn start(yaml_extra: &str) -> TestGateway {
        TestGateway::start_with_env(yaml_extra, &[])
    }

    /// [`TestGateway::start`] with extra environment variables for the process.
    #[track_caller]
    pub fn start_with_env(yaml_extra: &str, env: &[(&str, &str)]) -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml(yaml_extra)).expect("writing the config");
        let mut gateway = TestGateway {
            dir,
            config,
            port: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            stdout: Arc::default(),
            stderr: Arc::default(),
            readers: Vec::new(),
            history_stdout: String::new(),
            history_stderr: String::new(),
            admin_token: None,
            client_key: None,
        };
        // A free port may be taken between the probe and the bind: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            gateway.port = free_port();
            match gateway.spawn() {
                Ok(()) => {
                    gateway.read_first_secrets();
                    return gateway;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("the gateway did not start: {last_error}");
    }

    /// Spawns the binary on `self.port` and waits for `/healthz`.
    fn spawn(&mut self) -> Result<(), String> {
        self.stdout = Arc::default();
        self.stderr = Arc::default();
        let mut child = self
            .command(&["serve"])
            .env("QUOTAGATE__SERVER__PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot spawn quotagate: {e}"))?;
        self.readers = vec![
            pipe_reader(child.stdout.take().unwrap(), self.stdout.clone()),
            pipe_reader(child.stderr.take().unwrap(), self.stderr.clone()),
        ];
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if http_get(self.port, "/healthz").is_some_and(|(status, _)| status == 200) {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait().unwrap() {
                self.join_readers();
                let err = format!(
                    "serve exited early with {status}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
                self.archive_output();
                return Err(err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.join_readers();
                let err = format!(
                    "serve did not answer /healthz within {START_TIMEOUT:?}\nstderr:\n{}",
                    self.stderr.lock().unwrap()
                );
                self.archive_output();
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first start prints the generated secrets on stdout (before it listens; the reader
    /// thread may lag a little).
    fn read_first_secrets(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let out = self.stdout.lock().unwrap().clone();
            self.admin_token = self
                .admin_token
                .take()
                .or(secret_after(&out, "admin token:"));
            self.client_key = self.client_key.take().or(secret_after(&out, "client key:"));
            if (self.admin_token.is_some() && self.client_key.is_some())
                || Instant::now() > deadline
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A `quotagate` command on this gateway's config (no `RUST_LOG` from the test's env).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quotagate"));
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs a CLI command to completion (e.g. `account list`).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("running quotagate")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The SQLite file of the default config.
    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("data/q.db")
    }

    /// The client key generated at the first start.
    #[track_caller]
    pub fn client_key(&self) -> &str {
        self.client_key
            .as_deref()
            .expect("no `client key:` line on the first start's stdout")
    }

    /// The admin token generated at the first start.
    #[track_caller]
    pub fn admin_token(&self) -> &str {
        self.admin_token
            .as_deref()
            .expect("no `admin token:` line on the first start's stdout")
    }

    /// Every log line (stderr) of every run so far.
    pub fn logs(&self) -> String {
        // The gateway's workers hand their log lines over in batches (within 50 ms): wait until
        // the output has been quiet for a little longer than that (at most 2 s).
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = self.stderr.lock().unwrap().len();
        while self.child.is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(80));
            let now = self.stderr.lock().unwrap().len();
            if now == seen {
                break;
            }
            seen = now;
        }
        format!("{}{}", self.history_stderr, self.stderr.lock().unwrap())
    }

    /// Everything printed on stdout by every run so far.
    pub fn stdout(&self) -> String {
        format!("{}{}", self.history_stdout, self.stdout.lock().unwrap())
    }

    /// The log lines parsed as JSON (lines that are not JSON are skipped).
    pub fn log_records(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and this run's output.
    #[track_caller]
    pub fn sigterm(&mut self) -> Exit {
        self.signal_and_wait("TERM", STOP_TIMEOUT)
    }

    /// Sends SIGTERM without waiting (see [`TestGateway::wait_exit`]).
    pub fn send_sigterm(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit (after a signal sent with [`TestGateway::send_sigterm`]).
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> Exit {
        let mut child = self.child.take().expect("the gateway is not running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.join_readers();
                panic!(
                    "the gateway did not exit within {timeout:?}; its log:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        let exit = Exit {
            status,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        };
        self.archive_output();
        exit
    }

    /// SIGKILL: no shutdown at all.
    pub fn sigkill(&mut self) -> Exit {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.wait_exit(STOP_TIMEOUT)
    }

    #[track_caller]
    fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> Exit {
        let pid = self.pid().expect("the gateway is not running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
        self.wait_exit(timeout)
    }

    /// Starts the binary again on the same dir and port (after a stop).
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs a stopped gateway");
        // Right after a SIGKILL the port may linger for a moment.
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if e.contains("cannot listen") => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
        panic!("restart failed: {last}");
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    fn archive_output(&mut self) {
        self.history_stdout
            .push_str(&std::mem::take(&mut *self.stdout.lock().unwrap()));
        self.history_stderr
            .push_str(&std::mem::take(&mut *self.stderr.lock().unwrap()));
    }

    /// `quotagate account list`, parsed.
    #[track_caller]
    pub fn accounts(&self) -> Vec<AccountInfo> {
        let out = self.cli(&["account", "list"]);
        assert!(
            out.status.success(),
            "account list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_account_table(&String::from_utf8_lossy(&out.stdout))
    }

    /// The id of account `provider/name`.
    #[track_caller]
    pub fn account_id(&self, qualified: &str) -> String {
        self.accounts()
            .into_iter()
            .find(|a| a.name == qualified)
            .unwrap_or_else(|| panic!("no account {qualified} in `account list`"))
            .id
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_readers();
    }
}

/// One row of `quotagate account list`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountInfo {
    /// `provider/name`.
    pub name: String,
    pub id: String,
    /// `yes`, `no`, or `no (reason)`.
    pub active: String,
    pub quota_used: u64,
    pub quota_limit: String,
}

/// Parses the table of `account list` by the header's column positions (cells may hold spaces).
pub fn parse_account_table(text: &str) -> Vec<AccountInfo> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<char> = header.chars().collect();
    let columns = [
        "ACCOUNT",
        "ID",
        "KEY",
        "ACTIVE",
        "QUOTA_USED",
        "QUOTA_LIMIT",
        "EXPIRES_AT",
    ];
    let header_text: String = header.iter().collect();
    let starts: Vec<usize> = columns
        .iter()
        .map(|c| {
            let byte = header_text
                .find(&format!("{c} "))
                .or_else(|| header_text.find(c))
                .unwrap_or_else(|| panic!("no {c} column in `account list`: {header_text}"));
            header_text[..byte].chars().count()
        })
        .collect();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let chars: Vec<char> = line.chars().collect();
            let cell = |i: usize| -> String {
                let from = starts[i].min(chars.len());
                let to = starts
                    .get(i + 1)
                    .copied()
                    .unwrap_or(chars.len())
                    .min(chars.len());
                chars[from..to]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            };
            AccountInfo {
                name: cell(0),
                id: cell(1),
                active: cell(3),
                quota_used: cell(4).parse().unwrap_or_else(|_| {
                    panic!("QUOTA_USED `{}` is not a number in: {line}", cell(4))
                }),
                quota_limit: cell(5),
            }
        })
        .collect()
}

fn secret_after(text: &str, marker: &str) -> Option<String> {
    text.lines()
        .find_map(|l| {
            l.split_once(marker)
                .map(|(_, rest)| rest.trim().to_string())
        })
        .filter(|s| !s.is_empty())
}

fn pipe_reader(pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => into.lock().unwrap().push_str(&line),
            }
        }
    })
}

/// A minimal blocking HTTP/1.1 GET: `(status, body)`, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
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

// ------------------------------------------------------------------------------------------------
// HTTP client over awc

/// An answer read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From sending to the last byte of the body.
    pub elapsed: Duration,
}

impl Resp {
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `error.code` of an error envelope.
    pub fn code(&self) -> Option<String> {
        self.json()["error"]["code"].as_str().map(str::to_string)
    }
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text())
    }
}

/// A streamed (SSE) answer.
#[derive(Debug, Clone)]
pub struct SseResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The `data:` payloads, in order (`[DONE]` included when it came).
    pub events: Vec<String>,
    /// Every byte received.
    pub raw: Vec<u8>,
    /// The body ended without an error and without us hanging up. awc cannot tell a peer
    /// closing a chunked body early from a normal end: check [`SseResp::done`] for that.
    pub complete: bool,
    /// A transport error while reading the body, if any.
    pub error: Option<String>,
}

impl SseResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON events (everything but `[DONE]`).
    pub fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| e.as_str() != "[DONE]")
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect()
    }

    pub fn done(&self) -> bool {
        self.events.last().is_some_and(|e| e == "[DONE]")
    }

    /// The `usage` of the first chunk that has a non-null one.
    pub fn usage(&self) -> Option<Value> {
        self.chunks()
            .into_iter()
            .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
    }

    /// The concatenated `delta.content` of the chunks.
    pub fn content(&self) -> String {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// An awc client with generous limits; use inside an actix runtime (`#[actix_rt::test]`).
#[derive(Clone)]
pub struct Http {
    client: awc::Client,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http::with_timeout(Duration::from_secs(30))
    }

    /// Whole-request timeout `timeout`.
    pub fn with_timeout(timeout: Duration) -> Http {
        let connector = awc::Connector::new().limit(256);
        Http {
            client: awc::Client::builder()
                .connector(connector)
                .timeout(timeout)
                .disable_redirects()
                .finish(),
        }
    }

    /// Sends `method url` with `bearer` (if any), extra `headers` and a raw `body`.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let started = Instant::now();
        let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, url);
        if let Some(b) = bearer {
            req = req.insert_header(("Authorization", format!("Bearer {b}")));
        }
        for (name, value) in headers {
            req = req.insert_header((*name, *value));
        }
        let sent = match body {
            Some(b) => req.send_body(b.to_vec()).await,
            None => req.send().await,
        };
        let mut res = sent.unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let body = res
            .body()
            .limit(64 << 20)
            .await
            .unwrap_or_else(|e| panic!("reading the answer of {url} failed: {e}"));
        Resp {
            status: res.status().as_u16(),
            headers: header_pairs(res.headers()),
            body: body.to_vec(),
            elapsed: started.elapsed(),
        }
    }

    /// Like [`Http::send`], but a transport error is returned instead of panicking.
    pub async fn try_send(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Resp, String> {
        let started = Instant::now();
        let method = awc::http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self.client.request(method, url);
        if let Some(b) = bearer {
            req = req.insert_header(("Authorization", format!("Bearer {b}")));
        }
        for (name, value) in headers {
            req = req.insert_header((*name, *value));
        }
        let sent = match body {
            Some(b) => req.send_body(b.to_vec()).await,
            None => req.send().await,
        };
        let mut res = sent.map_err(|e| e.to_string())?;
        let body = res
            .body()
            .limit(64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Resp {
            status: res.status().as_u16(),
            headers: header_pairs(res.headers()),
            body: body.to_vec(),
            elapsed: started.elapsed(),
        })
    }

    /// POSTs `body` as JSON.
    pub async fn post_json(&self, url: &str, bearer: Option<&str>, body: &Value) -> Resp {
        let bytes = serde_json::to_vec(body).unwrap();
        self.send(
            "POST",
            url,
            bearer,
            &[("Content-Type", "application/json")],
            Some(&bytes),
        )
        .await
    }

    /// POSTs `body` as JSON with extra headers.
    pub async fn post_json_with(
        &self,
        url: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Resp {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        self.send("POST", url, bearer, &all, Some(&bytes)).await
    }

    pub async fn get(&self, url: &str, bearer: Option<&str>) -> Resp {
        self.send("GET", url, bearer, &[], None).await
    }

    /// POSTs a streaming request and reads the SSE answer; with `hang_up_after: Some(n)`, drops
    /// the connection after `n` `data:` events (a client disconnecting mid-stream).
    pub async fn stream(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: &Value,
        hang_up_after: Option<usize>,
    ) -> SseResp {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut req = self
            .client
            .post(url)
            .insert_header(("Content-Type", "application/json"));
        if let Some(b) = bearer {
            req = req.insert_header(("Authorization", format!("Bearer {b}")));
        }
        let mut res = req
            .send_body(bytes)
            .await
            .unwrap_or_else(|e| panic!("stream request to {url} failed: {e}"));
        let mut out = SseResp {
            status: res.status().as_u16(),
            headers: header_pairs(res.headers()),
            events: Vec::new(),
            raw: Vec::new(),
            complete: false,
            error: None,
        };
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| Pin::new(&mut res).poll_next(cx)).await;
            match next {
                None => {
                    out.complete = true;
                    break;
                }
                Some(Err(e)) => {
                    out.error = Some(e.to_string());
                    break;
                }
                Some(Ok(bytes)) => {
                    out.raw.extend_from_slice(&bytes);
                    pending.extend_from_slice(&bytes);
                    while let Some((event, rest)) = split_event(&pending) {
                        for line in event.lines() {
                            if let Some(data) = line.strip_prefix("data:") {
                                out.events.push(data.trim().to_string());
                            }
                        }
                        pending = rest;
                    }
                    if hang_up_after.is_some_and(|n| out.events.len() >= n) {
                        break;
                    }
                }
            }
        }
        // Dropping `res` with its body unread closes the connection.
        drop(res);
        out
    }
}

/// Splits the first SSE event (up to a blank line) off `buf`.
fn split_event(buf: &[u8]) -> Option<(String, Vec<u8>)> {
    let find = |needle: &[u8]| buf.windows(needle.len()).position(|w| w == needle);
    let (end, sep) = [(find(b"\r\n\r\n"), 4), (find(b"\n\n"), 2)]
        .into_iter()
        .filter_map(|(i, n)| i.map(|i| (i, n)))
        .min()?;
    let event = String::from_utf8_lossy(&buf[..end]).into_owned();
    Some((event, buf[end + sep..].to_vec()))
}

fn header_pairs(headers: &awc::http::header::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A chat request body for `model` with one user message.
pub fn chat_body(model: &str, content: &str) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
    })
}

/// Polls `f` until it returns `Some` or `timeout` passes (async, real time).
pub async fn eventually<T>(timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}
