//! `QuotaSystem` (the seed's name): one handle that wires the runtime — supervisor, pools,
//! accounts, events, notifier — and offers what callers need: acquire a reservation for a model
//! (with fallback across providers), read status, reset, change the catalog, subscribe to events.
//!
//! Start it inside an actix system with [`QuotaSystem::start`], or from any thread with
//! [`QuotaSystem::start_in_thread`], which runs its own actix system; every method returns a `Send`
//! future either way.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;

use super::account::{
    CheckAvailability, ConsumeQuota, GetRateStats, GetStatus, LedgerTimes, Reset,
};
use super::catalog::{ProviderSpec, QuotaSettings};
use super::events::{Event, EventSink, Notifier};
use super::holder::{self, HolderSettings, Holders};
use super::pool::{GetPoolStatus, PoolSettings, PoolStatus, ResetAll};
use super::registry::{self, Lookup, Registry, SharedRegistry};
use super::reservation::{Outstanding, Reservation};
use super::supervisor::{
    ApplyCatalog, CatalogChange, CatalogSource, CollectAll, Reload, Restored, Supervisor,
};
use crate::domain::account::{AccountEvent, AccountState, Denial, QuotaStatus, WindowStats};
use crate::domain::refusal::Verdict;
use crate::domain::time::SharedClock;
use crate::mark::AdmissionGate;
use crate::metrics::Metrics;

/// A shared ledger's changes that need not be written at once are written within this many
/// worker report intervals (`sync.report_interval`): 250 ms by default.
pub const LEDGER_FLUSH_REPORTS: u32 = 10;

/// How the runtime is built.
#[derive(Clone)]
pub struct RuntimeSettings {
    pub clock: SharedClock,
    /// Threads hosting the pools; 0 = the caller's arbiter.
    pub arbiters: usize,
    pub reservation_timeout: Duration,
    /// How often each worker thread reports to its accounts and refills its leases; zero: no
    /// leases (every request asks its account's actor).
    pub report_interval: Duration,
    /// A lease not renewed by its holder within this counts as used in full.
    pub lease_ttl: Duration,
    /// The sync interval: also the unit of the peak rates kept for crash-gap charges.
    pub peak_interval: Duration,
    pub quota: QuotaSettings,
    pub metrics: Metrics,
    pub webhook_url: Option<String>,
    pub source: Option<CatalogSource>,
    /// The shared ledgers (Redis configured): `clock` must then be their [`LedgerClock`].
    ///
    /// [`LedgerClock`]: crate::ledger::LedgerClock
    pub ledger: Option<crate::ledger::LedgerLink>,
}

/// Why `acquire` admitted nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("no provider serves model `{0}`")]
    ModelNotFound(String),
    #[error("refused: {0:?}")]
    Refused(Verdict),
}

/// Why a status query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Lookup(#[from] Lookup),
    #[error("the runtime is not running")]
    Stopped,
}

#[derive(Clone)]
pub struct QuotaSystem {
    supervisor: Addr<Supervisor>,
    registry: SharedRegistry,
    events: EventSink,
    clock: SharedClock,
    /// The actix system this runtime owns (only when started in its own thread).
    own_system: Option<actix::System>,
    /// Reservations and holder shards not yet settled.
    outstanding: Outstanding,
    /// The worker threads' holders of capacity leases.
    holders: Arc<Holders>,
    /// Every admission passes the crash mark's gate, once the server has set one.
    gate: Arc<std::sync::OnceLock<AdmissionGate>>,
}

impl std::fmt::Debug for QuotaSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaSystem").finish_non_exhaustive()
    }
}

