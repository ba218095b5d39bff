//! The live state of one request or token window of one account.
//!
//! # The guarantee
//! For a limit `N per W`, the upstream may count a request at any moment between our reservation
//! `r` and its answer (our commit `c`). So a request *holds* its units from `r` until `c + W`
//! (sliding), or in every period its span `[r, c]` overlaps (fixed). A reservation is admitted only
//! when the units held now plus its own stay within `N`. For any upstream window, the last request
//! admitted into it saw every other request of that window still holding, so no upstream window
//! ever holds more than `N`.
//!
//! # Bounded memory
//! Committed units of a sliding window are kept in at most [`BUCKETS_PER_WINDOW`] + 1 buckets: a
//! commit's expiry `c + W` is rounded *up* to the next multiple of `W / 64`, and units expiring in
//! the same bucket are summed. The error is conservative: a unit may be held up to `W / 64` longer
//! than necessary (at most 1.6 % of the window), never shorter. In-flight units are one counter.
//!
//! # Upstream tightening
//! An upstream's `x-ratelimit-remaining-*` / `-reset-*` headers add a temporary ceiling: until the
//! reset, at most `remaining` more units. The ceiling only ever tightens the configured limit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::limits::{LimitKind, LimitSpec};
use super::schedule::Schedule;
use super::share::Share;
use super::time::{duration_ms, Millis};

/// Sliding windows keep at most this many buckets (plus one partial).
pub const BUCKETS_PER_WINDOW: i64 = 64;

/// Units of a sliding window that expire together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// When these units stop being held.
    pub end: Millis,
    pub units: u64,
}

/// How a window forgets.
#[derive(Debug, Clone, PartialEq)]
enum Expiry {
    /// Units expire `per` after their commit, rounded up to `bucket` ms.
    Sliding { per: Millis, bucket: Millis },
    /// Units expire when the period ends; periods start at the schedule's occurrences.
    Fixed { schedule: Schedule },
}

/// A temporary ceiling learned from the upstream's rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ceiling {
    /// Units the upstream still allowed when it answered.
    pub remaining: u64,
    /// When the upstream's window resets.
    pub until: Millis,
    /// Units admitted since (and in flight at) the observation.
    pub used: u64,
}

/// Why a window refuses now, and when it could admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// The request needs more than the whole limit: it can never pass.
    Impossible { limit: u64, need: u64 },
    /// Full until `retry_at`; `lower_bound` when in-flight work decides the real time.
    Full { retry_at: Millis, lower_bound: bool },
}

/// The persisted part of a window (see `AccountState`): counts, buckets and period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WindowCounters {
    pub committed: u64,
    pub buckets: Vec<Bucket>,
    /// Fixed windows: when the current period ends.
    pub period_end: Millis,
    pub ceiling: Option<Ceiling>,
}

/// What a window is, as opposed to what it holds: shared by every account with the same limit
/// (see [`definition`]), so that ten thousand accounts do not carry ten thousand copies.
#[derive(Debug)]
struct Definition {
    kind: LimitKind,
    limit: u64,
    expiry: Expiry,
    /// `rpm`, `requests/2s`, or `llama-70b:rpd` for a per-model limit.
    label: Arc<str>,
    /// The model this window applies to; `None` = every model.
    model: Option<Arc<str>>,
}

type DefinitionKey = (LimitSpec, Option<Arc<str>>);

/// The shared definition of `spec` for `model`. Definitions are few (one per distinct limit), so
/// the table only grows when an operator adds a new limit.
fn definition(spec: &LimitSpec, model: Option<Arc<str>>) -> Result<Arc<Definition>, String> {
    static DEFINITIONS: OnceLock<Mutex<HashMap<DefinitionKey, Arc<Definition>>>> = OnceLock::new();
    let key = (spec.clone(), model.clone());
    let table = DEFINITIONS.get_or_init(Default::default);
    if let Some(found) = table.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(found.clone());
    }
    let per = spec
        .per
        .map(duration_ms)
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{} limit without a window length", spec.kind))?;
    let expiry = match &spec.reset {
        None => Expiry::Sliding {
            per,
            bucket: (per / BUCKETS_PER_WINDOW).max(1),
        },
        Some(reset) => Expiry::Fixed {
            schedule: Schedule::new(&reset.cron, &reset.timezone)?,
        },
    };
    let label = match &model {
        Some(m) => format!("{m}:{}", spec.label()),
        None => spec.label(),
    };
    let def = Arc::new(Definition {
        kind: spec.kind,
        limit: spec.limit,
        expiry,
        label: Arc::from(label),
        model,
    });
    table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, def.clone());
    Ok(def)
}

