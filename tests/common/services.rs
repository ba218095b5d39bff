//! Real PostgreSQL and Redis servers for integration tests.
//!
//! Two kinds:
//!
//! * **Shared servers**, started once per run by `scripts/test` and found through env vars:
//!   - [`pg_database`]: a fresh, empty database (`qg_test_<uuid>`) in the shared cluster
//!     (`QUOTAGATE_TEST_PG_URL`, a superuser URL).
//!   - [`redis_database`]: a fresh, empty *logical database* (`redis://…/N`) of the shared
//!     Redis (`QUOTAGATE_TEST_REDIS_URL`), so tests never see each other's keys. Use it by
//!     default. [`redis_url`] is the shared db 0 itself; a test using it must put
//!     [`unique_key_prefix`] in front of its keys. Either way: never `FLUSHALL`, and remember that
//!     pub/sub channels and keyspace notifications are server-wide, not per database.
//!
//!   Databases are not dropped: the whole cluster/server is thrown away by `scripts/test`.
//!
//! * **Private servers** ([`TestPostgres`], [`TestRedis`]) for tests that stop and restart the
//!   server. Each runs in its own temp dir on a free loopback port and is stopped by PID on drop.
//!   PostgreSQL binaries come from `QUOTAGATE_TEST_PGBIN` (set by `scripts/test`), else the newest
//!   `/usr/lib/postgresql/*/bin`, else `initdb` on the `PATH`.
//!
//! Tests that need a server are marked `#[ignore = "needs postgres: run scripts/test"]` (or
//! "needs redis", …): a plain `cargo test` skips them, `scripts/test` runs them with
//! `--include-ignored`, and without the env vars they panic instead of silently passing.
//!
//! Works as root (PostgreSQL then runs as the `postgres` user) and as any other user.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::{Connection, RunQueryDsl};
use tempfile::TempDir;

/// Superuser URL of the shared PostgreSQL cluster.
pub const PG_URL_ENV: &str = "QUOTAGATE_TEST_PG_URL";
/// URL of the shared Redis (db 0).
pub const REDIS_URL_ENV: &str = "QUOTAGATE_TEST_REDIS_URL";
/// PostgreSQL's bin directory (`initdb`, `postgres`).
pub const PGBIN_ENV: &str = "QUOTAGATE_TEST_PGBIN";

/// Counter in the shared Redis's db 0 that hands out logical databases.
const REDIS_DB_COUNTER_KEY: &str = "quotagate:test:next_db";

#[track_caller]
fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: run scripts/test"),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared servers

