//! `PoolActor`: one per provider. Owns the pool's membership: it starts its account actors (on
//! its own arbiter), updates and removes them, keeps each member's last collected state, and
//! rebuilds a member whose actor broke (a panic) from that state, charged like a crash restore.
//! Choosing an account for a request is not its job: every worker thread walks its own view of
//! the pool (see `holder`), so admission never waits for this actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use super::account::{
    AccountActor, AccountSetup, Broke, GetStatus, LeaseControl, LedgerTimes, Reset, Roll, Snapshot,
    Stop, UpdateAccount,
};
use super::events::{AccountRef, EventSink};
use crate::domain::account::{Account, AccountSpec, AccountState, QuotaStatus};
use crate::domain::schedule::Schedule;
use crate::domain::time::SharedClock;
use crate::domain::Strategy;
use crate::ledger::LedgerLink;

/// How often the pool refreshes its `available_accounts` gauge.
const AVAILABILITY_EVERY: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------------

/// The seed's `GetPoolStatus`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "PoolStatus")]
pub struct GetPoolStatus;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    pub provider_id: String,
    pub provider: String,
    pub strategy: Strategy,
    pub total_accounts: usize,
    pub available_accounts: usize,
    pub accounts_status: Vec<MemberStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberStatus {
    pub account_id: String,
    pub account: String,
    pub active: bool,
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub quota_used: u64,
    pub quota_limit: u64,
    pub usage_percent: f64,
    /// When the quota period ends.
    pub reset_at: crate::domain::time::Millis,
    /// Reservations not yet settled.
    pub in_flight: u64,
    /// While an upstream's "wait" holds the account: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_until: Option<crate::domain::time::Millis>,
    /// While the circuit breaker is open: until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_open_until: Option<crate::domain::time::Millis>,
}

impl MemberStatus {
    /// An account as its pool shows it: `active` as configured, and inactive once the upstream
    /// rejected its key (the status says so).
    pub fn new(account_id: &str, account: &str, active: bool, status: QuotaStatus) -> MemberStatus {
        MemberStatus {
            account_id: account_id.to_string(),
            account: account.to_string(),
            active: active
                && status.reason.as_deref() != Some("upstream rejected the key (401/403)"),
            available: status.available,
            reason: status.reason,
            quota_used: status.current_usage,
            quota_limit: status.limit,
            usage_percent: status.usage_percent,
            reset_at: status.reset_at,
            in_flight: status.in_flight,
            cooldown_until: status.cooldown_until,
            circuit_open_until: status.circuit_open_until,
        }
    }
}

#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SetStrategy(pub Strategy);

/// Resets every account of the pool; answers how many.
#[derive(Message, Debug, Clone)]
#[rtype(result = "usize")]
pub struct ResetAll;

/// A running account: its actor and the lease epoch its holders read.
#[derive(Debug, Clone)]
pub struct AccountHandle {
    pub addr: Addr<AccountActor>,
    pub control: Arc<LeaseControl>,
}

/// Starts an account actor in this pool (on the pool's arbiter), optionally from a saved state.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<AccountHandle, String>")]
pub struct AddAccount {
    pub name: Arc<str>,
    pub spec: AccountSpec,
    pub saved: Option<AccountState>,
    /// Charge a crash gap of this many ms on restore (no clean-shutdown mark).
    pub gap: Option<i64>,
}

/// Applies changed settings to a member, keeping its counters.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), String>")]
pub struct UpdateMember {
    pub name: Arc<str>,
    pub spec: AccountSpec,
}

/// Removes a member and stops its actor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct RemoveAccount {
    pub account_id: Arc<str>,
}

/// Tells the supervisor that a member's actor died and was recreated at `addr`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Revived {
    pub provider_id: Arc<str>,
    pub account_id: Arc<str>,
    pub addr: Addr<AccountActor>,
}

/// The states of members that changed since the last call (for sync, and for recreating a member
/// that died); `flush`: see [`Snapshot`].
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<(Arc<str>, AccountState)>")]
pub struct CollectChanged {
    pub flush: bool,
}

// ------------------------------------------------------------------------------------------------
// The actor
// ------------------------------------------------------------------------------------------------

struct Member {
    id: Arc<str>,
    name: Arc<str>,
    spec: AccountSpec,
    addr: Addr<AccountActor>,
    control: Arc<LeaseControl>,
    /// The version of the last state collected, and that state (to recreate a dead actor).
    /// Boxed: most members have none most of the time, and ten thousand inline states add up.
    last_state: Option<Box<AccountState>>,
}

/// What every account actor of the pool is built with.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub clock: SharedClock,
    pub times: LedgerTimes,
    /// Length of the peak-rate intervals (the sync interval).
    pub peak_interval: Duration,
    /// When quotas reset: the pool tells its members at each boundary.
    pub quota_schedule: Schedule,
    pub events: EventSink,
    /// The shared ledgers (Redis configured; several instances), else `None`.
    pub ledger: Option<LedgerLink>,
}

