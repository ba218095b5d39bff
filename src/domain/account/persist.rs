//! The persisted state of an account and the restore after a start: the saved copy, what was in
//! flight or leased (committed as used), and the charge for the unknown gap after a crash.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Account, Circuit, Units};
use crate::domain::limits::LimitKind;
use crate::domain::quota::QuotaCounters;
use crate::domain::time::Millis;
use crate::domain::window::{Window, WindowCounters};

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
pub(super) fn saved_window<'a>(
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

/// Units a holder held when the state was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedUnits {
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
}

impl Account {
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
        self.load_counters(saved, now);
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

    /// The saved counters, cooldowns, circuit and peaks (what was in flight is the caller's).
    pub(super) fn load_counters(&mut self, saved: &AccountState, now: Millis) {
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