/// Creates a fresh, uniquely named database in the shared cluster and returns its URL.
///
/// Panics if `QUOTAGATE_TEST_PG_URL` is not set (run the tests through `scripts/test`).
#[track_caller]
pub fn pg_database() -> String {
    let admin_url = required_env(PG_URL_ENV);
    let name = format!("qg_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::establish(&admin_url)
        .unwrap_or_else(|e| panic!("cannot connect to {PG_URL_ENV}={admin_url}: {e}"));
    diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
    with_path(&admin_url, &name)
}

/// The shared Redis, db 0. Tests using it directly must prefix their keys with
/// [`unique_key_prefix`]; prefer [`redis_database`].
///
/// Panics if `QUOTAGATE_TEST_REDIS_URL` is not set (run the tests through `scripts/test`).
#[track_caller]
pub fn redis_url() -> String {
    required_env(REDIS_URL_ENV)
}

/// URL of a fresh, empty logical database of the shared Redis (`redis://127.0.0.1:PORT/N`).
///
/// N comes from an `INCR` in db 0, so tests in parallel threads and in different test binaries
/// get different databases (`scripts/test` starts Redis with 1024 of them). After the last one
/// the numbers wrap around; the database is flushed before it is handed out.
#[track_caller]
pub fn redis_database() -> String {
    let base = redis_url();
    let mut con = redis_connect(&base);
    let n: i64 = redis::cmd("INCR")
        .arg(REDIS_DB_COUNTER_KEY)
        .query(&mut con)
        .unwrap_or_else(|e| panic!("INCR on {base} failed: {e}"));
    let config: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("databases")
        .query(&mut con)
        .unwrap_or_else(|e| panic!("CONFIG GET databases on {base} failed: {e}"));
    let count: i64 = config
        .get("databases")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected CONFIG GET databases reply: {config:?}"));
    assert!(
        count >= 2,
        "the Redis at {base} has {count} database(s): tests need more (scripts/test sets 1024)"
    );
    // db 0 stays the shared one (and holds the counter): hand out 1..count-1.
    let db = 1 + (n - 1) % (count - 1);
    let url = with_path(&base, &db.to_string());
    let () = redis::cmd("FLUSHDB")
        .query(&mut redis_connect(&url))
        .unwrap_or_else(|e| panic!("FLUSHDB on {url} failed: {e}"));
    url
}

/// A key prefix unique to the caller (`qg_test_<uuid>:`), for tests that share Redis db 0.
pub fn unique_key_prefix() -> String {
    format!("qg_test_{}:", uuid::Uuid::new_v4().simple())
}

#[track_caller]
fn redis_connect(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

/// Replaces the path of `scheme://authority/path?query` with `/new_path`, keeping the query.
fn with_path(url: &str, new_path: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority_start + i);
    let query = url[authority_end..]
        .find('?')
        .map_or("", |i| &url[authority_end + i..]);
    format!("{}/{new_path}{query}", &url[..authority_end])
}

// ---------------------------------------------------------------------------------------------
// Private PostgreSQL

/// A private PostgreSQL cluster in a temp dir, on a free loopback port, for tests that stop or
/// restart the database. Trust authentication, superuser `postgres`. Stopped (by PID) on drop.
///
/// The postmaster is a direct child of the test process (as root it runs as the `postgres`
/// user through `Command::uid/gid`), so it is signalled and reaped by PID: no pg_ctl, no orphan.
pub struct TestPostgres {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    // Last field: dropped (removed) after `Drop::drop` has stopped the server.
    dir: TempDir,
}

impl TestPostgres {
    /// initdb + start (~1 s). Panics with the server log when it cannot start.
    pub fn start() -> TestPostgres {
        let bin = pg_bin_dir();
        let dir = server_temp_dir("qg-test-pg.");
        if let Some((uid, gid)) = postgres_user() {
            // PostgreSQL refuses to run as root: the cluster belongs to `postgres`.
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
        }
        let mut pg = TestPostgres {
            bin,
            port: 0,
            child: None,
            dir,
        };
        // --no-sync / fsync=off: the cluster is thrown away, durability only costs time.
        run_checked(
            pg.pg_command("initdb")
                .arg("-D")
                .arg(pg.data_dir())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .args(["--no-locale", "--no-sync"]),
        );
        // A free port can be taken between probing and binding: retry with another one.
        let mut last_error = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => last_error = e,
            }
        }
        panic!("TestPostgres did not start: {last_error}");
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (stays valid across stop/restart).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (SIGINT to the postmaster: clients are disconnected), waiting until it has
    /// exited. Idempotent; never panics (it also runs in `Drop`).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, "INT", Duration::from_secs(30));
        }
    }

    /// Stops the server if it runs and starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.try_start() {
            panic!("TestPostgres did not restart: {e}");
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .pg_command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(self.dir.path())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("cannot run {}/postgres: {e}", self.bin.display()))?;
        let pid = child.id();
        self.child = Some(child);
        // Ready = *our* postmaster wrote "ready" into postmaster.pid (what `pg_ctl -w` checks);
        // another server answering on the same port cannot fool this.
        let pid_file = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = fs::read_to_string(&pid_file).unwrap_or_default();
            let mut lines = status.lines();
            if lines.next() == Some(pid.to_string().as_str())
                && lines.nth(6).is_some_and(|s| s.trim() == "ready")
            {
                return Ok(());
            }
            let child = self.child.as_mut().expect("child was just set");
            let exited = !matches!(child.try_wait(), Ok(None));
            if exited || Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "postgres on port {} did not become ready\n--- {} ---\n{}",
                    self.port,
                    log_path.display(),
                    tail(&log_path)
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// A PostgreSQL program, run as `postgres` when we are root, from inside the cluster dir
    /// (the `postgres` user may not be allowed into the current directory).
    fn pg_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = postgres_user() {
            // std also drops root's supplementary groups when it switches uid.
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// When we are root: the uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
/// Otherwise `None`: the server runs as ourselves.
fn postgres_user() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run id: {e}"));
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!("running as root needs a `postgres` user (run scripts/test to install PostgreSQL)")
            })
    };
    Some((id("-u"), id("-g")))
}

/// `QUOTAGATE_TEST_PGBIN`, else the newest `/usr/lib/postgresql/N/bin` (Debian), else the
/// directory of `initdb` on the `PATH`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var(PGBIN_ENV) {
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    let newest_debian = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = newest_debian {
        return bin;
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file()))
        .unwrap_or_else(|| {
            panic!("PostgreSQL (initdb) not found: run scripts/test, or set {PGBIN_ENV}")
        })
}