pub struct PoolActor {
    provider_id: Arc<str>,
    provider: Arc<str>,
    strategy: Strategy,
    members: Vec<Member>,
    index: HashMap<Arc<str>, usize>,
    settings: PoolSettings,
    /// Told when a member is recreated, so the registry points at the new actor.
    on_revive: Option<Recipient<Revived>>,
}

impl PoolActor {
    pub fn new(
        provider_id: Arc<str>,
        provider: Arc<str>,
        strategy: Strategy,
        settings: PoolSettings,
        on_revive: Option<Recipient<Revived>>,
    ) -> PoolActor {
        PoolActor {
            provider_id,
            provider,
            strategy,
            members: Vec::new(),
            index: HashMap::new(),
            settings,
            on_revive,
        }
    }

    fn account_ref(&self, id: &Arc<str>, name: &Arc<str>) -> AccountRef {
        AccountRef {
            account_id: id.clone(),
            account: name.clone(),
            provider_id: self.provider_id.clone(),
            provider: self.provider.clone(),
        }
    }

    /// Builds and starts an account actor on the current arbiter (the pool's), from a saved state
    /// and the crash gap to charge on it when `restore` says so; `rebuilt` when it replaces an
    /// actor that panicked.
    fn spawn_account(
        &self,
        name: &Arc<str>,
        spec: &AccountSpec,
        restore: Option<(&AccountState, Option<i64>)>,
        control: &Arc<LeaseControl>,
        me: Recipient<Broke>,
        rebuilt: bool,
    ) -> Result<Addr<AccountActor>, String> {
        let now = self.settings.clock.now_ms();
        let mut account = Account::new(spec, now)?;
        // Above every epoch of an actor this one replaces: their leases admit no more.
        account.start_epoch_at(control.retire());
        account.set_peak_interval(crate::domain::time::duration_ms(
            self.settings.peak_interval,
        ));
        if let Some((saved, gap)) = restore {
            account.restore(saved, now, gap);
        }
        let actor = AccountActor::new(
            account,
            AccountSetup {
                who: self.account_ref(&spec.id, name),
                clock: self.settings.clock.clone(),
                times: self.settings.times,
                events: self.settings.events.clone(),
                control: control.clone(),
                on_broken: Some(me),
                ledger: self.settings.ledger.clone().map(|link| (link, rebuilt)),
            },
        );
        Ok(actor.start())
    }

    /// Recreates members whose actor died, from their last collected state, charged like a crash
    /// restore (the interval since that state is unknown).
    fn revive(&mut self, dead: &[Arc<str>], me: Recipient<Broke>) {
        let now = self.settings.clock.now_ms();
        for id in dead {
            let Some(&i) = self.index.get(id) else {
                continue;
            };
            if self.members[i].addr.connected() {
                continue;
            }
            let member = &self.members[i];
            let gap = member
                .last_state
                .as_ref()
                .map(|s| (now - s.saved_at).max(0));
            match self.spawn_account(
                &member.name,
                &member.spec,
                member.last_state.as_deref().map(|s| (s, gap)),
                &member.control,
                me.clone(),
                true,
            ) {
                Ok(addr) => {
                    log::error!(
                        event = "actor_restarted", account_id = &**id, provider = &*self.provider;
                        "an account actor died and was recreated from its last state"
                    );
                    self.members[i].addr = addr.clone();
                    if let Some(supervisor) = &self.on_revive {
                        supervisor.do_send(Revived {
                            provider_id: self.provider_id.clone(),
                            account_id: id.clone(),
                            addr,
                        });
                    }
                }
                Err(e) => log::error!(account_id = &**id; "cannot recreate account actor: {e}"),
            }
        }
    }

    fn rebuild_index(&mut self) {
        self.index = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
    }
}

impl PoolActor {
    /// One timer per pool (not per account) wakes every member at the quota boundary.
    fn schedule_quota_boundary(&mut self, ctx: &mut Context<Self>) {
        let now = self.settings.clock.now_ms();
        let next = self.settings.quota_schedule.next_after(now);
        // A millisecond late, so the boundary has certainly passed when members look.
        let delay = Duration::from_millis((next - now).max(0) as u64 + 1);
        ctx.run_later(delay, |act, ctx| {
            for member in &act.members {
                member.addr.do_send(Roll);
            }
            act.schedule_quota_boundary(ctx);
        });
    }
}

impl Actor for PoolActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.schedule_quota_boundary(ctx);
        ctx.run_interval(AVAILABILITY_EVERY, |act, ctx| {
            ctx.spawn(act.status().map(|_, _, _| ()));
        });
    }
}

impl Handler<Broke> for PoolActor {
    type Result = ();

    fn handle(&mut self, msg: Broke, ctx: &mut Context<Self>) {
        self.revive(&[msg.account_id], ctx.address().recipient());
    }
}

impl Handler<GetPoolStatus> for PoolActor {
    type Result = ResponseActFuture<Self, PoolStatus>;

    fn handle(&mut self, _msg: GetPoolStatus, _ctx: &mut Context<Self>) -> Self::Result {
        self.status()
    }
}

