//! `Supervisor`: starts a pool per provider (spread over the arbiters) and its accounts, applies
//! catalog changes at run time without losing counters, publishes the registry, and (with a
//! store) picks up changes other processes wrote, such as the CLI's, within a few seconds.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::catalog::{self, ProviderSpec, QuotaSettings};
use super::pool::{
    AccountHandle, AddAccount, CollectChanged, PoolActor, PoolSettings, RemoveAccount, Revived,
    SetStrategy, UpdateMember,
};
use super::registry::{AccountEntry, ProviderEntry, Registry, SharedRegistry};
use crate::domain::account::AccountState;
use crate::secrets::MasterKey;
use crate::store::{settings, Store};

// ------------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------------

/// A saved state to start an account from, and the unknown gap to charge (none after a clean
/// stop).
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub state: AccountState,
    pub gap: Option<i64>,
}

/// Makes the runtime serve exactly `specs`: new pools and accounts start (from `saved` state when
/// given), changed ones are updated in place (keeping counters), missing ones are removed.
#[derive(Message, Debug, Clone, Default)]
#[rtype(result = "Result<CatalogChange, String>")]
pub struct ApplyCatalog {
    pub specs: Vec<ProviderSpec>,
    pub saved: HashMap<Arc<str>, Restored>,
}

/// What an `ApplyCatalog` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogChange {
    pub pools_added: usize,
    pub pools_removed: usize,
    pub accounts_added: usize,
    pub accounts_updated: usize,
    pub accounts_removed: usize,
}

/// Reloads the catalog from the store now (after an admin change).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<CatalogChange, String>")]
pub struct Reload;

/// The states of accounts that changed since the last collection, from every pool; with
/// `flush`, each account first writes what waits to be written to its shared ledger.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<(Arc<str>, AccountState)>")]
pub struct CollectAll {
    pub flush: bool,
}

/// Stops the pools' arbiters (at the end of a shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StopArbiters;

// ------------------------------------------------------------------------------------------------
// The actor
// ------------------------------------------------------------------------------------------------

/// Where the supervisor reads the catalog from, and how often it looks for changes.
#[derive(Clone)]
pub struct CatalogSource {
    pub store: Store,
    pub key: MasterKey,
    pub quota: QuotaSettings,
    pub poll_every: Duration,
}

struct Pool {
    addr: Addr<PoolActor>,
    spec: ProviderSpec,
    accounts: HashMap<Arc<str>, AccountHandle>,
}

pub struct Supervisor {
    pool_settings: PoolSettings,
    arbiters: Vec<Arbiter>,
    next_arbiter: usize,
    pools: HashMap<Arc<str>, Pool>,
    registry: SharedRegistry,
    source: Option<CatalogSource>,
    /// The store's catalog version seen last (see `store::settings::CATALOG_VERSION`).
    seen_version: Option<String>,
}

impl Supervisor {
    /// `arbiters` = 0 runs every pool on the caller's arbiter (tests under a paused clock).
    pub fn new(
        pool_settings: PoolSettings,
        arbiters: usize,
        registry: SharedRegistry,
        source: Option<CatalogSource>,
    ) -> Supervisor {
        Supervisor {
            pool_settings,
            arbiters: (0..arbiters).map(|_| Arbiter::new()).collect(),
            next_arbiter: 0,
            pools: HashMap::new(),
            registry,
            source,
            seen_version: None,
        }
    }

    fn start_pool(&mut self, spec: &ProviderSpec, me: Recipient<Revived>) -> Addr<PoolActor> {
        let (id, name, strategy, settings) = (
            spec.id.clone(),
            spec.name.clone(),
            spec.strategy,
            self.pool_settings.clone(),
        );
        let make = move |_: &mut Context<PoolActor>| {
            PoolActor::new(id, name, strategy, settings, Some(me))
        };
        if self.arbiters.is_empty() {
            PoolActor::create(make)
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter += 1;
            PoolActor::start_in_arbiter(&arbiter.handle(), make)
        }
    }

