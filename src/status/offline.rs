//! A [`Snapshot`] from the database alone, for `quotagate status` when no gateway runs: the
//! catalog, each account's last synced state (restored into a plain domain `Account`, as a start
//! would) and the request log. Read-only: unlike a server start, it writes no shutdown mark and
//! starts no actors.

use std::collections::HashMap;

use crate::actors::catalog::{self, QuotaSettings};
use crate::actors::pool::{MemberStatus, PoolStatus};
use crate::config::Config;
use crate::domain::account::{Account, AccountState};
use crate::domain::schedule::Schedule;
use crate::domain::time::{to_datetime, Clock as _, Millis, SystemClock};
use crate::secrets::MasterKey;
use crate::store::{activity, state, Store};

use super::compose::{self, PoolInput};
use super::{Snapshot, HISTORY_MINUTES, RATE_SPAN_MINUTES};

/// The master key the server would use, without generating one: without it no stored key can
/// be decrypted anyway (the accounts then show as such), and a status command must not write.
fn master_key(config: &Config) -> MasterKey {
    if !config.security.master_key.is_empty() {
        if let Ok(key) = MasterKey::parse(config.security.master_key.expose()) {
            return key;
        }
    }
    let path = config.data_dir.join(crate::secrets::MASTER_KEY_FILE);
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| MasterKey::parse(&text).ok())
        .unwrap_or_else(MasterKey::generate)
}

/// Every pool and account as of the last sync to the database.
pub fn snapshot(config: &Config, store: &Store) -> Result<Snapshot, String> {
    let now: Millis = SystemClock.now_ms();
    let quota = QuotaSettings {
        schedule: Schedule::new(&config.quota.reset_cron, &config.quota.timezone)?,
        warning_threshold: config.quota.warning_threshold,
    };
    let mut conn = store.conn().map_err(|e| e.to_string())?;
    let specs = catalog::load(&mut conn, &master_key(config), &quota).map_err(|e| e.to_string())?;
    let saved: HashMap<String, AccountState> = state::list(&mut conn)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|row| Some((row.account_id, serde_json::from_str(&row.state).ok()?)))
        .collect();
    let activity = activity::recent(
        &mut conn,
        to_datetime(now).naive_utc(),
        HISTORY_MINUTES as i64,
        chrono::Duration::minutes(RATE_SPAN_MINUTES),
    )
    .map_err(|e| e.to_string())?;

    let mut pools = Vec::with_capacity(specs.len());
    for provider in specs {
        let mut members = Vec::with_capacity(provider.accounts.len());
        let mut windows = HashMap::new();
        for member in &provider.accounts {
            let mut account = Account::new(&member.spec, now)?;
            if let Some(saved) = saved.get(&*member.spec.id) {
                account.restore(saved, now, None);
            }
            account.roll(now, &mut Vec::new());
            let status = account.status(now);
            members.push(MemberStatus::new(
                &member.spec.id,
                &member.name,
                member.spec.active,
                status,
            ));
            windows.insert(member.spec.id.to_string(), account.window_stats(now));
        }
        pools.push(PoolInput {
            status: PoolStatus {
                provider_id: provider.id.to_string(),
                provider: provider.name.to_string(),
                strategy: provider.strategy,
                total_accounts: members.len(),
                available_accounts: members.iter().filter(|m| m.available).count(),
                accounts_status: members,
            },
            active: provider.active,
            windows,
        });
    }
    pools.sort_by(|a, b| a.status.provider.cmp(&b.status.provider));
    Ok(compose::compose(pools, &activity, &HashMap::new(), now))
}
