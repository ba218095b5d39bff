//! `quotagate serve`: opens the store, makes sure the secrets exist, applies the declared
//! providers, restores the account state, starts the runtime, the sync and the HTTP server, and on
//! SIGTERM/SIGINT shuts down gracefully.
//!
//! Shutdown order: stop accepting; let requests in flight finish within `server.shutdown_grace`
//! (handlers still running then are dropped, and their reservations settle through their guards:
//! committed at the estimate once sent upstream, else released); flush every account's state to the
//! database; leave the instances in Redis; write this instance's clean-shutdown mark; exit 0. A
//! second signal exits at once.

use std::sync::Arc;
use std::time::Duration;

use actix::Actor as _;
use actix_web::{web, App, HttpServer};

use crate::actors::catalog::{self, ProviderSpec, QuotaSettings};
use crate::actors::supervisor::CatalogSource;
use crate::actors::tracker::{audit_runtime_events, Tracker};
use crate::actors::{QuotaSystem, RuntimeSettings};
use crate::config::{Arbiters, Config};
use crate::domain::account::AccountEvent;
use crate::domain::schedule::Schedule;
use crate::domain::time::{Clock as _, SystemClock};
use crate::http::auth::Credentials;
use crate::http::upstream::UpstreamSettings;
use crate::http::{self, AppState};
use crate::jobs::Scheduler;
use crate::ledger::{LedgerClock, LedgerLink, RedisTarget};
use crate::mark::{self, AdmissionGate};
use crate::metrics::Metrics;
use crate::secrets::{KeyOrigin, MasterKey};
use crate::store::open_store;
use crate::store::{accounts, settings, Store};
use crate::sync::restore;
use crate::sync::syncer::{Flush, SyncSettings, Syncer};

/// How often the runtime looks for catalog changes written by other processes (the CLI).
const CATALOG_POLL: Duration = Duration::from_secs(2);

/// Runs the server on its own actix system; returns when it has stopped.
pub fn run(config: Config) -> Result<(), String> {
    actix_web::rt::System::new().block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), String> {
    let store = open_store(&config).map_err(|e| e.to_string())?;
    let (master_key, origin) =
        MasterKey::load_or_generate(&config.security.master_key, &config.data_dir)
            .map_err(|e| e.to_string())?;
    if let KeyOrigin::Generated(path) = &origin {
        log::warn!(
            path:% = path.display();
            "generated a new master key for credentials; back up this file: without it the stored \
             credentials cannot be decrypted"
        );
    }
    let report = crate::startup::prepare(
        &mut *store.conn().map_err(|e| e.to_string())?,
        &config,
        &master_key,
    )
    .map_err(|e| e.to_string())?;
    log::info!(
        providers_created = report.providers_created,
        providers_updated = report.providers_updated,
        providers_deactivated = report.providers_deactivated,
        accounts_created = report.accounts_created,
        accounts_updated = report.accounts_updated,
        accounts_deactivated = report.accounts_deactivated;
        "applied the providers declared in the config"
    );

    let metrics = Metrics::new();
    let Node {
        runtime,
        syncer,
        redis,
        ledger,
    } = start_node(&config, &store, &master_key, &metrics).await?;
    // After the restore read the previous process's mark, before anything can be admitted.
    match AdmissionGate::open(
        &config.data_dir,
        sync_tick(&config),
        runtime.clock().clone(),
    ) {
        Ok(gate) => runtime.set_admission_gate(gate),
        // A read-only data_dir still serves: a crash is then charged as if the gateway was busy.
        Err(e) => {
            log::error!(event = "crash_mark_failed"; "{e}; a crash will be charged as if busy")
        }
    }
    persist_disabled_accounts(&runtime, &store);
    let tracker = Tracker::start(store.clone(), &config.tracking, &metrics);
    audit_runtime_events(runtime.events(), tracker.clone());
    let _scheduler = Scheduler::start(store.clone(), &config.jobs, &config.tracking, &metrics)?;
    let credentials = Credentials::new(&config.security.admin_token);
    credentials
        .reload(&mut *store.conn().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    refresh_credentials(credentials.clone(), store.clone());
    let runtime_for_shutdown = runtime.clone();
    let state = AppState {
        store: store.clone(),
        redis,
        ledger: ledger.clone(),
        runtime,
        credentials,
        syncer: syncer.clone(),
        master_key: master_key.clone(),
        upstream: UpstreamSettings {
            connect_timeout: config.upstream.connect_timeout,
            timeout: config.upstream.timeout,
            stream_idle_timeout: config.upstream.stream_idle_timeout,
            retries: config.upstream.retries,
            max_cooldown: config.upstream.max_cooldown,
            forbidden_cooldown: config.upstream.forbidden_cooldown,
        },
        // Well before the reservation would expire.
        renew_every: (config.sync.reservation_timeout / 3).max(Duration::from_secs(1)),
        tracker: tracker.clone(),
    };
    // The status page's board (snapshots, forecast metrics) and its sessions: one per server,
    // shared by every worker.
    let status_page = web::Data::new(http::status_page::StatusPage {
        board: crate::status::StatusBoard::new(state.store.clone(), state.runtime.clone()),
        sessions: http::session::Sessions::new(master_key.clone(), config.security.session_ttl),
    });
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(status_page.clone())
            // One pooled upstream client per worker thread.
            .app_data(web::Data::new(http::upstream::client(&state.upstream)))
            .configure(http::configure)
    })
    .workers(workers)
    // We handle signals ourselves: actix-server treats SIGINT as a forced stop.
    .disable_signals()
    .shutdown_timeout(config.server.shutdown_grace.as_secs())
    .bind((config.server.host.as_str(), config.server.port))
    .map_err(|e| {
        format!(
            "cannot listen on {}:{}: {e} (server.host / server.port)",
            config.server.host, config.server.port
        )
    })?
    .run();
    let address = format!("{}:{}", config.server.host, config.server.port);
    log::info!(
        address = address.as_str(), workers = workers, database = store.display_url();
        "quotagate is listening"
    );

    let handle = server.handle();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        log::info!(event = "shutdown"; "stopping: finishing requests in flight (a second signal stops at once)");
        actix_web::rt::spawn(async {
            wait_for_signal().await;
            log::warn!(event = "shutdown"; "second signal: exiting now");
            crate::logging::flush(Duration::from_millis(200));
            std::process::exit(130);
        });
        handle.stop(true).await;
    });
    server.await.map_err(|e| e.to_string())?;
    // Requests cut at the end of the grace period settle as their handlers are dropped, on the
    // workers' threads: wait until every settling message is queued before flushing.
    let open = runtime_for_shutdown.settled(Duration::from_secs(10)).await;
    if open > 0 {
        log::error!(event = "shutdown", open = open; "reservations still unsettled after 10 s; they are saved as in flight");
    }

    if let Err(e) = tracker.flush().await {
        log::error!(event = "shutdown"; "request-log flush failed: {e}");
    }
    // Every handler has finished or was dropped: their settling messages are queued ahead of the
    // flush's snapshots, so the flush sees them.
    match syncer
        .send(Flush)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    {
        Ok(report) if ledger.as_ref().is_none_or(LedgerLink::is_up) => {
            log::info!(event = "shutdown", accounts = report.accounts; "account state flushed");
            if let Some(ledger) = &ledger {
                ledger.leave().await;
            }
            mark_clean(&store, &config.instance.id).await?;
        }
        Ok(_) => {
            // What this instance admitted on its share is in no ledger yet: the next start
            // must charge for it.
            log::error!(event = "shutdown"; "the shared ledgers are out of reach, leaving no clean-shutdown mark");
        }
        Err(e) => {
            // Without the mark the next start charges the unknown gap: safe, only less exact.
            log::error!(event = "shutdown"; "final flush failed, leaving no clean-shutdown mark: {e}");
        }
    }
    log::info!(event = "shutdown"; "stopped");
    Ok(())
}