    fn publish(&self) {
        let mut providers = Vec::new();
        let mut accounts = Vec::new();
        for pool in self.pools.values() {
            providers.push(Arc::new(ProviderEntry {
                // The registry needs the provider's settings, not its members (those are below).
                spec: ProviderSpec {
                    accounts: Vec::new(),
                    ..pool.spec.clone()
                },
                pool: pool.addr.clone(),
            }));
            for member in &pool.spec.accounts {
                if let Some(handle) = pool.accounts.get(&member.spec.id) {
                    accounts.push(Arc::new(AccountEntry {
                        id: member.spec.id.clone(),
                        name: member.name.clone(),
                        provider_id: pool.spec.id.clone(),
                        provider: pool.spec.name.clone(),
                        addr: handle.addr.clone(),
                        control: handle.control.clone(),
                        credentials: member.credentials.clone(),
                    }));
                }
            }
        }
        self.pool_settings
            .events
            .metrics()
            .accounts_loaded
            .set(accounts.len() as i64);
        *self.registry.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Registry::new(providers, accounts));
    }

    /// Looks for a new catalog version in the store and reloads when there is one.
    fn poll(&mut self, ctx: &mut Context<Self>) {
        let Some(source) = self.source.clone() else {
            return;
        };
        let seen = self.seen_version.clone();
        let check = tokio::task::spawn_blocking(move || {
            let mut conn = source.store.conn().map_err(|e| e.to_string())?;
            let version =
                settings::get(&mut conn, settings::CATALOG_VERSION).map_err(|e| e.to_string())?;
            if version == seen {
                return Ok(None);
            }
            let specs =
                catalog::load(&mut conn, &source.key, &source.quota).map_err(|e| e.to_string())?;
            Ok::<_, String>(Some((version, specs)))
        });
        ctx.wait(check.into_actor(self).then(|joined, act, ctx| {
            let loaded = joined.map_err(|e| e.to_string()).and_then(|r| r);
            match loaded {
                Ok(Some((version, specs))) => {
                    act.seen_version = version;
                    let apply = ApplyCatalog {
                        specs,
                        ..ApplyCatalog::default()
                    };
                    Box::pin(act.apply(apply, ctx).map(|result, _, _| {
                        if let Err(e) = result {
                            log::error!(event = "catalog_reload_failed"; "{e}");
                        }
                    })) as Pin<Box<dyn ActorFuture<Self, Output = ()>>>
                }
                Ok(None) => Box::pin(fut::ready(())),
                Err(e) => {
                    log::warn!(event = "catalog_poll_failed"; "cannot read the catalog from the store: {e}");
                    Box::pin(fut::ready(()))
                }
            }
        }));
    }

    /// The diff of `msg` against what runs, as one actor future (the supervisor processes nothing
    /// else meanwhile, so two changes never interleave).
    fn apply(
        &mut self,
        msg: ApplyCatalog,
        ctx: &mut Context<Self>,
    ) -> Pin<Box<dyn ActorFuture<Self, Output = Result<CatalogChange, String>>>> {
        let mut change = CatalogChange::default();
        let wanted: HashMap<Arc<str>, ProviderSpec> = msg
            .specs
            .iter()
            .map(|p| (p.id.clone(), p.clone()))
            .collect();
        let removed: Vec<Arc<str>> = self
            .pools
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            if let Some(pool) = self.pools.remove(&id) {
                for account in pool.accounts.keys() {
                    pool.addr.do_send(RemoveAccount {
                        account_id: account.clone(),
                    });
                }
                change.pools_removed += 1;
                change.accounts_removed += pool.accounts.len();
            }
        }
        // The sends each pool must make, gathered first so the future owns them.
        let mut steps: Vec<(Arc<str>, Addr<PoolActor>, Vec<PoolStep>)> = Vec::new();
        for spec in msg.specs {
            let (addr, old_members) = match self.pools.get(&spec.id) {
                Some(pool) => {
                    if pool.spec.strategy != spec.strategy {
                        pool.addr.do_send(SetStrategy(spec.strategy));
                    }
                    (pool.addr.clone(), pool.spec.accounts.clone())
                }
                None => {
                    let addr = self.start_pool(&spec, ctx.address().recipient());
                    self.pools.insert(
                        spec.id.clone(),
                        Pool {
                            addr: addr.clone(),
                            spec: spec.clone(),
                            accounts: HashMap::new(),
                        },
                    );
                    change.pools_added += 1;
                    (addr, Vec::new())
                }
            };
            let mut pool_steps = Vec::new();
            for member in &spec.accounts {
                match old_members.iter().find(|m| m.spec.id == member.spec.id) {
                    Some(old) if old.spec == member.spec && old.name == member.name => {}
                    Some(_) => pool_steps.push(PoolStep::Update(UpdateMember {
                        name: member.name.clone(),
                        spec: member.spec.clone(),
                    })),
                    None => pool_steps.push(PoolStep::Add(Box::new(AddAccount {
                        name: member.name.clone(),
                        spec: member.spec.clone(),
                        saved: msg.saved.get(&member.spec.id).map(|r| r.state.clone()),
                        gap: msg.saved.get(&member.spec.id).and_then(|r| r.gap),
                    }))),
                }
            }
            for old in &old_members {
                if !spec.accounts.iter().any(|m| m.spec.id == old.spec.id) {
                    pool_steps.push(PoolStep::Remove(old.spec.id.clone()));
                }
            }
            if let Some(pool) = self.pools.get_mut(&spec.id) {
                pool.spec = spec.clone();
            }
            steps.push((spec.id.clone(), addr, pool_steps));
        }
        let run = async move {
            let mut outcomes = Vec::new();
            for (pool_id, addr, pool_steps) in steps {
                for step in pool_steps {
                    let (account_id, outcome) = match step {
                        PoolStep::Add(add) => {
                            let id = add.spec.id.clone();
                            match addr
                                .send(*add)
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r)
                            {
                                Ok(account) => (id, StepOutcome::Added(account)),
                                Err(e) => (id, StepOutcome::Failed(e)),
                            }
                        }
                        PoolStep::Update(update) => {
                            let id = update.spec.id.clone();
                            match addr
                                .send(update)
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r)
                            {
                                Ok(()) => (id, StepOutcome::Updated),
                                Err(e) => (id, StepOutcome::Failed(e)),
                            }
                        }
                        PoolStep::Remove(id) => {
                            let _ = addr
                                .send(RemoveAccount {
                                    account_id: id.clone(),
                                })
                                .await;
                            (id, StepOutcome::Removed)
                        }
                    };
                    outcomes.push((pool_id.clone(), account_id, outcome));
                }
            }
            outcomes
        };
        Box::pin(run.into_actor(self).map(move |outcomes, act, _ctx| {
            let mut errors = Vec::new();
            for (pool_id, account_id, outcome) in outcomes {
                let Some(pool) = act.pools.get_mut(&pool_id) else {
                    continue;
                };
                match outcome {
                    StepOutcome::Added(addr) => {
                        pool.accounts.insert(account_id, addr);
                        change.accounts_added += 1;
                    }
                    StepOutcome::Updated => change.accounts_updated += 1,
                    StepOutcome::Removed => {
                        pool.accounts.remove(&account_id);
                        change.accounts_removed += 1;
                    }
                    StepOutcome::Failed(e) => errors.push(format!("account {account_id}: {e}")),
                }
            }
            act.publish();
            if errors.is_empty() {
                Ok(change)
            } else {
                Err(errors.join("; "))
            }
        }))
    }
}