impl PoolActor {
    /// Every member's status (and the `available_accounts` gauge set from it).
    fn status(&mut self) -> ResponseActFuture<Self, PoolStatus> {
        let members: Vec<(Arc<str>, Arc<str>, Addr<AccountActor>)> = self
            .members
            .iter()
            .map(|m| (m.id.clone(), m.name.clone(), m.addr.clone()))
            .collect();
        let active: HashMap<Arc<str>, bool> = self
            .members
            .iter()
            .map(|m| (m.id.clone(), m.spec.active))
            .collect();
        let (provider_id, provider, strategy) = (
            self.provider_id.to_string(),
            self.provider.to_string(),
            self.strategy,
        );
        let metrics = self.settings.events.metrics().clone();
        Box::pin(
            async move {
                let mut accounts_status = Vec::with_capacity(members.len());
                for (id, name, addr) in members {
                    let Ok(status) = addr.send(GetStatus).await else {
                        continue;
                    };
                    let active = active.get(&id).copied().unwrap_or(false);
                    accounts_status.push(MemberStatus::new(&id, &name, active, status));
                }
                let available_accounts = accounts_status.iter().filter(|s| s.available).count();
                metrics
                    .available_accounts
                    .with_label_values(&[&provider_id])
                    .set(available_accounts as i64);
                PoolStatus {
                    provider_id,
                    provider,
                    strategy,
                    total_accounts: accounts_status.len(),
                    available_accounts,
                    accounts_status,
                }
            }
            .into_actor(self),
        )
    }
}

impl Handler<SetStrategy> for PoolActor {
    type Result = ();

    fn handle(&mut self, msg: SetStrategy, _ctx: &mut Context<Self>) {
        self.strategy = msg.0;
    }
}

impl Handler<ResetAll> for PoolActor {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _msg: ResetAll, _ctx: &mut Context<Self>) -> Self::Result {
        let addrs: Vec<Addr<AccountActor>> = self.members.iter().map(|m| m.addr.clone()).collect();
        Box::pin(async move {
            let mut count = 0;
            for addr in addrs {
                if addr.send(Reset).await.is_ok() {
                    count += 1;
                }
            }
            count
        })
    }
}

impl Handler<AddAccount> for PoolActor {
    type Result = Result<AccountHandle, String>;

    fn handle(&mut self, msg: AddAccount, ctx: &mut Context<Self>) -> Self::Result {
        if self.index.contains_key(&msg.spec.id) {
            return Err(format!("account {} is already in the pool", msg.spec.id));
        }
        let control = Arc::new(LeaseControl::default());
        let addr = self.spawn_account(
            &msg.name,
            &msg.spec,
            msg.saved.as_ref().map(|s| (s, msg.gap)),
            &control,
            ctx.address().recipient(),
            false,
        )?;
        self.members.push(Member {
            id: msg.spec.id.clone(),
            name: msg.name,
            spec: msg.spec,
            addr: addr.clone(),
            control: control.clone(),
            last_state: msg.saved.map(Box::new),
        });
        self.rebuild_index();
        Ok(AccountHandle { addr, control })
    }
}

impl Handler<UpdateMember> for PoolActor {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, msg: UpdateMember, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(&i) = self.index.get(&msg.spec.id) else {
            let id = msg.spec.id.clone();
            return Box::pin(async move { Err(format!("account {id} is not in the pool")) });
        };
        let member = &mut self.members[i];
        member.name = msg.name;
        member.spec = msg.spec.clone();
        let addr = member.addr.clone();
        Box::pin(async move {
            addr.send(UpdateAccount { spec: msg.spec })
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

impl Handler<RemoveAccount> for PoolActor {
    type Result = bool;

    fn handle(&mut self, msg: RemoveAccount, _ctx: &mut Context<Self>) -> bool {
        let Some(&i) = self.index.get(&msg.account_id) else {
            return false;
        };
        let member = self.members.remove(i);
        member.addr.do_send(Stop);
        self.rebuild_index();
        true
    }
}

impl Handler<CollectChanged> for PoolActor {
    type Result = ResponseActFuture<Self, Vec<(Arc<str>, AccountState)>>;

    fn handle(&mut self, msg: CollectChanged, _ctx: &mut Context<Self>) -> Self::Result {
        let flush = msg.flush;
        let asks: Vec<(Arc<str>, Addr<AccountActor>, Option<u64>)> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    m.addr.clone(),
                    m.last_state.as_ref().map(|s| s.version),
                )
            })
            .collect();
        Box::pin(
            async move {
                let mut changed = Vec::new();
                for (id, addr, since_version) in asks {
                    if let Ok(Some(state)) = addr
                        .send(Snapshot {
                            since_version,
                            flush,
                        })
                        .await
                    {
                        changed.push((id, state));
                    }
                }
                changed
            }
            .into_actor(self)
            .map(|changed, act, _ctx| {
                for (id, state) in &changed {
                    if let Some(&i) = act.index.get(id) {
                        act.members[i].last_state = Some(Box::new(state.clone()));
                    }
                }
                changed
            }),
        )
    }
}
