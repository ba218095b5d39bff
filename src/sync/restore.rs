//! Restore on start: each account's saved state from whichever copy (Redis or the database) has the
//! higher version — "newer" is the higher version, not the later clock — and, when the previous
//! process left no clean-shutdown mark, the unknown gap to charge.
//!
//! The gap: each copy's heartbeat says until when everything was written there. The process died
//! before its next tick, so before `heartbeat + interval` of the copy that was written last; what
//! happened between the chosen copy's heartbeat and that moment is unknown and is charged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::supervisor::Restored;
use crate::domain::account::AccountState;
use crate::domain::time::{duration_ms, Millis};
use crate::store::{settings, state, Store};

use super::redis_link::{account_key, classify, HEARTBEAT_KEY};

/// How long the restore waits for Redis before going on with the database alone.
const REDIS_WAIT: Duration = Duration::from_secs(3);

/// What a start restores.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub saved: HashMap<Arc<str>, Restored>,
    /// The previous process stopped cleanly: restore exactly, charge nothing.
    pub clean: bool,
    pub from_redis: usize,
    pub from_database: usize,
}

/// One copy's states and heartbeat.
#[derive(Debug, Default)]
struct Copy {
    states: HashMap<Arc<str>, AccountState>,
    heartbeat: Option<Millis>,
}

/// Reads both copies and plans the restore of `accounts`.
pub async fn plan(
    store: &Store,
    redis: Option<&redis::Client>,
    accounts: &[Arc<str>],
    redis_interval: Duration,
    database_interval: Duration,
    now: Millis,
) -> Result<RestorePlan, String> {
    let (database, clean) = read_database(store.clone()).await?;
    let from_redis = match redis {
        Some(client) => {
            match tokio::time::timeout(REDIS_WAIT, read_redis(client, accounts)).await {
                Ok(Ok(copy)) => copy,
                Ok(Err(problem)) => {
                    log::warn!(event = "restore_redis_unavailable"; "restoring from the database only: {problem}");
                    Copy::default()
                }
                Err(_) => {
                    log::warn!(event = "restore_redis_unavailable"; "restoring from the database only: Redis did not answer within {REDIS_WAIT:?}");
                    Copy::default()
                }
            }
        }
        None => Copy::default(),
    };
    Ok(choose(
        &database,
        &from_redis,
        clean,
        redis_interval,
        database_interval,
        now,
    ))
}