/// What runs below the HTTP front door of one instance.
pub struct Node {
    pub runtime: QuotaSystem,
    /// Writes account state to the database.
    pub syncer: actix::Addr<Syncer>,
    /// `None` when Redis is off.
    pub redis: Option<RedisTarget>,
    /// The shared ledgers (Redis configured).
    pub ledger: Option<LedgerLink>,
}

/// Links this instance to the shared ledgers (Redis configured), restores the saved state,
/// starts the actor runtime and the sync: everything `serve` runs but the HTTP server.
pub async fn start_node(
    config: &Config,
    store: &Store,
    key: &MasterKey,
    metrics: &Metrics,
) -> Result<Node, String> {
    let redis = RedisTarget::from_config(&config.redis).map_err(|e| e.to_string())?;
    let clock = Arc::new(LedgerClock::new(Arc::new(SystemClock)));
    let ledger = match &redis {
        Some(target) => Some(start_ledger(config, target, &clock, store, metrics).await?),
        None => None,
    };
    let runtime = start_runtime(config, store, key, ledger.clone(), clock, metrics).await?;
    let syncer = start_syncer(config, &runtime, store, metrics);
    Ok(Node {
        runtime,
        syncer,
        redis,
        ledger,
    })
}

/// Loads the catalog and the saved state, and starts the actor runtime.
async fn start_runtime(
    config: &Config,
    store: &Store,
    key: &MasterKey,
    ledger: Option<LedgerLink>,
    clock: Arc<LedgerClock>,
    metrics: &Metrics,
) -> Result<QuotaSystem, String> {
    let quota = QuotaSettings {
        schedule: Schedule::new(&config.quota.reset_cron, &config.quota.timezone)?,
        warning_threshold: config.quota.warning_threshold,
    };
    let specs = {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        catalog::load(&mut conn, key, &quota).map_err(|e| e.to_string())?
    };
    let ids: Vec<Arc<str>> = specs
        .iter()
        .flat_map(|p: &ProviderSpec| p.accounts.iter().map(|a| a.spec.id.clone()))
        .collect();
    let plan = restore::plan(
        store,
        &config.instance.id,
        &ids,
        config.sync.database_interval,
        mark::read(&config.data_dir),
        SystemClock.now_ms(),
    )
    .await?;
    log::info!(
        event = "restore", clean = plan.clean, from_database = plan.from_database;
        "restored account state"
    );
    let arbiters = match config.runtime.arbiters {
        Arbiters::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Arbiters::Count(n) => n,
    };
    let webhook = config.notifications.webhook_url.trim();
    let settings = RuntimeSettings {
        clock,
        arbiters,
        reservation_timeout: config.sync.reservation_timeout,
        report_interval: config.sync.report_interval,
        lease_ttl: config.sync.lease_ttl,
        peak_interval: config.sync.redis_interval,
        quota: quota.clone(),
        metrics: metrics.clone(),
        webhook_url: (!webhook.is_empty()).then(|| webhook.to_string()),
        source: Some(CatalogSource {
            store: store.clone(),
            key: key.clone(),
            quota,
            poll_every: CATALOG_POLL,
        }),
        ledger,
    };
    QuotaSystem::start(settings, specs, plan.saved).await
}