impl QuotaSystem {
    /// Starts the runtime on the current actix system and loads `specs`, starting accounts from
    /// their `saved` states (with the crash gap to charge, if any).
    pub async fn start(
        settings: RuntimeSettings,
        specs: Vec<ProviderSpec>,
        saved: HashMap<Arc<str>, Restored>,
    ) -> Result<QuotaSystem, String> {
        let notifier = settings
            .webhook_url
            .clone()
            .filter(|u| !u.is_empty())
            .map(|url| {
                Notifier::new(url, settings.metrics.clone())
                    .start_bounded()
                    .recipient()
            });
        let events = EventSink::new(settings.metrics.clone(), notifier);
        let registry: SharedRegistry = Arc::new(RwLock::new(Arc::new(Registry::default())));
        let pool_settings = PoolSettings {
            clock: settings.clock.clone(),
            times: LedgerTimes {
                reservation_timeout: settings.reservation_timeout,
                lease_ttl: settings.lease_ttl,
                ledger_flush: settings
                    .report_interval
                    .saturating_mul(LEDGER_FLUSH_REPORTS)
                    .max(Duration::from_millis(10)),
            },
            peak_interval: settings.peak_interval,
            quota_schedule: settings.quota.schedule.clone(),
            events: events.clone(),
            ledger: settings.ledger.clone(),
        };
        let supervisor = Supervisor::new(
            pool_settings,
            settings.arbiters,
            registry.clone(),
            settings.source.clone(),
        )
        .start();
        let change = supervisor
            .send(ApplyCatalog { specs, saved })
            .await
            .map_err(|e| e.to_string())??;
        log::info!(
            pools = change.pools_added, accounts = change.accounts_added, arbiters = settings.arbiters;
            "actor runtime started"
        );
        let outstanding = Outstanding::default();
        let holders = Holders::new(HolderSettings {
            clock: settings.clock.clone(),
            report_interval: settings.report_interval,
            reservation_timeout: settings.reservation_timeout,
            metrics: settings.metrics.clone(),
            outstanding: outstanding.clone(),
            registry: registry.clone(),
        });
        Ok(QuotaSystem {
            supervisor,
            registry,
            events,
            clock: settings.clock,
            own_system: None,
            outstanding,
            holders,
            gate: Arc::default(),
        })
    }

