//! One account's whole live state and the operations on it. Every operation takes `now`; none
//! does I/O. The operations live by concern in the child modules:
//!
//! - [`types`]: the spec, grants and denials, usage, upstream feedback, events, status views;
//! - `admission`: reserve, check, commit, release, renew, expire, consume;
//! - `ledger`: the account as a ledger of capacity leases (exchanges with holders);
//! - `feedback`: cooldowns, the circuit breaker, health averages, header ceilings;
//! - `changes`: an operator's reset and updates;
//! - `views`: status, window statistics, the pool's summary;
//! - `persist`: the saved state, the restore and the crash-gap charge.

use std::collections::HashMap;
use std::sync::Arc;

use super::lease::Units;
use super::limits::{LimitKind, NamedLimit};
use super::quota::Quota;
use super::share::Share;
use super::time::Millis;
use super::window::Window;

mod admission;
mod changes;
mod feedback;
mod ledger;
mod persist;
mod reserve;
mod shared;
mod types;
mod views;

pub use ledger::{Exchanged, NeedGranted, Successes};
pub use persist::{AccountState, LeasedUnits, SavedCopy};
pub use reserve::{Footprint, ReserveExchanged, RESERVE_EXCHANGES};
pub use shared::{LedgerState, SharedLease};
pub use types::{
    AccountEvent, AccountSpec, Circuit, Denial, Feedback, Grant, Limits, QuotaStatus, RateHeaders,
    Summary, UpstreamOutcome, Usage, WindowStats,
};

/// Consecutive failures that open the circuit.
pub const FAILURE_STREAK: u32 = 3;
/// First open period of the circuit; doubles on each failed probe.
pub const BASE_BACKOFF_MS: Millis = 5_000;
pub const MAX_BACKOFF_MS: Millis = 300_000;
/// Cooldown after an upstream 429 that gave no `retry-after`.
pub const DEFAULT_COOLDOWN_MS: Millis = 1_000;
/// Weight of the newest sample in the latency and error averages.
const EWMA_WEIGHT: f64 = 0.2;

/// A model name that makes `reserve` panic, to test the actors' panic isolation.
#[cfg(feature = "fault-injection")]
pub const PANIC_MODEL: &str = "quotagate-test-panic";

/// Units held for a holder: one request's reservation, or a holder's running lease (see
/// [`super::lease`]). The units count as in flight in every window of `mask`, the quota and the
/// concurrency slots until settled.
#[derive(Debug, Clone)]
struct Lease {
    model: Arc<str>,
    /// Bit `i` set: counted in `windows[i]`.
    mask: u64,
    held: Units,
    granted_at: Millis,
    deadline: Millis,
    /// The one request a half-open circuit lets through.
    probe: bool,
    /// A holder's lease, renewed by its reports (else: one request's reservation).
    holder: bool,
    /// The instance that granted it (see [`Account::set_owner`]); 0 in a single process.
    owner: u64,
}

/// A per-model concurrency limit and the slots the model holds.
#[derive(Debug, Clone)]
struct ModelSlots {
    model: Arc<str>,
    limit: u64,
    inflight: u64,
}

#[derive(Debug, Clone)]
pub struct Account {
    id: Arc<str>,
    active: bool,
    disabled_reason: Option<String>,
    expires_at: Option<Millis>,
    expiry_reported: bool,
    quota: Quota,
    windows: Vec<Window>,
    /// The account-wide concurrency limit.
    concurrent: Option<u64>,
    /// Concurrency slots held (by reservations and leases).
    inflight: u64,
    /// Per-model concurrency limits and the slots each model holds.
    model_slots: Vec<ModelSlots>,
    leases: HashMap<u64, Lease>,
    /// The next lease id of this owner (ids are `owner << 40 | n`: unique across instances).
    next_lease: u64,
    /// The instance whose leases this process grants (0 without shared ledgers).
    owner: u64,
    /// While the shared ledger is out of reach: this instance's part of every limit (see
    /// `shared`). `None` otherwise.
    share: Option<Share>,
    /// Usage this instance admitted that the shared ledger may not hold yet, per model: while
    /// out of reach of it, or since the last write (see `reserve`); reported to the ledger when
    /// a write lost a race or the ledger is back.
    unshared_use: Vec<(Arc<str>, Units, Millis)>,
    /// Whether the account's ledger is shared with other instances (see [`Account::set_owner`]).
    shares_ledger: bool,
    /// This instance's reserves in the shared ledger, one per busy model (see `reserve`).
    reserves: Vec<reserve::Reserve>,
    /// Raised when admission must stop at once everywhere (see [`super::lease`]).
    epoch: u64,
    cooldown_until: Millis,
    /// Models held back after an upstream 403, until a time each (few; usually none).
    model_cooldowns: Vec<(Arc<str>, Millis)>,
    circuit: Circuit,
    failures: u32,
    consecutive_429: u32,
    latency_ewma: f64,
    error_ewma: f64,
    header_requests: Option<usize>,
    header_tokens: Option<usize>,
    /// Increases with every change; the higher version wins on restore.
    version: u64,
    peak: Peak,
}