/// One change a pool must make.
enum PoolStep {
    /// Boxed: a saved state is large, and most steps are not additions.
    Add(Box<AddAccount>),
    Update(UpdateMember),
    Remove(Arc<str>),
}

/// What became of a [`PoolStep`].
enum StepOutcome {
    Added(AccountHandle),
    Updated,
    Removed,
    Failed(String),
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(source) = &self.source {
            ctx.run_interval(source.poll_every, |act, ctx| act.poll(ctx));
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

impl Handler<ApplyCatalog> for Supervisor {
    type Result = AtomicResponse<Self, Result<CatalogChange, String>>;

    fn handle(&mut self, msg: ApplyCatalog, ctx: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.apply(msg, ctx))
    }
}

impl Handler<Reload> for Supervisor {
    type Result = AtomicResponse<Self, Result<CatalogChange, String>>;

    fn handle(&mut self, _msg: Reload, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(source) = self.source.clone() else {
            return AtomicResponse::new(Box::pin(fut::ready(Err(
                "no store to reload from".to_string()
            ))));
        };
        let load = tokio::task::spawn_blocking(move || {
            let mut conn = source.store.conn().map_err(|e| e.to_string())?;
            let version =
                settings::get(&mut conn, settings::CATALOG_VERSION).map_err(|e| e.to_string())?;
            let specs =
                catalog::load(&mut conn, &source.key, &source.quota).map_err(|e| e.to_string())?;
            Ok::<_, String>((version, specs))
        });
        AtomicResponse::new(Box::pin(load.into_actor(self).then(|joined, act, ctx| {
            match joined.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok((version, specs)) => {
                    act.seen_version = version;
                    act.apply(
                        ApplyCatalog {
                            specs,
                            ..ApplyCatalog::default()
                        },
                        ctx,
                    )
                }
                Err(e) => Box::pin(fut::ready(Err(e))),
            }
        })))
    }
}

impl Handler<CollectAll> for Supervisor {
    type Result = ResponseFuture<Vec<(Arc<str>, AccountState)>>;

    fn handle(&mut self, msg: CollectAll, _ctx: &mut Context<Self>) -> Self::Result {
        let pools: Vec<Addr<PoolActor>> = self.pools.values().map(|p| p.addr.clone()).collect();
        Box::pin(async move {
            let mut all = Vec::new();
            for pool in pools {
                if let Ok(changed) = pool.send(CollectChanged { flush: msg.flush }).await {
                    all.extend(changed);
                }
            }
            all
        })
    }
}

impl Handler<Revived> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Revived, _ctx: &mut Context<Self>) {
        if let Some(handle) = self
            .pools
            .get_mut(&msg.provider_id)
            .and_then(|pool| pool.accounts.get_mut(&msg.account_id))
        {
            handle.addr = msg.addr;
            self.publish();
        }
    }
}

impl Handler<StopArbiters> for Supervisor {
    type Result = ();

    fn handle(&mut self, _msg: StopArbiters, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