    /// Starts the runtime on a new thread with its own actix system, for callers that are not on
    /// an actix runtime. [`QuotaSystem::shutdown`] stops that thread.
    pub fn start_in_thread(
        settings: RuntimeSettings,
        specs: Vec<ProviderSpec>,
    ) -> Result<QuotaSystem, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("quotagate-runtime".into())
            .spawn(move || {
                let system = actix::System::new();
                let handle = actix::System::current();
                system.block_on(async move {
                    let started = QuotaSystem::start(settings, specs, HashMap::new())
                        .await
                        .map(|mut qs| {
                            qs.own_system = Some(handle);
                            qs
                        });
                    let _ = tx.send(started);
                });
                let _ = system.run();
            })
            .map_err(|e| e.to_string())?;
        rx.recv().map_err(|e| e.to_string())?
    }

    /// Stops the thread started by [`QuotaSystem::start_in_thread`] (no-op otherwise).
    pub fn shutdown(&self) {
        self.holders.stop();
        self.supervisor.do_send(super::supervisor::StopArbiters);
        if let Some(system) = &self.own_system {
            system.stop();
        }
    }

    /// Ends the worker threads' leases: each reports and gives back what it holds at its next
    /// report tick (or when its thread ends).
    pub fn stop_holders(&self) {
        self.holders.stop();
    }

    /// Reports what this thread's holder used (of one account, or all) and waits until the
    /// accounts applied it: status reads that follow see this thread's admissions.
    pub async fn report_local(&self, account: Option<&str>) {
        holder::flush_local(&self.holders, account).await;
    }

    /// Waits (at most `limit`) until every reservation handed out is settled and every holder
    /// shard has reported, i.e. their settling messages are queued at their accounts; returns
    /// how many were still open when the wait ended.
    pub async fn settled(&self, limit: Duration) -> usize {
        let deadline = std::time::Instant::now() + limit;
        while self.outstanding.count() > 0 && std::time::Instant::now() < deadline {
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        self.outstanding.count()
    }

    /// Makes every admission from now on pass `gate` (the crash mark); set once, by the server.
    pub fn set_admission_gate(&self, gate: AdmissionGate) {
        let _ = self.gate.set(gate);
    }

    /// The gate set by [`QuotaSystem::set_admission_gate`], if any (the sync marks it idle).
    pub fn admission_gate(&self) -> Option<&AdmissionGate> {
        self.gate.get()
    }

    /// Leases handed out whose settling message is not yet queued.
    pub fn leases_out(&self) -> usize {
        self.outstanding.count()
    }

    pub fn registry(&self) -> Arc<Registry> {
        registry::read(&self.registry)
    }

    pub fn events(&self) -> &EventSink {
        &self.events
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Calls `f` for every runtime event.
    pub fn subscribe(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.events.subscribe(f);
    }

    /// The seed's `SetWarningCallback`: `f(account, used fraction)`.
    pub fn on_warning(&self, f: impl Fn(&Event, f64) + Send + Sync + 'static) {
        self.events.subscribe(move |e| {
            if let AccountEvent::QuotaWarning { fraction, .. } = e.kind {
                f(e, fraction);
            }
        });
    }

    /// The seed's `SetExhaustedCallback`.
    pub fn on_exhausted(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.events.subscribe(move |e| {
            if matches!(e.kind, AccountEvent::QuotaExhausted { .. }) {
                f(e);
            }
        });
    }

    /// Reserves on an account of a provider serving `model`, trying providers in turn (a pool
    /// with no room falls back to the next one). `estimate` gives the request's token estimate for
    /// a provider (tokenizers and completion bounds differ). `exclude`: accounts not to reserve
    /// on (already tried for this request; their state still counts in the refusal). Refusals of
    /// every account are combined into one verdict.
    pub async fn acquire(
        &self,
        model: &str,
        estimate: impl Fn(&ProviderSpec) -> u64,
        exclude: &[Arc<str>],
    ) -> Result<Reservation, AcquireError> {
        // Held until the reservation exists, so the crash mark never says idle while one is made.
        let _pass = match self.gate.get() {
            Some(gate) => Some(gate.pass().await),
            None => None,
        };
        holder::acquire(&self.holders, self.registry(), model, estimate, exclude).await
    }

    pub async fn status(&self, account: &str) -> Result<QuotaStatus, QueryError> {
        let entry = self.registry().account(account)?.clone();
        self.report_local(Some(&entry.id)).await;
        let addr = entry.addr.clone();
        addr.send(GetStatus).await.map_err(|_| QueryError::Stopped)
    }

    pub async fn rate_stats(&self, account: &str) -> Result<Vec<WindowStats>, QueryError> {
        let entry = self.registry().account(account)?.clone();
        self.report_local(Some(&entry.id)).await;
        let addr = entry.addr.clone();
        addr.send(GetRateStats)
            .await
            .map_err(|_| QueryError::Stopped)
    }

    /// The seed's non-atomic `CheckAvailability` (read-only; a later reservation may still fail).
    pub async fn check_availability(
        &self,
        account: &str,
        model: &str,
        estimate: u64,
    ) -> Result<Result<(), Denial>, QueryError> {
        let addr = self.registry().account(account)?.addr.clone();
        addr.send(CheckAvailability {
            model: Arc::from(model),
            estimate,
        })
        .await
        .map_err(|_| QueryError::Stopped)
    }

    /// The seed's `ConsumeQuota`: records usage directly, without a reservation.
    pub async fn consume_quota(
        &self,
        account: &str,
        model: &str,
        tokens: u64,
    ) -> Result<QuotaStatus, QueryError> {
        let _pass = match self.gate.get() {
            Some(gate) => Some(gate.pass().await),
            None => None,
        };
        let addr = self.registry().account(account)?.addr.clone();
        addr.send(ConsumeQuota {
            model: Arc::from(model),
            tokens,
        })
        .await
        .map_err(|_| QueryError::Stopped)
    }

    pub async fn reset_account(&self, account: &str) -> Result<QuotaStatus, QueryError> {
        let addr = self.registry().account(account)?.addr.clone();
        addr.send(Reset).await.map_err(|_| QueryError::Stopped)
    }

    /// Resets every account of a provider; answers how many.
    pub async fn reset_provider(&self, provider: &str) -> Result<usize, QueryError> {
        let pool = self.registry().provider(provider)?.pool.clone();
        pool.send(ResetAll).await.map_err(|_| QueryError::Stopped)
    }

    pub async fn pool_status(&self, provider: &str) -> Result<PoolStatus, QueryError> {
        let pool = self.registry().provider(provider)?.pool.clone();
        self.report_local(None).await;
        pool.send(GetPoolStatus)
            .await
            .map_err(|_| QueryError::Stopped)
    }

    /// Makes the runtime serve exactly `specs`, keeping the counters of accounts that stay.
    pub async fn apply_catalog(&self, specs: Vec<ProviderSpec>) -> Result<CatalogChange, String> {
        self.supervisor
            .send(ApplyCatalog {
                specs,
                ..ApplyCatalog::default()
            })
            .await
            .map_err(|e| e.to_string())?
    }

    /// Reloads the catalog from the store now.
    pub async fn reload(&self) -> Result<CatalogChange, String> {
        self.supervisor
            .send(Reload)
            .await
            .map_err(|e| e.to_string())?
    }

    /// The states of accounts changed since the last call.
    pub async fn collect_changed(&self) -> Vec<(Arc<str>, AccountState)> {
        self.collect(false).await
    }

    /// [`Self::collect_changed`] after every account wrote what waits to be written to its
    /// shared ledger and gave back its instance's reserves (a flush, a shutdown).
    pub async fn collect_flushed(&self) -> Vec<(Arc<str>, AccountState)> {
        self.collect(true).await
    }

    async fn collect(&self, flush: bool) -> Vec<(Arc<str>, AccountState)> {
        self.supervisor
            .send(CollectAll { flush })
            .await
            .unwrap_or_default()
    }
}
