//! One account's whole live state and the operations on it: reserve, commit, release, renew,
//! expire, upstream feedback (cooldown, circuit breaker, header tightening), reset, and the
//! persisted snapshot. Every operation takes `now`; none does I/O.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::lease::Units;
use super::limits::{LimitKind, LimitSpec, NamedLimit};
use super::quota::{Quota, QuotaCounters, QuotaEvent};
use super::schedule::Schedule;
use super::time::Millis;
use super::window::{Block, Window, WindowCounters};

mod ledger;

pub use ledger::{Exchanged, NeedGranted, Successes};

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

/// An account's effective limits: `None` model = every model. Shared between accounts that have
/// the same limits.
pub type Limits = Arc<[(Option<Arc<str>>, LimitSpec)]>;

/// Everything needed to build an account's state.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountSpec {
    pub id: Arc<str>,
    pub active: bool,
    pub disabled_reason: Option<String>,
    pub expires_at: Option<Millis>,
    /// Tokens per quota period; 0 = unlimited.
    pub quota_limit: u64,
    /// Usage already recorded this period (from the store).
    pub quota_used: u64,
    pub quota_schedule: Schedule,
    pub warning_threshold: f64,
    /// Effective limits (the account's overrides applied): `None` model = every model. Shared:
    /// accounts with the same limits hold one copy.
    pub limits: Limits,
    /// Which windows the upstream's `x-ratelimit-*` headers describe.
    pub header_requests: Option<NamedLimit>,
    pub header_tokens: Option<NamedLimit>,
}

/// A reservation granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub reservation: u64,
    pub deadline: Millis,
    /// Smallest remainder over the request windows after this reservation (`None`: no window).
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// Why an account refuses a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Disabled by an operator, by the config, or after an upstream 401.
    Disabled {
        reason: Option<String>,
    },
    Expired,
    /// The request needs more than a limit allows at all: it can never pass here.
    Impossible {
        limit: Arc<str>,
        limit_value: u64,
        need: u64,
    },
    QuotaExceeded {
        reset_at: Millis,
    },
    /// Held by a rate limit, a cooldown or the circuit breaker until `retry_at`; a lower bound
    /// when in-flight work decides the real time.
    RateLimited {
        limit: Arc<str>,
        retry_at: Millis,
        lower_bound: bool,
    },
}

/// What a settled request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The upstream reported this many tokens (prompt + completion).
    Reported(u64),
    /// The upstream answered with an error: its request slot counts, no tokens.
    RequestOnly,
    /// The outcome is unknown (timeout, broken connection, expiry, shutdown): the estimate.
    Estimate,
}

/// How the upstream answered, for health and cooldown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Success,
    /// 429: cool down for `retry_after_ms` (or a default), already capped at
    /// `upstream.max_cooldown` by whoever read it; `capped` when the upstream asked for more.
    RateLimited {
        retry_after_ms: Option<Millis>,
        capped: bool,
    },
    /// 401: the key is not accepted; the account is disabled.
    Unauthorized,
    /// 403 (a model not enabled for this key, a region, a policy): the account stays away from
    /// `model` for `cooldown_ms` (`upstream.forbidden_cooldown`), and keeps serving other models.
    Forbidden {
        model: Arc<str>,
        cooldown_ms: Millis,
    },
    /// 5xx, connection error, timeout.
    Failure,
}

/// The upstream's `x-ratelimit-*` headers, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests_remaining: Option<u64>,
    pub requests_reset_ms: Option<Millis>,
    pub tokens_remaining: Option<u64>,
    pub tokens_reset_ms: Option<Millis>,
}

/// Feedback from one upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub outcome: UpstreamOutcome,
    pub latency_ms: u64,
    pub headers: RateHeaders,
}

/// Something worth telling subscribers.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountEvent {
    QuotaWarning {
        used: u64,
        limit: u64,
        fraction: f64,
    },
    QuotaExhausted {
        used: u64,
        limit: u64,
    },
    QuotaReset {
        previous_used: u64,
    },
    Cooldown {
        until: Millis,
        reason: &'static str,
    },
    Disabled {
        reason: String,
    },
    Expired,
}