#[derive(Debug, Clone)]
pub struct Window {
    def: Arc<Definition>,
    /// Units of reservations not yet settled.
    inflight: u64,
    /// Sum of `buckets` (sliding) or of the current period (fixed).
    committed: u64,
    buckets: VecDeque<Bucket>,
    period_end: Millis,
    ceiling: Option<Ceiling>,
    /// The part of the limit this process keeps to (instances sharing the limit while their
    /// shared ledger is out of reach); the whole otherwise.
    share: Share,
}

impl Window {
    /// A window for `spec`, or `None` for `concurrent` (which is not a window). Fails on a bad
    /// fixed-reset schedule or a window without a length.
    pub fn new(
        spec: &LimitSpec,
        model: Option<Arc<str>>,
        now: Millis,
    ) -> Result<Option<Window>, String> {
        if spec.kind == LimitKind::Concurrent {
            return Ok(None);
        }
        let def = definition(spec, model)?;
        let period_end = match &def.expiry {
            Expiry::Sliding { .. } => 0,
            Expiry::Fixed { schedule } => schedule.next_after(now),
        };
        Ok(Some(Window {
            def,
            inflight: 0,
            committed: 0,
            buckets: VecDeque::new(),
            period_end,
            ceiling: None,
            share: Share::WHOLE,
        }))
    }

    /// The limit this process keeps to: the whole, or its share (see [`Window::set_share`]).
    fn cap(&self) -> u64 {
        self.share.part(self.def.limit)
    }

    /// Keeps to `share` of the limit from now on ([`Share::WHOLE`]: the whole limit).
    pub fn set_share(&mut self, share: Share) {
        self.share = share;
    }

    /// Forgets the units in flight (a ledger replaced by a shared one recounts its leases).
    pub fn forget_inflight(&mut self) {
        if let Some(c) = self.ceiling.as_mut() {
            c.used = c.used.saturating_sub(self.inflight);
        }
        self.inflight = 0;
    }

    pub fn kind(&self) -> LimitKind {
        self.def.kind
    }

    pub fn limit(&self) -> u64 {
        self.def.limit
    }

    pub fn label(&self) -> &Arc<str> {
        &self.def.label
    }

    pub fn model(&self) -> Option<&Arc<str>> {
        self.def.model.as_ref()
    }

    /// Whether a request for `model` counts in this window.
    pub fn applies_to(&self, model: &str) -> bool {
        self.def.model.as_deref().is_none_or(|m| m == model)
    }

    /// The window's length (sliding) or current period length (fixed), in ms.
    pub fn per_ms(&self) -> Millis {
        match &self.def.expiry {
            Expiry::Sliding { per, .. } => *per,
            Expiry::Fixed { schedule } => {
                (self.period_end - schedule.previous_at_or_before(self.period_end - 1)).max(1)
            }
        }
    }

    /// When a fixed window's current period ends; `None` for a sliding window.
    pub fn resets_at(&self) -> Option<Millis> {
        matches!(self.def.expiry, Expiry::Fixed { .. }).then_some(self.period_end)
    }

    /// Units held now (committed and in flight).
    pub fn used(&self) -> u64 {
        self.committed.saturating_add(self.inflight)
    }

    pub fn inflight(&self) -> u64 {
        self.inflight
    }

    /// Units that may still be admitted now (also under an upstream ceiling).
    pub fn remaining(&self, now: Millis) -> u64 {
        let mut room = self.cap().saturating_sub(self.used());
        if let Some(c) = self.active_ceiling(now) {
            room = room.min(c.remaining.saturating_sub(c.used));
        }
        room
    }

    /// Start of the current window: `now - W` (sliding) or the period start (fixed).
    pub fn window_start(&self, now: Millis) -> Millis {
        match &self.def.expiry {
            Expiry::Sliding { per, .. } => now - per,
            Expiry::Fixed { schedule } => schedule.previous_at_or_before(now),
        }
    }

