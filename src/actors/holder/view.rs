//! A thread's view of one pool: its members, their last summaries, the refusals that last, the
//! strategy's order, and the thread's shards of each member.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Holders, ShardCell};
use crate::actors::registry::{AccountEntry, ProviderEntry, Registry};
use crate::domain::account::{Denial, Summary};
use crate::domain::selection;
use crate::domain::time::Millis;
use crate::domain::Strategy;

/// A refusal that lasts: skipped without a message until `until` or an epoch change. Kept per
/// model (some refusals, like a 403's cooldown, hold one model only).
#[derive(Debug, Clone)]
pub(super) struct Sticky {
    pub(super) model: Arc<str>,
    pub(super) denial: Denial,
    pub(super) epoch: u64,
    pub(super) until: Millis,
}

impl Sticky {
    /// The refusals worth remembering: none of them can end before `until` unless the account's
    /// epoch moves.
    pub(super) fn of(model: &Arc<str>, denial: &Denial, epoch: u64) -> Option<Sticky> {
        let until = match denial {
            Denial::Disabled { .. } | Denial::Expired => Millis::MAX,
            Denial::QuotaExceeded { reset_at } => *reset_at,
            Denial::RateLimited {
                retry_at,
                lower_bound: false,
                ..
            } => *retry_at,
            _ => return None,
        };
        Some(Sticky {
            model: model.clone(),
            denial: denial.clone(),
            epoch,
            until,
        })
    }
}

pub(super) struct Member {
    pub(super) entry: Arc<AccountEntry>,
    pub(super) summary: Summary,
    pub(super) sticky: Option<Sticky>,
    /// This thread's shards of the account, one per model.
    pub(super) cells: Vec<Arc<ShardCell>>,
}

impl Member {
    pub(super) fn new(entry: Arc<AccountEntry>) -> Member {
        Member {
            entry,
            summary: Summary {
                available: true,
                headroom: 1.0,
                ..Summary::default()
            },
            sticky: None,
            cells: Vec::new(),
        }
    }

    pub(super) fn sticky(&mut self, model: &str, epoch: u64, now: Millis) -> Option<&Denial> {
        if self
            .sticky
            .as_ref()
            .is_some_and(|s| s.epoch != epoch || now >= s.until)
        {
            self.sticky = None;
        }
        self.sticky
            .as_ref()
            .filter(|s| &*s.model == model)
            .map(|s| &s.denial)
    }

    pub(super) fn cell(&mut self, model: &Arc<str>, holders: &Arc<Holders>) -> Arc<ShardCell> {
        // Pointer equality first: the registry hands out the same name every time.
        if let Some(cell) = self
            .cells
            .iter()
            .find(|c| Arc::ptr_eq(&c.model, model) || c.model == *model)
        {
            return cell.clone();
        }
        let cell = Arc::new(ShardCell::new(
            self.entry.clone(),
            model.clone(),
            holders.clone(),
        ));
        self.cells.push(cell.clone());
        cell
    }
}

pub(super) struct PoolView {
    pub(super) strategy: Strategy,
    pub(super) members: Vec<Member>,
    pub(super) index: HashMap<Arc<str>, usize>,
    /// The strategy's order, for the strategies that sort (recomputed when summaries changed).
    pub(super) order: Vec<usize>,
    pub(super) order_stale: bool,
    pub(super) ordered_at: Millis,
    pub(super) cursor: usize,
    pub(super) rng: u64,
}

impl PoolView {
    pub(super) fn new(provider: &ProviderEntry, registry: &Registry, seed: u64) -> PoolView {
        let mut view = PoolView {
            strategy: provider.spec.strategy,
            members: Vec::new(),
            index: HashMap::new(),
            order: Vec::new(),
            order_stale: true,
            ordered_at: 0,
            cursor: 0,
            rng: seed | 1,
        };
        view.refresh(provider, registry);
        view
    }

    /// Follows a new registry: members added, removed or rebuilt, keeping what is known of the
    /// others.
    pub(super) fn refresh(&mut self, provider: &ProviderEntry, registry: &Registry) {
        self.strategy = provider.spec.strategy;
        let mut old: HashMap<Arc<str>, Member> = self
            .members
            .drain(..)
            .map(|m| (m.entry.id.clone(), m))
            .collect();
        for entry in registry.accounts_of(&provider.spec.id) {
            let member = match old.remove(&entry.id) {
                Some(mut m) => {
                    if !Arc::ptr_eq(&m.entry, entry) {
                        for cell in &m.cells {
                            cell.lock().entry = entry.clone();
                        }
                        m.entry = entry.clone();
                    }
                    m
                }
                None => Member::new(entry.clone()),
            };
            self.members.push(member);
        }
        self.index = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.entry.id.clone(), i))
            .collect();
        self.order_stale = true;
    }

    /// Where a walk over the members starts (round robin and random move on each time).
    pub(super) fn start(&mut self, now: Millis, interval: Millis) -> usize {
        let n = self.members.len().max(1);
        match self.strategy {
            Strategy::RoundRobin => {
                self.cursor = self.cursor.wrapping_add(1);
                self.cursor % n
            }
            Strategy::Random => (selection::next_random(&mut self.rng) % n as u64) as usize,
            Strategy::LeastUsed | Strategy::Best => {
                if self.order_stale && (interval == 0 || now - self.ordered_at >= interval) {
                    let summaries: Vec<Summary> = self.members.iter().map(|m| m.summary).collect();
                    self.order = selection::order(
                        self.strategy,
                        &summaries,
                        &mut self.cursor,
                        &mut self.rng,
                    );
                    self.order_stale = false;
                    self.ordered_at = now;
                }
                0
            }
        }
    }

    /// The `k`-th member of a walk that started at `start`.
    pub(super) fn at(&self, start: usize, k: usize) -> usize {
        match self.strategy {
            Strategy::RoundRobin | Strategy::Random => (start + k) % self.members.len(),
            Strategy::LeastUsed | Strategy::Best => self
                .order
                .get(k)
                .copied()
                .filter(|&i| i < self.members.len())
                .unwrap_or(k % self.members.len()),
        }
    }

    pub(super) fn learn(&mut self, account: &str, summary: Summary) {
        if let Some(&i) = self.index.get(account) {
            if self.members[i].summary != summary {
                self.members[i].summary = summary;
                self.order_stale = true;
            }
        }
    }
}