impl From<QuotaEvent> for AccountEvent {
    fn from(e: QuotaEvent) -> Self {
        match e {
            QuotaEvent::Warning {
                used,
                limit,
                fraction,
            } => AccountEvent::QuotaWarning {
                used,
                limit,
                fraction,
            },
            QuotaEvent::Exhausted { used, limit } => AccountEvent::QuotaExhausted { used, limit },
            QuotaEvent::Reset { previous_used } => AccountEvent::QuotaReset { previous_used },
        }
    }
}

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
}

/// The circuit breaker: closed (normal), open until a time, or half-open (one probe at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Circuit {
    Closed,
    Open { until: Millis, backoff: Millis },
    HalfOpen { probing: bool, backoff: Millis },
}

/// The seed's `QuotaStatus`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaStatus {
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub current_usage: u64,
    pub limit: u64,
    pub usage_percent: f64,
    pub reset_at: Millis,
    /// Reservations not yet settled (the status page's "in flight").
    pub in_flight: u64,
    /// While an upstream's "wait" holds the account: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_until: Option<Millis>,
    /// While the circuit breaker is open: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_open_until: Option<Millis>,
}

/// The seed's per-limit `GetStats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowStats {
    pub limit_type: String,
    pub limit: u64,
    pub current: u64,
    pub in_flight: u64,
    pub window_start: Millis,
    /// Seconds until one more request (of one unit) could pass; 0 when it can now.
    pub retry_after: f64,
    /// What the window counts (`requests`, `tokens`, `concurrent`), for forecasts.
    pub kind: LimitKind,
    /// The window's length in ms (0 for `concurrent`).
    pub period_ms: Millis,
    /// When a fixed window's period ends; `None` for a sliding window.
    pub resets_at: Option<Millis>,
}

/// What the pool needs to order its candidates, refreshed with every reply.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub available: bool,
    pub quota_fraction: f64,
    /// Smallest remaining fraction over the account-wide windows (1 = empty).
    pub headroom: f64,
    pub error_rate: f64,
    pub latency_ms: f64,
    pub inflight: u64,
}

/// What a start found of an account's saved state. Set by the restore, never persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SavedCopy {
    /// A readable copy: its counters are restored.
    #[default]
    Read,
    /// No copy at all (an account created, or never synced, since the last complete copy):
    /// nothing to restore; the crash gap, if any, is charged.
    Missing,
    /// A copy that could not be read: what it held is unknown, so every window is charged full.
    /// The state's `version` is the unreadable copy's, so that the restored account's next
    /// writes are newer than it (a store refuses a write with a lower version).
    Unreadable,
}

/// The persisted state of an account (JSON in `account_state` and Redis).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AccountState {
    pub version: u64,
    pub saved_at: Millis,
    pub quota: QuotaCounters,
    /// Window counters by label.
    pub windows: Vec<(String, WindowCounters)>,
    pub cooldown_until: Millis,
    pub circuit: Option<Circuit>,
    pub failures: u32,
    /// Reservations in flight when saved (estimate, model): a restore commits them at their
    /// estimate.
    pub in_flight: Vec<(u64, String)>,
    /// Units leased to holders when saved: a restore commits them as used, like reservations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leased: Vec<LeasedUnits>,
    /// Highest requests and tokens admitted in one sync interval (for the crash-gap charge).
    pub peak_requests: u64,
    pub peak_tokens: u64,
    /// Models this account must not be sent until a time (after an upstream 403).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_cooldowns: Vec<(String, Millis)>,
    /// How this state was found at start (not persisted).
    #[serde(skip)]
    pub copy: SavedCopy,
}

impl AccountState {
    /// The stand-in for an account with no saved copy.
    pub fn missing() -> AccountState {
        AccountState {
            copy: SavedCopy::Missing,
            ..AccountState::default()
        }
    }

