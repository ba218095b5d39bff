//! The crash mark: one small file, `data_dir/runtime.mark`, that tells the next start what a crash
//! may have left unknown, so that the restore charges what could really have been admitted and
//! not more.
//!
//! It says two things, rewritten atomically (temporary file, fsync, rename):
//!
//! - **alive** — when the process was last known alive (`alive_at`, rewritten every
//!   `every_ms`, whatever the database and Redis do). The process died before
//!   `alive_at + every_ms`: the unknown gap ends there, however long the copies have been
//!   failing.
//! - **idle** — `idle_since` is set when nothing had been admitted since the last complete copy
//!   and nothing was in flight, and is cleared *before* the next admission (the [`AdmissionGate`]
//!   makes every reservation wait for that write). A crash while it is set left nothing
//!   unknown: the copies hold everything, and the restore charges no gap.
//!
//! Cost: one small write per `every_ms`; on the request path one atomic load while the gateway is
//! busy, and one file write for the first request after an idle spell.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::time::{duration_ms, Millis, SharedClock};

/// The file's name inside `data_dir`.
pub const MARK_FILE: &str = "runtime.mark";

/// How long a disarm waits for requests between the gate and their reservation.
const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// What the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// When this process started (ms since the epoch).
    pub started_at: Millis,
    /// When it was last known alive.
    pub alive_at: Millis,
    /// How often `alive_at` is rewritten: the process died before `alive_at + every_ms`.
    pub every_ms: Millis,
    /// Set while nothing has been admitted since the last complete copy (see the module doc).
    pub idle_since: Option<Millis>,
}

impl Mark {
    /// The latest moment the process can have lived.
    pub fn died_before(&self) -> Millis {
        self.alive_at.saturating_add(self.every_ms)
    }
}