    /// Forgets what expired by `now`. Cheap when nothing did.
    pub fn roll(&mut self, now: Millis) {
        match &self.def.expiry {
            Expiry::Sliding { .. } => {
                while let Some(front) = self.buckets.front() {
                    if front.end > now {
                        break;
                    }
                    self.committed -= front.units;
                    self.buckets.pop_front();
                }
            }
            Expiry::Fixed { schedule } => {
                if now >= self.period_end {
                    // In-flight units stay counted: their span overlaps the new period too.
                    self.committed = 0;
                    self.period_end = schedule.next_after(now);
                }
            }
        }
        if self.ceiling.is_some_and(|c| now >= c.until) {
            self.ceiling = None;
        }
    }

    fn active_ceiling(&self, now: Millis) -> Option<&Ceiling> {
        self.ceiling.as_ref().filter(|c| now < c.until)
    }

    /// Whether `need` more units fit now (call [`Window::roll`] first).
    pub fn check(&self, need: u64, now: Millis) -> Result<(), Block> {
        if need > self.def.limit {
            return Err(Block::Impossible {
                limit: self.def.limit,
                need,
            });
        }
        let used = self.used();
        let mut block = None;
        if used + need > self.cap() {
            block = Some(self.retry_at(used + need - self.cap(), now));
        }
        if let Some(c) = self.active_ceiling(now) {
            if c.used + need > c.remaining {
                let at = Block::Full {
                    retry_at: c.until,
                    lower_bound: false,
                };
                block = Some(later(block, at));
            }
        }
        match block {
            None => Ok(()),
            Some(b) => Err(b),
        }
    }

    /// When `excess` units will have been freed.
    fn retry_at(&self, excess: u64, now: Millis) -> Block {
        match &self.def.expiry {
            Expiry::Sliding { per, .. } => {
                let mut freed = 0;
                for bucket in &self.buckets {
                    freed += bucket.units;
                    if freed >= excess {
                        return Block::Full {
                            retry_at: bucket.end,
                            // Units in flight that come back unused (a lease given back, a
                            // request released) free room sooner: the time is not exact.
                            lower_bound: self.inflight > 0,
                        };
                    }
                }
                // In-flight units must be freed too: each will hold at least `per` after it is
                // settled, and none is settled yet.
                let last = self.buckets.back().map_or(now, |b| b.end);
                Block::Full {
                    retry_at: last.max(now + per),
                    lower_bound: true,
                }
            }
            Expiry::Fixed { .. } => Block::Full {
                retry_at: self.period_end,
                // Only committed units go at the reset; in-flight units still count in the next
                // period, so the time is exact unless they alone leave no room for `need`
                // (`inflight + need > limit`, i.e. `excess > committed`), or units in flight
                // may come back unused before it.
                lower_bound: excess > self.committed || self.inflight > 0,
            },
        }
    }

    /// Holds `units` for a new reservation (after a successful [`Window::check`]).
    pub fn reserve(&mut self, units: u64) {
        self.inflight += units;
        if let Some(c) = self.ceiling.as_mut() {
            c.used += units;
        }
    }

    /// Settles a reservation of `reserved` units that really used `actual`, at `now`.
    pub fn commit(&mut self, reserved: u64, actual: u64, now: Millis) {
        self.inflight = self.inflight.saturating_sub(reserved);
        if let Some(c) = self.ceiling.as_mut() {
            // The ceiling counts what the upstream counts: correct it to the truth.
            c.used = c.used.saturating_sub(reserved).saturating_add(actual);
        }
        if actual == 0 {
            return;
        }
        self.committed += actual;
        if let Expiry::Sliding { per, bucket } = self.def.expiry {
            let end = round_up(now.saturating_add(per), bucket);
            match self.buckets.back_mut() {
                // Merging into a later bucket holds the units longer: conservative.
                Some(last) if last.end >= end => last.units += actual,
                _ => self.buckets.push_back(Bucket { end, units: actual }),
            }
        }
    }

    /// Returns the units of a reservation that never reached the upstream.
    pub fn release(&mut self, reserved: u64) {
        self.inflight = self.inflight.saturating_sub(reserved);
        if let Some(c) = self.ceiling.as_mut() {
            c.used = c.used.saturating_sub(reserved);
        }
    }

    /// Adds units directly as committed at `now` (the seed's `RecordRequest` / `ConsumeQuota`).
    pub fn record(&mut self, units: u64, now: Millis) {
        self.commit(0, units, now);
    }