    /// The stand-in for a copy that could not be read, stored at `version`.
    pub fn unreadable(version: u64) -> AccountState {
        AccountState {
            version,
            copy: SavedCopy::Unreadable,
            ..AccountState::default()
        }
    }
}

/// The saved counters of the window labelled `label`, or of the same limit with the other expiry
/// (`rpd` and `rpd:fixed`): an operator turning a sliding limit into a fixed one keeps its
/// counters.
fn saved_window<'a>(
    saved: &'a [(String, WindowCounters)],
    label: &str,
) -> Option<&'a WindowCounters> {
    let other = match label.strip_suffix(":fixed") {
        Some(sliding) => sliding.to_string(),
        None => format!("{label}:fixed"),
    };
    saved
        .iter()
        .find(|(l, _)| l == label)
        .or_else(|| saved.iter().find(|(l, _)| *l == other))
        .map(|(_, counters)| counters)
}

/// A per-model concurrency limit and the slots the model holds.
#[derive(Debug, Clone)]
struct ModelSlots {
    model: Arc<str>,
    limit: u64,
    inflight: u64,
}

/// Units a holder held when the state was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedUnits {
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
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
    next_lease: u64,
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

    /// Reserves `estimate` tokens and one request slot in every window that applies to `model`,
    /// plus a concurrency slot: all or nothing.
    pub fn reserve(
        &mut self,
        model: &str,
        estimate: u64,
        now: Millis,
        timeout: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> Result<Grant, Denial> {
        #[cfg(feature = "fault-injection")]
        if model == PANIC_MODEL {
            // Mutate first, so a test can see that the state from before the message survives.
            self.inflight += 1_000;
            panic!("injected panic while reserving");
        }
        // Every request costs at least one token, so a full token window can never be passed.
        let estimate = estimate.max(1);
        self.roll(now, events);
        self.admissible(model, estimate, now)?;
        let probe = self.take_probe();
        let deadline = now.saturating_add(timeout);
        let id = self.open_lease(model, Units::request(estimate), now, deadline, probe, false);
        let (remaining_requests, remaining_tokens) = self.window_room(model, now);
        Ok(Grant {
            reservation: id,
            deadline,
            remaining_requests,
            remaining_tokens,
        })
    }

    /// Whether a reservation would pass now, without taking it (the seed's `CheckAvailability`).
    /// Call [`Account::roll`] first.
    pub fn admissible(&self, model: &str, estimate: u64, now: Millis) -> Result<(), Denial> {
        self.admissible_units(model, Units::request(estimate), now)
    }

    /// Whether `need` would fit now (a request, or several at once). Call [`Account::roll`]
    /// first.
    pub fn admissible_units(&self, model: &str, need: Units, now: Millis) -> Result<(), Denial> {
        let estimate = need.tokens;
        if !self.active {
            return Err(Denial::Disabled {
                reason: self.disabled_reason.clone(),
            });
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return Err(Denial::Expired);
        }
        // A request that can never pass here says so, whatever else holds the account now.
        let quota = self.quota.check(estimate);
        if quota == Err(true) {
            return Err(Denial::Impossible {
                limit: Arc::from("quota"),
                limit_value: self.quota.limit,
                need: estimate,
            });
        }
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            let need = units(w.kind(), need.requests, estimate);
            if need > w.limit() {
                return Err(Denial::Impossible {
                    limit: w.label().clone(),
                    limit_value: w.limit(),
                    need,
                });
            }
        }
        if quota == Err(false) {
            return Err(Denial::QuotaExceeded {
                reset_at: self.quota.reset_at(),
            });
        }
        // The latest block names the time; it is a lower bound when any block is one, since
        // in-flight work may hold longer than the others' times.
        let mut held: Option<(Arc<str>, Millis, bool)> = None;
        let mut hold = |label: &Arc<str>, at: Millis, lower: bool| match held.as_mut() {
            Some((_, t, l)) if at <= *t => *l |= lower,
            Some((_, _, l)) => held = Some((label.clone(), at, *l || lower)),
            None => held = Some((label.clone(), at, lower)),
        };
        for w in self.windows.iter().filter(|w| w.applies_to(model)) {
            match w.check(units(w.kind(), need.requests, estimate), now) {
                Ok(()) => {}
                Err(Block::Impossible { limit, need }) => {
                    return Err(Denial::Impossible {
                        limit: w.label().clone(),
                        limit_value: limit,
                        need,
                    })
                }
                Err(Block::Full {
                    retry_at,
                    lower_bound,
                }) => hold(w.label(), retry_at, lower_bound),
            }
        }
        if now < self.cooldown_until {
            hold(&Arc::from("cooldown"), self.cooldown_until, false);
        }
        if let Some((_, until)) = self
            .model_cooldowns
            .iter()
            .find(|(m, until)| **m == *model && now < *until)
        {
            hold(&Arc::from("model_cooldown"), *until, false);
        }
        match self.circuit {
            Circuit::Open { until, .. } if now < until => {
                hold(&Arc::from("circuit_open"), until, false)
            }
            Circuit::HalfOpen { probing: true, .. } => hold(
                &Arc::from("circuit_probe"),
                now + self.expected_latency(now),
                true,
            ),
            _ => {}
        }
        if let Some(limit) = self.concurrent {
            if self.inflight + need.slots > limit {
                hold(
                    &Arc::from("concurrent"),
                    now + self.expected_latency(now),
                    true,
                );
            }
        }
        if let Some(m) = self.model_slots.iter().find(|m| &*m.model == model) {
            if m.inflight + need.slots > m.limit {
                hold(
                    &Arc::from(format!("{model}:concurrent")),
                    now + self.expected_latency(now),
                    true,
                );
            }
        }
        match held {
            None => Ok(()),
            Some((limit, retry_at, lower_bound)) => Err(Denial::RateLimited {
                limit,
                retry_at,
                lower_bound,
            }),
        }
    }

    /// A guess at when the oldest request in flight finishes: the average latency less its age,
    /// at least 50 ms. Only used as a lower-bound hint.
    fn expected_latency(&self, now: Millis) -> Millis {
        let oldest = self
            .leases
            .values()
            .filter(|l| !l.holder)
            .map(|l| l.granted_at)
            .min();
        let age = oldest.map_or(0, |t| now - t);
        (self.latency_ewma as Millis - age).max(50)
    }

    /// Settles a reservation with what it used; `false` when it was already settled (e.g.
    /// expired), which is not an error.
    pub fn commit(
        &mut self,
        reservation: u64,
        usage: Usage,
        now: Millis,
        events: &mut Vec<AccountEvent>,
    ) -> bool {
        self.roll(now, events);
        let Some(lease) = self.leases.remove(&reservation) else {
            return false;
        };
        let tokens = match usage {
            Usage::Reported(t) => t,
            Usage::RequestOnly => 0,
            Usage::Estimate => lease.held.tokens,
        };
        let used = Units {
            requests: lease.held.requests,
            tokens,
            slots: 0,
        };
        self.close_lease(&lease, used, now, events);
        true
    }

    /// Returns a reservation that never reached the upstream; `false` when unknown.
    pub fn release(&mut self, reservation: u64) -> bool {
        let Some(lease) = self.leases.remove(&reservation) else {
            return false;
        };
        self.close_lease(&lease, Units::ZERO, 0, &mut Vec::new());
        true
    }

    /// A probe that ended without feedback lets the next one through.
    fn end_probe(&mut self) {
        if let Circuit::HalfOpen {
            probing: true,
            backoff,
        } = self.circuit
        {
            self.circuit = Circuit::HalfOpen {
                probing: false,
                backoff,
            };
        }
    }

    /// Extends a long stream's reservation; `false` when unknown.
    pub fn renew(&mut self, reservation: u64, now: Millis, timeout: Millis) -> bool {
        match self.leases.get_mut(&reservation) {
            Some(r) => {
                r.deadline = now.saturating_add(timeout);
                true
            }
            None => false,
        }
    }

    /// Commits every reservation and lease past its deadline as used in full (its outcome is
    /// unknown); returns how many.
    pub fn expire(&mut self, now: Millis, events: &mut Vec<AccountEvent>) -> usize {
        self.roll(now, events);
        let due: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            if let Some(lease) = self.leases.remove(id) {
                let used = Units {
                    slots: 0,
                    ..lease.held
                };
                self.close_lease(&lease, used, now, events);
            }
        }
        due.len()
    }

    /// Applies an upstream answer: latency and error averages, cooldown after a 429, the circuit
    /// breaker after failures, disabling after a 401, a per-model cooldown after a 403, and header
    /// tightening. Whatever the values (huge, negative), time arithmetic saturates: nothing here
    /// can panic and lose the commit that arrives in the same message.
    pub fn feedback(&mut self, fb: &Feedback, now: Millis, events: &mut Vec<AccountEvent>) {
        let was_open = self.open_for_leases(now);
        let failed = matches!(fb.outcome, UpstreamOutcome::Failure);
        self.latency_ewma = ewma(self.latency_ewma, fb.latency_ms as f64);
        self.error_ewma = ewma(self.error_ewma, if failed { 1.0 } else { 0.0 });
        match &fb.outcome {
            UpstreamOutcome::Success => {
                self.failures = 0;
                self.consecutive_429 = 0;
                self.circuit = Circuit::Closed;
            }
            UpstreamOutcome::RateLimited {
                retry_after_ms,
                capped,
            } => {
                self.consecutive_429 = self.consecutive_429.saturating_add(1);
                let fallback = [fb.headers.requests_reset_ms, fb.headers.tokens_reset_ms]
                    .into_iter()
                    .flatten()
                    .max();
                let backoff = DEFAULT_COOLDOWN_MS << (self.consecutive_429 - 1).min(6);
                let wait = retry_after_ms.or(fallback).unwrap_or(backoff).max(1);
                let until = now.saturating_add(wait);
                if until > self.cooldown_until {
                    self.cooldown_until = until;
                    events.push(AccountEvent::Cooldown {
                        until,
                        reason: if *capped {
                            "upstream_429_capped"
                        } else {
                            "upstream_429"
                        },
                    });
                }
            }
            UpstreamOutcome::Forbidden { model, cooldown_ms } => {
                let until = now.saturating_add((*cooldown_ms).max(1));
                match self.model_cooldowns.iter_mut().find(|(m, _)| m == model) {
                    Some((_, at)) => *at = (*at).max(until),
                    None => self.model_cooldowns.push((model.clone(), until)),
                }
                events.push(AccountEvent::Cooldown {
                    until,
                    reason: "upstream_403",
                });
                // Holders of leases for that model must stop too (the others ask again).
                self.revoke_leases();
            }
            UpstreamOutcome::Unauthorized => {
                if self.active {
                    let reason = "upstream rejected the key (401)".to_string();
                    self.active = false;
                    self.disabled_reason = Some(reason.clone());
                    events.push(AccountEvent::Disabled { reason });
                }
            }
            UpstreamOutcome::Failure => {
                self.failures += 1;
                let open = match self.circuit {
                    Circuit::Closed if self.failures >= FAILURE_STREAK => Some(BASE_BACKOFF_MS),
                    Circuit::HalfOpen { backoff, .. } => Some((backoff * 2).min(MAX_BACKOFF_MS)),
                    _ => None,
                };
                if let Some(backoff) = open {
                    let until = now.saturating_add(backoff);
                    self.circuit = Circuit::Open { until, backoff };
                    events.push(AccountEvent::Cooldown {
                        until,
                        reason: "upstream_failures",
                    });
                }
            }
        }
        let h = fb.headers;
        for (target, remaining, reset) in [
            (
                self.header_requests,
                h.requests_remaining,
                h.requests_reset_ms,
            ),
            (self.header_tokens, h.tokens_remaining, h.tokens_reset_ms),
        ] {
            if let (Some(i), Some(remaining), Some(reset)) = (target, remaining, reset) {
                self.windows[i].tighten(remaining, now.saturating_add(reset), now);
                if self.windows[i].remaining(now) == 0 {
                    // The upstream has less room than is leased out: holders stop at once.
                    self.revoke_leases();
                }
            }
        }
        if was_open && !self.open_for_leases(now) {
            // A 429, a refused key or an open circuit stops every holder at once.
            self.revoke_leases();
        }
        self.touch();
    }

    /// Single-request reservations in flight (leases of holders not counted).
    pub fn reservations_in_flight(&self) -> u64 {
        self.leases.values().filter(|l| !l.holder).count() as u64
    }

    /// Records usage directly (the seed's `ConsumeQuota` + `RecordRequest`), without a reservation.
    pub fn consume(
        &mut self,
        model: &str,
        tokens: u64,
        now: Millis,
        events: &mut Vec<AccountEvent>,
    ) {
        self.roll(now, events);
        let used = Units {
            requests: 1,
            tokens,
            slots: 0,
        };
        self.record_used(model, used, now, events);
    }

    /// An operator's reset: quota usage, windows, cooldown and circuit. Reservations in flight
    /// stay (they will still be settled).
    pub fn reset(&mut self, now: Millis, events: &mut Vec<AccountEvent>) {
        // Holders' cached refusals and leases were sized before the reset: start over.
        self.revoke_leases();
        events.push(self.quota.reset(now).into());
        for w in &mut self.windows {
            w.clear(now);
        }
        self.cooldown_until = 0;
        self.model_cooldowns.clear();
        self.circuit = Circuit::Closed;
        self.failures = 0;
        self.consecutive_429 = 0;
        self.touch();
    }

    /// Changes what an operator may change at run time, keeping every counter. Windows whose
    /// label survives keep their counters; in-flight units move with them.
    pub fn update(&mut self, spec: &AccountSpec, now: Millis) -> Result<(), String> {
        let mut next = Account::new(spec, now)?;
        let saved = self.state(now);
        next.quota.restore(&saved.quota, now, now);
        next.quota.set_limit(spec.quota_limit);
        for w in &mut next.windows {
            if let Some(counters) = saved_window(&saved.windows, w.label()) {
                w.restore(counters, now, now);
            }
        }
        next.leases = std::mem::take(&mut self.leases);
        next.next_lease = self.next_lease;
        let leases: Vec<(u64, Lease)> = next.leases.drain().collect();
        for (id, mut lease) in leases {
            lease.mask = next.mask_for(&lease.model);
            next.hold(lease.mask, &lease.model, lease.held);
            next.leases.insert(id, lease);
        }
        // Limits changed: holders must ask again under the new ones.
        next.epoch = self.epoch + 1;
        next.cooldown_until = self.cooldown_until;
        next.model_cooldowns = std::mem::take(&mut self.model_cooldowns);
        next.circuit = self.circuit;
        next.failures = self.failures;
        next.consecutive_429 = self.consecutive_429;
        next.latency_ewma = self.latency_ewma;
        next.error_ewma = self.error_ewma;
        next.version = self.version + 1;
        next.peak = self.peak;
        next.expiry_reported = self.expiry_reported && next.expires_at == self.expires_at;
        *self = next;
        Ok(())
    }

    /// The seed's `QuotaStatus`.
    pub fn status(&self, now: Millis) -> QuotaStatus {
        let reason = if !self.active {
            Some(
                self.disabled_reason
                    .clone()
                    .unwrap_or_else(|| "disabled".into()),
            )
        } else if self.expires_at.is_some_and(|t| now >= t) {
            Some("expired".into())
        } else if self.quota.is_exhausted() {
            Some("quota_exceeded".into())
        } else if now < self.cooldown_until {
            Some("cooldown".into())
        } else if matches!(self.circuit, Circuit::Open { until, .. } if now < until) {
            Some("circuit_open".into())
        } else {
            None
        };
        QuotaStatus {
            available: reason.is_none(),
            reason,
            current_usage: self.quota.used(),
            limit: self.quota.limit,
            usage_percent: self.quota.usage_fraction() * 100.0,
            reset_at: self.quota.reset_at(),
            in_flight: self.inflight,
            cooldown_until: (now < self.cooldown_until).then_some(self.cooldown_until),
            circuit_open_until: match self.circuit {
                Circuit::Open { until, .. } if now < until => Some(until),
                _ => None,
            },
        }
    }

    /// Per-window statistics (the seed's `GetStats`), plus `concurrent`.
    pub fn window_stats(&self, now: Millis) -> Vec<WindowStats> {
        let mut stats: Vec<WindowStats> = self
            .windows
            .iter()
            .map(|w| {
                let retry_after = match w.check(1, now) {
                    Ok(()) | Err(Block::Impossible { .. }) => 0.0,
                    Err(Block::Full { retry_at, .. }) => (retry_at - now).max(0) as f64 / 1000.0,
                };
                WindowStats {
                    limit_type: w.label().to_string(),
                    limit: w.limit(),
                    current: w.used(),
                    in_flight: w.inflight(),
                    window_start: w.window_start(now),
                    retry_after,
                    kind: w.kind(),
                    period_ms: w.per_ms(),
                    resets_at: w.resets_at(),
                }
            })
            .collect();
        let model_limits = self
            .model_slots
            .iter()
            .map(|m| (format!("{}:concurrent", m.model), m.limit, m.inflight));
        for (label, limit, inflight) in self
            .concurrent
            .map(|limit| ("concurrent".to_string(), limit, self.inflight))
            .into_iter()
            .chain(model_limits)
        {
            stats.push(WindowStats {
                limit_type: label,
                limit,
                current: inflight,
                in_flight: inflight,
                window_start: now,
                retry_after: if inflight >= limit {
                    self.expected_latency(now) as f64 / 1000.0
                } else {
                    0.0
                },
                kind: LimitKind::Concurrent,
                period_ms: 0,
                resets_at: None,
            });
        }
        stats
    }

    /// What the pool orders candidates by.
    pub fn summary(&self, now: Millis) -> Summary {
        let headroom = self
            .windows
            .iter()
            .filter(|w| w.model().is_none())
            .map(|w| w.remaining(now) as f64 / w.limit().max(1) as f64)
            .fold(1.0, f64::min);
        Summary {
            available: self.admissible_quick(now),
            quota_fraction: self.quota.usage_fraction(),
            headroom,
            error_rate: self.error_ewma,
            latency_ms: self.latency_ewma,
            inflight: self.inflight,
        }
    }

    fn admissible_quick(&self, now: Millis) -> bool {
        self.active
            && self.expires_at.is_none_or(|t| now < t)
            && !self.quota.is_exhausted()
            && now >= self.cooldown_until
            && !matches!(self.circuit, Circuit::Open { until, .. } if now < until)
    }

    /// The persisted state.
    pub fn state(&self, now: Millis) -> AccountState {
        AccountState {
            version: self.version,
            saved_at: now,
            quota: self.quota.counters(),
            windows: self
                .windows
                .iter()
                .map(|w| (w.label().to_string(), w.counters()))
                .collect(),
            cooldown_until: self.cooldown_until,
            circuit: Some(self.circuit),
            failures: self.failures,
            in_flight: self
                .leases
                .values()
                .filter(|l| !l.holder)
                .map(|l| (l.held.tokens, l.model.to_string()))
                .collect(),
            leased: self
                .leases
                .values()
                .filter(|l| l.holder && !l.held.is_zero())
                .map(|l| LeasedUnits {
                    model: l.model.to_string(),
                    requests: l.held.requests,
                    tokens: l.held.tokens,
                })
                .collect(),
            peak_requests: self.peak.peak_requests,
            peak_tokens: self.peak.peak_tokens,
            model_cooldowns: self
                .model_cooldowns
                .iter()
                .map(|(m, until)| (m.to_string(), *until))
                .collect(),
            copy: SavedCopy::Read,
        }
    }

    /// Restores a saved state. Reservations that were in flight are committed at their estimate
    /// now (their answers may have been counted upstream at any moment until now). With
    /// `gap = Some(ms)` (the process stopped without a clean mark while it may have been
    /// admitting), the unsynced interval is charged conservatively: see [`Account::charge_gap`].
    /// A [`SavedCopy::Missing`] state restores nothing but the gap; an
    /// [`SavedCopy::Unreadable`] one fills every window, its counters being unknown (the quota
    /// keeps the spec's `quota_used`, which the store writes with each state). Either way the
    /// restored version is above the saved one.
    pub fn restore(&mut self, saved: &AccountState, now: Millis, gap: Option<Millis>) {
        match saved.copy {
            SavedCopy::Read => self.restore_counters(saved, now),
            SavedCopy::Missing => {}
            SavedCopy::Unreadable => {
                for w in &mut self.windows {
                    let room = w.remaining(now);
                    w.record(room, now);
                }
            }
        }
        if let Some(gap) = gap {
            self.charge_gap(gap, now);
        }
        self.version = self.version.max(saved.version) + 1;
    }

    fn restore_counters(&mut self, saved: &AccountState, now: Millis) {
        self.quota.restore(&saved.quota, saved.saved_at, now);
        for w in &mut self.windows {
            if let Some(counters) = saved_window(&saved.windows, w.label()) {
                w.restore(counters, saved.saved_at, now);
            }
        }
        self.cooldown_until = saved.cooldown_until;
        self.model_cooldowns = saved
            .model_cooldowns
            .iter()
            .filter(|(_, until)| now < *until)
            .map(|(m, until)| (Arc::from(m.as_str()), *until))
            .collect();
        self.circuit = saved.circuit.unwrap_or(Circuit::Closed);
        self.failures = saved.failures;
        self.peak.peak_requests = saved.peak_requests;
        self.peak.peak_tokens = saved.peak_tokens;
        let mut events = Vec::new();
        for (estimate, model) in &saved.in_flight {
            self.consume(model, *estimate, now, &mut events);
        }
        for leased in &saved.leased {
            let used = Units {
                requests: leased.requests,
                tokens: leased.tokens,
                slots: 0,
            };
            self.record_used(&leased.model, used, now, &mut events);
        }
    }

    /// Charges what the account could at most have been admitted in `gap` ms without our
    /// knowing, so that a restored state is never below the truth.
    ///
    /// Per kind (requests, tokens), the bound is the tightest account-wide window's room now
    /// (units still held now were held through the whole gap) plus its full limit for every
    /// further window length the gap spans; a kind without a window is bounded by the highest
    /// amount admitted in one interval, times the intervals the gap spans. Each window is charged
    /// the bound, capped at its room (no window ever held more than its limit of real units at
    /// once, so a full window is the most the truth can be), as committed now — later than the
    /// real commits, so the charge also expires no earlier than the truth. The quota is charged
    /// the token bound, capped at its own room (nothing beyond it could have been admitted).
    pub fn charge_gap(&mut self, gap: Millis, now: Millis) {
        let gap = gap.max(0);
        let intervals = if self.peak.interval > 0 {
            (gap / self.peak.interval + 1) as u64
        } else {
            1
        };
        let bound = |kind: LimitKind, peak: u64, windows: &[Window]| -> u64 {
            windows
                .iter()
                .filter(|w| w.kind() == kind && w.model().is_none())
                .map(|w| {
                    let per = w.per_ms().max(1);
                    let further_spans = (((gap + per - 1) / per).max(1) - 1) as u64;
                    w.remaining(now)
                        .saturating_add(w.limit().saturating_mul(further_spans))
                })
                .min()
                .unwrap_or(peak.saturating_mul(intervals))
        };
        let requests = bound(LimitKind::Requests, self.peak.peak_requests, &self.windows);
        let tokens = bound(LimitKind::Tokens, self.peak.peak_tokens, &self.windows);
        for w in &mut self.windows {
            let units = match w.kind() {
                LimitKind::Requests => requests,
                _ => tokens,
            };
            w.record(units.min(w.remaining(now)), now);
        }
        let mut events = Vec::new();
        self.quota
            .record(tokens.min(self.quota.remaining()), &mut events);
        self.touch();
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
