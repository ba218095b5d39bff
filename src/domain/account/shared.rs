//! The account's ledger shared by several instances (DESIGN.md, "Capacity leases", level 2): its
//! whole state as it lives in Redis ([`LedgerState`]), loading it, and what an instance does while
//! it cannot reach it — keep to its share of what was left, and remember what it admitted, to
//! report it when the ledger is back.
//!
//! Every instance applies the same exchanges to the same state (one at a time: Redis swaps a
//! state only over the version it was computed from), so the ledger's guarantee holds across
//! instances exactly as across the threads of one. Lease ids carry their instance
//! (`owner << 40 | n`), so ids never collide and each instance knows its own leases.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Account, AccountState, Circuit, Lease};
use crate::domain::lease::Units;
use crate::domain::share::Share;
use crate::domain::time::Millis;

/// One lease as the shared ledger stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedLease {
    pub id: u64,
    pub owner: u64,
    pub model: String,
    pub held: Units,
    pub granted_at: Millis,
    pub deadline: Millis,
    #[serde(default)]
    pub probe: bool,
    pub holder: bool,
}

/// An account's whole ledger: its counters (windows, quota, cooldowns, circuit, peaks), every
/// lease out with its owner, the lease epoch and the health averages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerState {
    /// Counters as persisted (`in_flight` / `leased` unused: the leases are below).
    pub counters: AccountState,
    pub leases: Vec<SharedLease>,
    pub epoch: u64,
    pub consecutive_429: u32,
    pub latency_ewma: f64,
    pub error_ewma: f64,
    /// Tells a ledger seeded afresh (after Redis lost it) from the one before: an instance that
    /// finds another lineage merges its own leases into it instead of taking it as is.
    #[serde(default)]
    pub lineage: u64,
}

impl Account {
    /// Makes this process grant its leases as instance `owner` (a tag derived from its id).
    pub fn set_owner(&mut self, owner: u64) {
        self.owner = owner & 0xFF_FFFF;
        self.shares_ledger = true;
    }

    /// The ledger as it is here was written to Redis: the usage noted since the last write is in
    /// it (unless this instance keeps to a share: then it is reported when the ledger is back).
    pub fn written(&mut self) {
        if self.share.is_none() {
            self.unshared_use.clear();
        }
    }

    /// The whole ledger, to share (see the module documentation).
    pub fn ledger_state(&self, now: Millis) -> LedgerState {
        let mut counters = self.state(now);
        counters.in_flight.clear();
        counters.leased.clear();
        LedgerState {
            counters,
            leases: self
                .leases
                .iter()
                .map(|(id, l)| SharedLease {
                    id: *id,
                    owner: l.owner,
                    model: l.model.to_string(),
                    held: l.held,
                    granted_at: l.granted_at,
                    deadline: l.deadline,
                    probe: l.probe,
                    holder: l.holder,
                })
                .collect(),
            epoch: self.epoch,
            consecutive_429: self.consecutive_429,
            latency_ewma: self.latency_ewma,
            error_ewma: self.error_ewma,
            lineage: 0,
        }
    }

    /// Takes `shared` as this account's ledger (it replaces every counter and lease here): the
    /// state another instance last wrote.
    pub fn load_ledger(&mut self, shared: &LedgerState, now: Millis) {
        for w in &mut self.windows {
            w.forget_inflight();
        }
        self.quota.release(self.quota.reserved());
        self.inflight = 0;
        for m in &mut self.model_slots {
            m.inflight = 0;
        }
        self.leases.clear();
        self.load_counters(&shared.counters, now);
        for l in &shared.leases {
            let model: Arc<str> = Arc::from(l.model.as_str());
            let mask = self.mask_for(&model);
            self.hold(mask, &model, l.held);
            self.leases.insert(
                l.id,
                Lease {
                    model,
                    mask,
                    held: l.held,
                    granted_at: l.granted_at,
                    deadline: l.deadline,
                    probe: l.probe,
                    holder: l.holder,
                    owner: l.owner,
                },
            );
        }
        // Our own next id: after every id of ours in the ledger.
        let mine = self
            .leases
            .keys()
            .filter(|id| *id >> 40 == self.owner)
            .map(|id| (id & ((1 << 40) - 1)) + 1)
            .max()
            .unwrap_or(1);
        self.next_lease = self.next_lease.max(mine);
        self.epoch = shared.epoch;
        self.consecutive_429 = shared.consecutive_429;
        self.latency_ewma = shared.latency_ewma;
        self.error_ewma = shared.error_ewma;
        self.version = shared.counters.version;
    }