// ---------------------------------------------------------------------------------------------
// Private Redis

/// A private redis-server in a temp dir, on a free loopback port, optionally with a password,
/// for tests that stop or restart Redis. Nothing is persisted. Stopped (by PID) on drop.
pub struct TestRedis {
    port: u16,
    password: Option<String>,
    child: Option<Child>,
    // Last field: removed after `Drop::drop` has stopped the server.
    dir: TempDir,
}

impl TestRedis {
    /// Without a password.
    pub fn start() -> TestRedis {
        TestRedis::start_with_password(None)
    }

    /// With `requirepass` when `password` is given. Panics with the log when it cannot start.
    pub fn start_with_password(password: Option<&str>) -> TestRedis {
        let mut redis = TestRedis {
            port: 0,
            password: password.map(str::to_owned),
            child: None,
            dir: server_temp_dir("qg-test-redis."),
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            redis.port = free_port();
            match redis.try_start() {
                Ok(()) => return redis,
                Err(e) => last_error = e,
            }
        }
        panic!("TestRedis did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`, or `redis://:PASSWORD@127.0.0.1:PORT` with a password.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{}@127.0.0.1:{}", percent_encode(pw), self.port),
            None => self.url_without_password(),
        }
    }

    /// `redis://127.0.0.1:PORT`, even when the server has a password.
    pub fn url_without_password(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGTERM (SIGKILL after 10 s) and wait for the process to exit. Idempotent; never panics.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, "TERM", Duration::from_secs(10));
        }
    }

    /// Stops the server if it runs and starts it again on the same port (empty: nothing is
    /// persisted).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.try_start() {
            panic!("TestRedis did not restart: {e}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let log = dir.join("redis.log");
        // A config file rather than arguments keeps the password out of `ps`.
        let mut config = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsave \"\"\nappendonly no\ndaemonize no\n",
            self.port,
            quote(&dir.display().to_string()),
            quote(&log.display().to_string()),
        );
        if let Some(pw) = &self.password {
            config.push_str(&format!("requirepass {}\n", quote(pw)));
        }
        let config_path = dir.join("redis.conf");
        fs::write(&config_path, config).map_err(|e| format!("writing redis.conf: {e}"))?;
        // Our own child (no --daemonize): its PID is known and a failed bind shows as an exit.
        let child = Command::new("redis-server")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot run redis-server (run scripts/test to install it): {e}")
            })?;
        self.child = Some(child);
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_answers(port) {
                return Ok(());
            }
            let child = self.child.as_mut().expect("child was just set");
            let exited = !matches!(child.try_wait(), Ok(None));
            if exited || Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {port} did not answer\n--- {} ---\n{}",
                    log.display(),
                    tail(&log)
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when something speaking RESP answers an inline PING (`+PONG`, or `-NOAUTH` when a
/// password is required).
fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 64];
    stream.write_all(b"PING\r\n").is_ok()
        && matches!(stream.read(&mut reply), Ok(n) if reply[..n].starts_with(b"+PONG")
            || reply[..n].starts_with(b"-NOAUTH"))
}

/// Quotes a value for redis.conf (double quotes, backslash escapes).
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for the URL's password).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Process and OS helpers

/// True when this process runs as root (the owner of /proc/self is our uid).
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A temp dir for a server, in `$TMPDIR` (scripts/test points it into its run dir, which it
/// removes at the end, so even a killed test leaves nothing behind). As root, the `postgres`
/// user must be able to reach it: fine for /tmp and for scripts/test's TMPDIR.
fn server_temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"))
}

/// A loopback port that was free a moment ago (callers retry if it is taken in between).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// Sends a signal by PID through the shell's `kill` builtin (no libc dependency; /bin/kill is
/// not on every machine).
fn signal(pid: u32, name: &str) {
    let _ = Command::new("sh")
        .args([
            "-c",
            "kill -s \"$1\" \"$2\" 2>/dev/null",
            "sh",
            name,
            &pid.to_string(),
        ])
        .status();
}

/// Sends `signal_name` to our child, waits up to `timeout` for it to exit (SIGKILL after that)
/// and reaps it. Never panics: it runs in `Drop`.
fn stop_child(mut child: Child, signal_name: &str, timeout: Duration) {
    signal(child.id(), signal_name);
    let exited = wait_until(timeout, || !matches!(child.try_wait(), Ok(None)));
    if !exited {
        eprintln!(
            "test server {} ignored SIG{signal_name}, killing it",
            child.id()
        );
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Polls `done` every 20 ms until it is true (returns true) or `timeout` passes (false).
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

fn run_checked(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