/// Highest admissions per interval, kept for the crash-gap charge.
#[derive(Debug, Clone, Copy, Default)]
struct Peak {
    interval: Millis,
    start: Millis,
    requests: u64,
    tokens: u64,
    peak_requests: u64,
    peak_tokens: u64,
}

impl Peak {
    fn add(&mut self, requests: u64, tokens: u64, now: Millis) {
        if self.interval > 0 && now >= self.start + self.interval {
            self.start = now - (now - self.start) % self.interval;
            self.requests = 0;
            self.tokens = 0;
        }
        self.requests += requests;
        self.tokens += tokens;
        self.peak_requests = self.peak_requests.max(self.requests);
        self.peak_tokens = self.peak_tokens.max(self.tokens);
    }
}

impl Account {
    pub fn new(spec: &AccountSpec, now: Millis) -> Result<Account, String> {
        let mut windows = Vec::new();
        let mut concurrent = None;
        let mut model_slots: Vec<ModelSlots> = Vec::new();
        for (model, limit) in spec.limits.iter() {
            match (Window::new(limit, model.clone(), now)?, model) {
                (Some(w), _) => windows.push(w),
                (None, None) => {
                    concurrent = Some(concurrent.map_or(limit.limit, |c: u64| c.min(limit.limit)))
                }
                // A per-model `concurrent` limits that model's requests only.
                (None, Some(model)) => match model_slots.iter_mut().find(|m| m.model == *model) {
                    Some(m) => m.limit = m.limit.min(limit.limit),
                    None => model_slots.push(ModelSlots {
                        model: model.clone(),
                        limit: limit.limit,
                        inflight: 0,
                    }),
                },
            }
        }
        if windows.len() > 64 {
            return Err(format!(
                "account {} has {} windows (at most 64)",
                spec.id,
                windows.len()
            ));
        }
        let find = |named: Option<NamedLimit>| {
            named.and_then(|n| {
                windows.iter().position(|w| {
                    w.model().is_none()
                        && w.kind() == n.kind()
                        && Some(w.per_ms()) == n.per().map(|p| p.as_millis() as i64)
                })
            })
        };
        let header_requests = find(spec.header_requests);
        let header_tokens = find(spec.header_tokens);
        Ok(Account {
            id: spec.id.clone(),
            active: spec.active,
            disabled_reason: spec.disabled_reason.clone(),
            expires_at: spec.expires_at,
            expiry_reported: false,
            quota: Quota::new(
                spec.quota_limit,
                spec.quota_used,
                spec.quota_schedule.clone(),
                spec.warning_threshold,
                now,
            ),
            windows,
            concurrent,
            model_slots,
            inflight: 0,
            leases: HashMap::new(),
            next_lease: 1,
            owner: 0,
            share: None,
            unshared_use: Vec::new(),
            shares_ledger: false,
            reserves: Vec::new(),
            epoch: 1,
            cooldown_until: 0,
            model_cooldowns: Vec::new(),
            circuit: Circuit::Closed,
            failures: 0,
            consecutive_429: 0,
            latency_ewma: 0.0,
            error_ewma: 0.0,
            header_requests,
            header_tokens,
            version: 0,
            peak: Peak::default(),
        })
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn inflight(&self) -> u64 {
        self.inflight
    }

    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The earliest deadline of an unsettled reservation or lease.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.leases.values().map(|r| r.deadline).min()
    }

    /// The lease epoch: leases granted under an older one admit nothing more.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Starts the epoch at `epoch` (a rebuilt account: above every epoch of the one it replaces,
    /// so that no lease of the old one admits again).
    pub fn start_epoch_at(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Stops admission from every lease at once (their units come back at their reports).
    pub fn revoke_leases(&mut self) {
        self.epoch += 1;
        self.touch();
    }

    /// Sets how long the peak-rate intervals are (the sync interval).
    pub fn set_peak_interval(&mut self, interval: Millis) {
        self.peak.interval = interval.max(1);
    }

    fn touch(&mut self) {
        self.version += 1;
    }

    /// Brings periods and windows up to `now`; returns the events that produced.
    pub fn roll(&mut self, now: Millis, events: &mut Vec<AccountEvent>) {
        if let Some(e) = self.quota.roll(now) {
            events.push(e.into());
            self.touch();
        }
        for w in &mut self.windows {
            w.roll(now);
        }
        self.model_cooldowns.retain(|(_, until)| now < *until);
        if let Circuit::Open { until, backoff } = self.circuit {
            if now >= until {
                self.circuit = Circuit::HalfOpen {
                    probing: false,
                    backoff,
                };
            }
        }
        if !self.expiry_reported && self.expires_at.is_some_and(|t| now >= t) {
            self.expiry_reported = true;
            events.push(AccountEvent::Expired);
        }
    }
}

/// Units a request of `tokens` takes in a window of `kind`.
fn units(kind: LimitKind, requests: u64, tokens: u64) -> u64 {
    match kind {
        LimitKind::Requests => requests,
        _ => tokens,
    }
}

fn ewma(current: f64, sample: f64) -> f64 {
    if current == 0.0 {
        sample
    } else {
        current + EWMA_WEIGHT * (sample - current)
    }
}