/// Picks the higher version per account and the gap to charge (pure, tested directly).
fn choose(
    database: &Copy,
    redis: &Copy,
    clean: bool,
    redis_interval: Duration,
    database_interval: Duration,
    now: Millis,
) -> RestorePlan {
    let died_before = [
        redis.heartbeat.map(|h| h + duration_ms(redis_interval)),
        database
            .heartbeat
            .map(|h| h + duration_ms(database_interval)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now)
    .min(now);
    let mut plan = RestorePlan {
        clean,
        ..RestorePlan::default()
    };
    let ids: std::collections::HashSet<&Arc<str>> =
        database.states.keys().chain(redis.states.keys()).collect();
    for id in ids {
        let (state, copy, from_redis) = match (database.states.get(id), redis.states.get(id)) {
            (Some(d), Some(r)) if r.version > d.version => (r, redis, true),
            (Some(d), _) => (d, database, false),
            (None, Some(r)) => (r, redis, true),
            (None, None) => continue,
        };
        let known_until = copy.heartbeat.unwrap_or(state.saved_at).max(state.saved_at);
        let gap = (!clean).then(|| (died_before - known_until).max(0));
        if from_redis {
            plan.from_redis += 1;
        } else {
            plan.from_database += 1;
        }
        plan.saved.insert(
            id.clone(),
            Restored {
                state: state.clone(),
                gap,
            },
        );
    }
    plan
}

async fn read_database(store: Store) -> Result<(Copy, bool), String> {
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        let clean = settings::get(&mut conn, settings::SHUTDOWN_MARK).map_err(|e| e.to_string())?.as_deref() == Some("clean");
        let heartbeat = settings::get(&mut conn, settings::HEARTBEAT)
            .map_err(|e| e.to_string())?
            .and_then(|v| v.parse().ok());
        let mut states = HashMap::new();
        for row in state::list(&mut conn).map_err(|e| e.to_string())? {
            match serde_json::from_str::<AccountState>(&row.state) {
                Ok(s) => {
                    states.insert(Arc::from(row.account_id.as_str()), s);
                }
                Err(e) => log::error!(account_id = row.account_id.as_str(); "ignoring an unreadable saved state: {e}"),
            }
        }
        // From now on a stop without a final flush must be detectable.
        settings::put(&mut conn, settings::SHUTDOWN_MARK, "running").map_err(|e| e.to_string())?;
        Ok((Copy { states, heartbeat }, clean))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn read_redis(client: &redis::Client, accounts: &[Arc<str>]) -> Result<Copy, String> {
    let addr = client.get_connection_info().addr().to_string();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| classify(&addr, &e).to_string())?;
    let heartbeat: Option<Millis> = redis::cmd("GET")
        .arg(HEARTBEAT_KEY)
        .query_async(&mut conn)
        .await
        .map_err(|e| classify(&addr, &e).to_string())?;
    let mut states = HashMap::new();
    for chunk in accounts.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|id| account_key(id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| classify(&addr, &e).to_string())?;
        for (id, value) in chunk.iter().zip(values) {
            if let Some(json) = value {
                match serde_json::from_str::<AccountState>(&json) {
                    Ok(s) => {
                        states.insert(id.clone(), s);
                    }
                    Err(e) => {
                        log::error!(account_id = &**id; "ignoring an unreadable Redis state: {e}")
                    }
                }
            }
        }
    }
    Ok(Copy { states, heartbeat })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(version: u64, saved_at: Millis) -> AccountState {
        AccountState {
            version,
            saved_at,
            ..AccountState::default()
        }
    }

    fn copy(states: &[(&str, u64, Millis)], heartbeat: Option<Millis>) -> Copy {
        Copy {
            states: states
                .iter()
                .map(|(id, v, at)| (Arc::from(*id), state(*v, *at)))
                .collect(),
            heartbeat,
        }
    }

    const S: Duration = Duration::from_secs(1);
    const FIVE: Duration = Duration::from_secs(5);

    #[test]
    fn the_higher_version_wins_whatever_the_clocks_say() {
        let db = copy(&[("a", 5, 9_000), ("b", 9, 1_000)], Some(10_000));
        let redis = copy(&[("a", 7, 2_000), ("b", 3, 9_999)], Some(12_000));
        let plan = choose(&db, &redis, true, S, FIVE, 20_000);
        assert_eq!(plan.saved[&Arc::from("a")].state.version, 7);
        assert_eq!(plan.saved[&Arc::from("b")].state.version, 9);
        assert_eq!((plan.from_redis, plan.from_database), (1, 1));
        assert!(
            plan.saved.values().all(|r| r.gap.is_none()),
            "a clean stop charges nothing"
        );
    }

    #[test]
    fn after_a_crash_the_gap_runs_from_the_copys_heartbeat_to_the_last_possible_tick() {
        let db = copy(&[("a", 5, 9_000)], Some(10_000));
        let redis = copy(&[("b", 2, 11_000)], Some(12_000));
        let plan = choose(&db, &redis, false, S, FIVE, 60_000);
        // The process was alive at 12 000 (Redis) and died before 15 000 (db heartbeat + 5 s).
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(5_000));
        assert_eq!(plan.saved[&Arc::from("b")].gap, Some(3_000));
    }

    #[test]
    fn without_any_heartbeat_the_gap_runs_until_now() {
        let db = copy(&[("a", 1, 1_000)], None);
        let plan = choose(&db, &Copy::default(), false, S, FIVE, 4_000);
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(3_000));
    }
}