/// The mark left in `data_dir` by the previous process, if any (an unreadable one counts as
/// none: the restore then charges the gap from the copies' heartbeats, as without a mark).
pub fn read(data_dir: &Path) -> Option<Mark> {
    let path = data_dir.join(MARK_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    match serde_json::from_str(&text) {
        Ok(mark) => Some(mark),
        Err(e) => {
            log::warn!(event = "crash_mark_unreadable", path:% = path.display(); "ignoring the crash mark: {e}");
            None
        }
    }
}

/// Writes `mark` atomically and durably: a reader sees the old or the new content, never a mix.
fn write(path: &Path, mark: &Mark) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("mark.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(mark).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Guards admissions with the mark: no reservation is admitted while the file says idle.
/// Cloned into the runtime (which passes every admission through it) and the sync (which
/// disarms it when the gateway is idle).
#[derive(Debug, Clone)]
pub struct AdmissionGate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    clock: SharedClock,
    /// The file says busy: admissions may go ahead.
    armed: AtomicBool,
    /// Requests past the `armed` check whose reservation is not made yet.
    passing: AtomicUsize,
    /// The mark as last written; held while the file is written.
    mark: tokio::sync::Mutex<Mark>,
}

/// A request between the gate and its reservation; dropped once the reservation exists (or was
/// refused).
#[derive(Debug)]
pub struct Pass(Arc<Inner>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.passing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AdmissionGate {
    /// Writes a busy mark into `data_dir` (armed: a restart restored state that no copy holds
    /// yet) and keeps `alive_at` fresh every `every` from then on. Call it before anything can be
    /// admitted, and after the previous process's mark was read.
    pub fn open(
        data_dir: &Path,
        every: Duration,
        clock: SharedClock,
    ) -> Result<AdmissionGate, String> {
        let now = clock.now_ms();
        let mark = Mark {
            started_at: now,
            alive_at: now,
            every_ms: duration_ms(every).max(1),
            idle_since: None,
        };
        let path = data_dir.join(MARK_FILE);
        std::fs::create_dir_all(data_dir)
            .and_then(|()| write(&path, &mark))
            .map_err(|e| format!("cannot write the crash mark {}: {e}", path.display()))?;
        let gate = AdmissionGate {
            inner: Arc::new(Inner {
                path,
                clock,
                armed: AtomicBool::new(true),
                passing: AtomicUsize::new(0),
                mark: tokio::sync::Mutex::new(mark),
            }),
        };
        let alive = gate.clone();
        actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(every.max(Duration::from_millis(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                alive.alive().await;
            }
        });
        Ok(gate)
    }

    /// Lets one admission through: at once while the mark says busy, else after writing it so.
    /// Hold the [`Pass`] until the reservation is made.
    pub async fn pass(&self) -> Pass {
        loop {
            // With `disarm`: either this sees `armed` cleared, or `disarm` sees this pass.
            self.inner.passing.fetch_add(1, Ordering::SeqCst);
            if self.inner.armed.load(Ordering::SeqCst) {
                return Pass(self.inner.clone());
            }
            self.inner.passing.fetch_sub(1, Ordering::SeqCst);
            self.arm().await;
        }
    }

    /// Whether the mark says busy.
    pub fn is_armed(&self) -> bool {
        self.inner.armed.load(Ordering::SeqCst)
    }

    /// Writes the busy mark, then lets admissions through.
    async fn arm(&self) {
        let mut mark = self.inner.mark.lock().await;
        if self.is_armed() {
            return;
        }
        mark.idle_since = None;
        mark.alive_at = self.inner.clock.now_ms();
        if let Err(e) = self.write(*mark).await {
            // The file may still say idle, which a crash would trust: remove it (a missing mark
            // makes the restore charge the gap as before) rather than refuse to serve.
            let removed = std::fs::remove_file(&self.inner.path);
            log::error!(
                event = "crash_mark_failed", removed = removed.is_ok();
                "cannot mark the runtime busy in {}: {e}", self.inner.path.display()
            );
        }
        self.inner.armed.store(true, Ordering::SeqCst);
    }

    /// Rewrites `alive_at` (the state stays as it is).
    async fn alive(&self) {
        let mut mark = self.inner.mark.lock().await;
        mark.alive_at = self.inner.clock.now_ms();
        if let Err(e) = self.write(*mark).await {
            log::warn!(event = "crash_mark_failed"; "cannot refresh the crash mark {}: {e}", self.inner.path.display());
        }
    }

    /// Marks the runtime idle if `check` confirms it once no admission can start any more:
    /// clears `armed`, waits for requests already past the gate to make their reservation, runs
    /// `check` (nothing changed since the last complete copy, nothing in flight: `(idle, what
    /// it collected)`), and writes the idle mark when it holds. Returns whether the mark is idle
    /// now, and what `check` collected (`None` when it did not run).
    pub async fn disarm<T>(
        &self,
        check: impl std::future::Future<Output = (bool, T)>,
    ) -> (bool, Option<T>) {
        let mut mark = self.inner.mark.lock().await;
        if !self.is_armed() {
            return (true, None);
        }
        self.inner.armed.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + DRAIN_WAIT;
        while self.inner.passing.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() > deadline {
                self.inner.armed.store(true, Ordering::SeqCst);
                return (false, None);
            }
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
        let (idle, collected) = check.await;
        if idle {
            let now = self.inner.clock.now_ms();
            let next = Mark {
                idle_since: Some(now),
                alive_at: now,
                ..*mark
            };
            match self.write(next).await {
                Ok(()) => {
                    *mark = next;
                    return (true, Some(collected));
                }
                // The rename did not happen: the file still says busy.
                Err(e) => {
                    log::warn!(event = "crash_mark_failed"; "cannot mark the runtime idle: {e}")
                }
            }
        }
        self.inner.armed.store(true, Ordering::SeqCst);
        (false, Some(collected))
    }

    async fn write(&self, mark: Mark) -> std::io::Result<()> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || write(&path, &mark))
            .await
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::Clock;

    #[derive(Debug)]
    struct Fixed(Millis);

    impl Clock for Fixed {
        fn now_ms(&self) -> Millis {
            self.0
        }
    }

    fn gate(dir: &Path) -> AdmissionGate {
        AdmissionGate::open(dir, Duration::from_secs(3600), Arc::new(Fixed(5_000))).unwrap()
    }

    #[actix_rt::test]
    async fn a_new_gate_marks_the_runtime_busy_before_anything_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let _gate = gate(dir.path());
        let mark = read(dir.path()).unwrap();
        assert_eq!(mark.idle_since, None);
        assert_eq!((mark.started_at, mark.died_before()), (5_000, 3_605_000));
    }

    #[actix_rt::test]
    async fn an_idle_mark_is_cleared_before_the_next_admission() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate(dir.path());
        assert_eq!(gate.disarm(async { (true, ()) }).await, (true, Some(())));
        assert_eq!(read(dir.path()).unwrap().idle_since, Some(5_000));
        assert!(!gate.is_armed());
        let pass = gate.pass().await;
        assert_eq!(
            read(dir.path()).unwrap().idle_since,
            None,
            "written before the pass"
        );
        drop(pass);
        assert!(gate.is_armed());
    }

    #[actix_rt::test]
    async fn a_check_that_finds_work_leaves_the_mark_busy() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate(dir.path());
        assert_eq!(gate.disarm(async { (false, 3) }).await, (false, Some(3)));
        assert!(gate.is_armed());
        assert_eq!(read(dir.path()).unwrap().idle_since, None);
    }

    #[actix_rt::test]
    async fn a_request_past_the_gate_keeps_it_armed() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate(dir.path());
        let pass = gate.pass().await;
        // Its reservation never comes within the drain wait: no disarm, the check never runs.
        assert_eq!(gate.disarm(async { (true, ()) }).await, (false, None));
        assert!(gate.is_armed());
        drop(pass);
    }

    #[test]
    fn an_unreadable_mark_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARK_FILE), "{half").unwrap();
        assert_eq!(read(dir.path()), None);
    }
}