/// An account the runtime disabled (its key was refused upstream) stays disabled after a restart:
/// the change is written to the store (the tracker writes its audit row).
fn persist_disabled_accounts(runtime: &QuotaSystem, store: &Store) {
    let store = store.clone();
    runtime.subscribe(move |event| {
        let AccountEvent::Disabled { reason } = &event.kind else {
            return;
        };
        let (store, id, reason) = (store.clone(), event.account.account_id.clone(), reason.clone());
        // The callback runs on the account's thread: the write goes to the blocking pool.
        tokio::task::spawn_blocking(move || {
            let written = store
                .conn()
                .and_then(|mut conn| accounts::set_active(&mut conn, &id, false, Some(&reason)));
            if let Err(e) = written {
                log::error!(event = "persist_failed", account_id = &*id; "cannot record the disabled account: {e}");
            }
        });
    });
}

/// Re-reads client keys and the admin token every few seconds, so what the CLI changes reaches the
/// running server (the admin API changes the in-memory copy at once).
fn refresh_credentials(credentials: Credentials, store: Store) {
    actix_web::rt::spawn(async move {
        let mut every = actix_web::rt::time::interval(CATALOG_POLL);
        loop {
            every.tick().await;
            let (credentials, store) = (credentials.clone(), store.clone());
            let reloaded = tokio::task::spawn_blocking(move || {
                let mut conn = store.conn()?;
                credentials.reload(&mut conn)
            })
            .await;
            if let Ok(Err(e)) = reloaded {
                log::warn!(event = "credentials_refresh_failed"; "cannot re-read client keys: {e}");
            }
        }
    });
}

/// How often the sync ticks (and the crash mark says the process is alive): the database is the
/// only copy it writes.
fn sync_tick(config: &Config) -> Duration {
    config.sync.database_interval
}

/// Starts the periodic sync of account state to the database (and, when the runtime has an
/// admission gate, marks the runtime idle once everything is synced).
fn start_syncer(
    config: &Config,
    runtime: &QuotaSystem,
    store: &Store,
    metrics: &Metrics,
) -> actix::Addr<Syncer> {
    Syncer::new(
        runtime.clone(),
        store.clone(),
        SyncSettings {
            database_interval: config.sync.database_interval,
            instance_id: config.instance.id.clone(),
        },
        metrics.clone(),
    )
    .start()
}

/// Links this instance to the shared ledgers in Redis and keeps it beating.
async fn start_ledger(
    config: &Config,
    target: &RedisTarget,
    clock: &Arc<LedgerClock>,
    store: &Store,
    metrics: &Metrics,
) -> Result<LedgerLink, String> {
    // Without Redis at start, the limits are shared with every instance that may be serving:
    // those whose last process did not stop cleanly, and this one (its own mark, written by the
    // restore that follows, is not counted yet).
    let others = store
        .conn()
        .and_then(|mut conn| settings::unclean_instances(&mut conn))
        .map_err(|e| e.to_string())?;
    let own = settings::get(
        &mut *store.conn().map_err(|e| e.to_string())?,
        &settings::shutdown_mark(&config.instance.id),
    )
    .map_err(|e| e.to_string())?;
    let hint = others.saturating_sub(u64::from(own.is_some_and(|m| m != "clean"))) + 1;
    let link = LedgerLink::start(
        target.clone(),
        config.redis.timeout,
        config.sync.redis_interval,
        config.instance.id.clone(),
        clock.clone(),
        metrics.ledger.clone(),
        hint,
    )
    .await;
    link.keep_beating();
    log::info!(
        event = "ledger_joined", instance = link.instance_id(), owner = link.owner(), instances = link.live_instances();
        "account ledgers are shared in Redis"
    );
    Ok(link)
}

/// Writes this instance's clean-shutdown mark (`instance_id` is `instance.id`): its next start
/// restores exactly. Other instances on the same database keep their own marks.
pub async fn mark_clean(store: &Store, instance_id: &str) -> Result<(), String> {
    let store = store.clone();
    let key = settings::shutdown_mark(instance_id);
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        settings::put(&mut conn, &key, "clean").map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