    /// Applies the upstream's word: `remaining` units until `until`. Never loosens: a ceiling is
    /// only replaced by a tighter one (answers can arrive out of order, so a report with more room
    /// is not proof of a new upstream window); it lapses at its own `until`.
    pub fn tighten(&mut self, remaining: u64, until: Millis, now: Millis) {
        if until <= now {
            return;
        }
        let incoming = Ceiling {
            remaining,
            until,
            // What is in flight now may not have been counted by the upstream yet.
            used: self.inflight,
        };
        let replace = match self.active_ceiling(now) {
            None => true,
            Some(current) => {
                let current_room = current.remaining.saturating_sub(current.used);
                let new_room = incoming.remaining.saturating_sub(incoming.used);
                new_room < current_room
            }
        };
        if replace {
            self.ceiling = Some(incoming);
        }
    }

    /// Counts `units` more against the upstream ceiling, if one is active (units used after the
    /// answer that carried it, reported later).
    pub fn charge_ceiling(&mut self, units: u64, now: Millis) {
        if let Some(c) = self.ceiling.as_mut().filter(|c| now < c.until) {
            c.used = c.used.saturating_add(units);
        }
    }

    /// Empties the window (an operator's reset).
    pub fn clear(&mut self, now: Millis) {
        self.committed = 0;
        self.buckets.clear();
        self.ceiling = None;
        if let Expiry::Fixed { schedule } = &self.def.expiry {
            self.period_end = schedule.next_after(now);
        }
    }

    /// The persisted counters.
    pub fn counters(&self) -> WindowCounters {
        WindowCounters {
            committed: self.committed,
            buckets: self.buckets.iter().copied().collect(),
            period_end: self.period_end,
            ceiling: self.ceiling,
        }
    }

    /// Restores counters persisted at `saved_at` (in-flight units are not restored: see
    /// `AccountState`), whatever expiry they were counted under — the operator may have turned a
    /// sliding limit into a fixed one, or back, or changed a fixed one's schedule. Never fewer
    /// units than the upstream may still count:
    ///
    /// - sliding ← sliding: the buckets as they are;
    /// - fixed ← fixed (any schedule) and fixed ← sliding: the units held when saved (a sliding
    ///   window's: those whose bucket has not expired), unless a reset of the current schedule
    ///   fell between `saved_at` and `now` (all of them were counted before it). The period ends
    ///   at the current schedule's next reset, never at a saved end the schedule no longer has;
    /// - sliding ← fixed: the period's units, committed at the latest when the period ended (or
    ///   now), held one window length after that.
    pub fn restore(&mut self, counters: &WindowCounters, saved_at: Millis, now: Millis) {
        // Only fixed windows have a period end: a sliding one saves 0.
        let saved_sliding = counters.period_end == 0;
        match (&self.def.expiry, saved_sliding) {
            (Expiry::Sliding { .. }, true) => {
                self.buckets = counters.buckets.iter().copied().collect();
                self.committed = self.buckets.iter().map(|b| b.units).sum();
            }
            (Expiry::Sliding { per, bucket }, false) => {
                let end = round_up(counters.period_end.min(now).saturating_add(*per), *bucket);
                self.buckets = (counters.committed > 0 && end > now)
                    .then_some(Bucket {
                        end,
                        units: counters.committed,
                    })
                    .into_iter()
                    .collect();
                self.committed = self.buckets.iter().map(|b| b.units).sum();
            }
            (Expiry::Fixed { schedule }, _) => {
                let held = if saved_sliding {
                    counters
                        .buckets
                        .iter()
                        .filter(|b| b.end > saved_at)
                        .map(|b| b.units)
                        .sum()
                } else {
                    counters.committed
                };
                let reset_since = schedule.previous_at_or_before(now) > saved_at;
                self.buckets.clear();
                self.committed = if reset_since { 0 } else { held };
                self.period_end = schedule.next_after(now);
            }
        }
        self.ceiling = counters.ceiling;
        self.roll(now);
    }
}

fn later(a: Option<Block>, b: Block) -> Block {
    match (a, b) {
        (
            Some(Block::Full {
                retry_at: ra,
                lower_bound: la,
            }),
            Block::Full {
                retry_at: rb,
                lower_bound: lb,
            },
        ) => Block::Full {
            retry_at: ra.max(rb),
            // A block that is only a lower bound may outlast the other's time.
            lower_bound: la || lb,
        },
        (Some(impossible @ Block::Impossible { .. }), _) => impossible,
        (_, b) => b,
    }
}

fn round_up(t: Millis, step: Millis) -> Millis {
    let r = t.rem_euclid(step);
    if r == 0 {
        t
    } else {
        t + (step - r)
    }
}

#[cfg(test)]
mod tests;
