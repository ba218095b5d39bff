//! `LedgerLink`: this instance's link to the shared ledgers — its id and lease-owner tag, the
//! connection, the heartbeat that counts live instances and keeps the clock on Redis' time, and
//! whether Redis answers (degraded or not, said once each way in the log, in `/readyz` and in the
//! `quotagate_ledger_*` metrics).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::clock::LedgerClock;
use super::conn::{classify, RedisConn, RedisProblem, RedisTarget};
use super::scripts::{self, Loaded, Swapped};
use crate::domain::share::{rank_for, Share};
use crate::metrics::LedgerMetrics;

/// An instance silent for this many beats no longer counts as live (its leases still count
/// until their own TTL: see `sync.lease_ttl`).
pub const MISSED_BEATS: u32 = 5;

/// The link. Cheap to clone.
#[derive(Clone)]
pub struct LedgerLink(Arc<Inner>);

struct Inner {
    target: RedisTarget,
    timeout: Duration,
    /// How often this instance says it is alive (`sync.redis_interval`).
    beat_every: Duration,
    instance_id: String,
    owner: u64,
    clock: Arc<LedgerClock>,
    /// `None` until the first connection succeeds (Redis may be down at start).
    conn: Mutex<Option<RedisConn>>,
    /// Live instances as last counted (at least 1: this one), and this one's rank among them
    /// (by id).
    live: AtomicU64,
    rank: AtomicU64,
    up: AtomicBool,
    metrics: LedgerMetrics,
}

impl std::fmt::Debug for LedgerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerLink")
            .field("instance_id", &self.0.instance_id)
            .field("owner", &self.0.owner)
            .finish()
    }
}

impl LedgerLink {
    /// Connects to `target` as instance `instance_id`. Redis may be down: the instance then starts
    /// degraded, assuming `instances_hint` live instances (see `store::settings`'s per-instance
    /// marks), and the heartbeat keeps trying. Never fails.
    pub async fn start(
        target: RedisTarget,
        timeout: Duration,
        beat_every: Duration,
        instance_id: String,
        clock: Arc<LedgerClock>,
        metrics: LedgerMetrics,
        instances_hint: u64,
    ) -> LedgerLink {
        let mut conn = target.connect(timeout).await.ok();
        let owner = match conn.as_mut() {
            Some(c) => scripts::next_owner(c).await.ok(),
            None => None,
        }
        // Without Redis, a random tag: a clash (1 in 16 million per pair) is all it risks.
        .unwrap_or_else(|| u64::from(rand_tag()));
        let up = conn.is_some();
        metrics.up.set(1);
        let link = LedgerLink(Arc::new(Inner {
            target,
            timeout,
            beat_every,
            instance_id,
            owner,
            clock,
            conn: Mutex::new(conn),
            live: AtomicU64::new(instances_hint.max(1)),
            rank: AtomicU64::new(0),
            up: AtomicBool::new(true),
            metrics,
        }));
        if up {
            link.beat().await;
        } else {
            link.went_down(&RedisProblem::Unreachable {
                addr: link.0.target.addr(),
                detail: "no connection at start".to_string(),
            });
        }
        link
    }

    /// Beats every `sync.redis_interval` until the process ends (spawned on the current runtime).
    pub fn keep_beating(&self) {
        let link = self.clone();
        actix_rt::spawn(async move {
            let mut every = actix_rt::time::interval(link.0.beat_every);
            loop {
                every.tick().await;
                link.beat().await;
            }
        });
    }

    /// Says this instance is alive; counts the live ones; follows Redis' clock.
    pub async fn beat(&self) {
        let id = self.0.instance_id.clone();
        let ttl = self.0.beat_every * MISSED_BEATS;
        let result = self
            .call(|mut conn| async move { scripts::beat(&mut conn, &id, ttl).await })
            .await;
        if let Ok((now, live)) = result {
            self.0.clock.observe(now);
            let rank = live.iter().position(|i| *i == self.0.instance_id);
            self.0
                .live
                .store((live.len() as u64).max(1), Ordering::Relaxed);
            self.0
                .rank
                .store(rank.unwrap_or(0) as u64, Ordering::Relaxed);
            self.0.metrics.instances.set(live.len() as i64);
        }
    }

