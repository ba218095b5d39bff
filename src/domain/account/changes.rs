//! An operator's changes to a running account: a reset, and new settings that keep every
//! counter.

use super::persist::saved_window;
use super::{Account, AccountEvent, AccountSpec, Circuit, Lease};
use crate::domain::time::Millis;

impl Account {
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
        next.owner = self.owner;
        next.unshared_use = std::mem::take(&mut self.unshared_use);
        next.shares_ledger = self.shares_ledger;
        next.reserves = std::mem::take(&mut self.reserves);
        if let Some(share) = self.share {
            next.share_with(share);
        }
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
}