    /// Out of reach of the shared ledger: from now on this instance keeps to `share` of every
    /// window's limit, of the concurrency limits and of the quota left, and remembers what it
    /// admits (the parts of all live instances add up to each limit: together they stay within
    /// it whatever each does meanwhile).
    pub fn share_with(&mut self, share: Share) {
        self.share = Some(share);
        for w in &mut self.windows {
            w.set_share(share);
        }
        self.quota.set_share_cap(if share.instances > 1 {
            Some(self.quota.committed_and_reserved() + share.part(self.quota.remaining()))
        } else {
            None
        });
    }

    /// The part of a concurrency limit this instance keeps to now.
    pub(super) fn concurrency_cap(&self, limit: u64) -> u64 {
        self.share.map_or(limit, |s| s.part(limit))
    }

    /// Whether this instance is keeping to a share (the shared ledger is out of reach).
    pub fn is_sharing(&self) -> bool {
        self.share.is_some()
    }

    /// Remembers usage the shared ledger may not hold yet (see [`Account::merge`]).
    pub(super) fn note_unshared(&mut self, model: &Arc<str>, used: Units, at: Millis) {
        let used = Units { slots: 0, ..used };
        if !self.shares_ledger || used.is_zero() {
            return;
        }
        match self.unshared_use.iter_mut().find(|(m, _, _)| m == model) {
            Some((_, u, t)) => {
                *u = u.saturating_add(used);
                *t = (*t).max(at);
            }
            None => self.unshared_use.push((model.clone(), used, at)),
        }
    }

    /// The shared ledger is back with `remote`: takes it, with this instance's own leases as they
    /// are here (this instance is their only writer), the usage it admitted meanwhile, and the
    /// later of both cooldowns. Keeps to no share from now on.
    pub fn merge(&mut self, remote: &LedgerState, now: Millis) {
        let mine: Vec<SharedLease> = self
            .ledger_state(now)
            .leases
            .into_iter()
            .filter(|l| l.owner == self.owner)
            .collect();
        let used = std::mem::take(&mut self.unshared_use);
        let (cooldown, circuit) = (self.cooldown_until, self.circuit);
        let mut merged = remote.clone();
        merged.leases.retain(|l| l.owner != self.owner);
        merged.leases.extend(mine);
        self.stop_sharing();
        self.load_ledger(&merged, now);
        let mut events = Vec::new();
        for (model, units, at) in used {
            self.record_used(&model, units, at.min(now), &mut events);
        }
        self.cooldown_until = self.cooldown_until.max(cooldown);
        if matches!(circuit, Circuit::Open { .. }) && self.circuit == Circuit::Closed {
            self.circuit = circuit;
        }
        self.touch();
    }

    /// A ledger that was lost (Redis restarted empty) is seeded from what this instance knew of it
    /// `stale_ms` ago: the interval is charged like a crash gap (other instances may have admitted
    /// meanwhile), so the seed is never below the truth. `None`: this instance never saw the
    /// ledger (its state was restored from the database, charged there if need be): nothing more
    /// to charge. The usage admitted on a share is in the counters already: it keeps to no share
    /// from now on.
    pub fn reseed(&mut self, stale_ms: Option<Millis>, now: Millis) {
        // The whole limits first: the charge fills them, not this instance's part of them.
        self.unshared_use.clear();
        self.stop_sharing();
        if let Some(stale) = stale_ms {
            self.charge_gap(stale, now);
        }
        self.touch();
    }

    fn stop_sharing(&mut self) {
        self.share = None;
        for w in &mut self.windows {
            w.set_share(Share::WHOLE);
        }
        self.quota.set_share_cap(None);
    }
}