    /// Leaves the live instances (a clean stop).
    pub async fn leave(&self) {
        let id = self.0.instance_id.clone();
        let _ = self
            .call(|mut conn| async move { scripts::leave(&mut conn, &id).await })
            .await;
    }

    /// Reads an account's ledger.
    pub async fn load(&self, account_id: &str) -> Result<Loaded, RedisProblem> {
        let key = scripts::ledger_key(account_id);
        let loaded = self
            .call(|mut conn| async move { scripts::load(&mut conn, &key).await })
            .await?;
        self.0.clock.observe(loaded.now);
        Ok(loaded)
    }

    /// Writes an account's ledger over version `expected` (see [`scripts::swap`]).
    pub async fn swap(
        &self,
        account_id: &str,
        expected: Option<u64>,
        value: String,
    ) -> Result<Swapped, RedisProblem> {
        let key = scripts::ledger_key(account_id);
        let swapped = self
            .call(|mut conn| async move { scripts::swap(&mut conn, &key, expected, &value).await })
            .await?;
        self.0.metrics.writes_total.inc();
        if matches!(swapped, Swapped::Conflict { .. }) {
            self.0.metrics.conflicts_total.inc();
        }
        Ok(swapped)
    }

    /// Runs one call on the connection (connecting first when there is none yet), within
    /// `redis.timeout`; a failure marks the link down, a success up.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, RedisProblem>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let addr = || self.0.target.addr();
        let existing = self.0.conn.lock().expect("not poisoned").clone();
        let conn = match existing {
            Some(conn) => conn,
            None => match self.0.target.connect(self.0.timeout).await {
                Ok(conn) => {
                    *self.0.conn.lock().expect("not poisoned") = Some(conn.clone());
                    conn
                }
                Err(problem) => {
                    self.went_down(&problem);
                    return Err(problem);
                }
            },
        };
        let result = match tokio::time::timeout(self.0.timeout, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(&addr(), &e)),
            Err(_) => Err(RedisProblem::Timeout {
                addr: addr(),
                timeout: self.0.timeout,
            }),
        };
        match &result {
            Ok(_) => self.came_back(),
            Err(problem) => self.went_down(problem),
        }
        result
    }

    fn went_down(&self, problem: &RedisProblem) {
        if self.0.up.swap(false, Ordering::AcqRel) {
            self.0.metrics.up.set(0);
            log::error!(
                event = "ledger_degraded", instances = self.live_instances();
                "the shared ledgers are out of reach ({problem}): serving each account within this instance's share of what was left until Redis answers"
            );
        }
    }

    fn came_back(&self) {
        if !self.0.up.swap(true, Ordering::AcqRel) {
            self.0.metrics.up.set(1);
            log::info!(event = "ledger_recovered"; "Redis answers again: the shared ledgers are back, with what was admitted meanwhile");
        }
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Acquire)
    }

    /// Live instances, as last counted (at least 1).
    pub fn live_instances(&self) -> u64 {
        self.0.live.load(Ordering::Relaxed).max(1)
    }

    /// This instance's share of a limit while the ledgers are out of reach, for `account_id`
    /// (see [`crate::domain::share`]): its rank among the live instances as last counted.
    pub fn share_for(&self, account_id: &str) -> Share {
        let live = self.live_instances();
        Share::new(
            live,
            rank_for(account_id, self.0.rank.load(Ordering::Relaxed)),
        )
    }

    /// This instance's lease-owner tag.
    pub fn owner(&self) -> u64 {
        self.0.owner
    }

    pub fn instance_id(&self) -> &str {
        &self.0.instance_id
    }

    pub fn metrics(&self) -> &LedgerMetrics {
        &self.0.metrics
    }
}

/// 24 random bits, never 0.
fn rand_tag() -> u32 {
    (uuid::Uuid::new_v4().as_u128() as u32 & 0xFF_FFFF).max(1)
}
