//! Restore on start: each account's saved state from the database's copy and, when this
//! instance's previous process left no clean-shutdown mark, the unknown gap to charge.
//!
//! The copy: every instance writes an account's row from its own view of the account (with Redis,
//! the ledger as last agreed, under the ledger's version), and the database keeps the higher
//! version — "newer" is the higher version, not the later clock. With Redis the ledger itself is
//! the live state: an account that finds its ledger takes it, and what is restored here only seeds
//! a ledger Redis no longer holds.
//!
//! The marks are this instance's (`settings::shutdown_mark`, `settings::heartbeat`): several
//! instances can share one database, and one's clean stop must not hide another's crash.
//!
//! The gap: this instance's heartbeat says until when everything it admitted was written to the
//! database. The process died before its next sign of life — its next sync tick
//! (`heartbeat + interval`) or the next write of the crash mark in `data_dir` (`alive_at + every`,
//! written whatever the database does), whichever is later; what happened between the heartbeat
//! and that moment is unknown and is charged. No gap is charged when the crash mark says the
//! runtime was idle (nothing admitted since the last complete copy: see [`crate::mark`]).
//!
//! Accounts the copy misses are charged too: one with no row at all that existed while the
//! previous process ran (created, or never synced, since the last complete copy) gets the gap
//! since the heartbeat or its creation, whichever is later; one whose row cannot be read gets
//! every window filled (its counters are unknown), and a version above the unreadable row's, so
//! that its next writes are not refused as older. The very first start, and accounts created since
//! the previous process died, are charged nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::supervisor::Restored;
use crate::domain::account::AccountState;
use crate::domain::time::{duration_ms, Millis};
use crate::mark::Mark;
use crate::store::{accounts, settings, state, DbConn, Store, StoreError};

/// What a start restores.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub saved: HashMap<Arc<str>, Restored>,
    /// The previous process stopped cleanly: restore exactly, charge nothing.
    pub clean: bool,
    /// Accounts restored from a readable row.
    pub from_database: usize,
}

/// The database's copy of the saved states, and this instance's heartbeat.
#[derive(Debug, Default)]
struct StateCopy {
    states: HashMap<Arc<str>, AccountState>,
    /// When each account was created.
    created: HashMap<Arc<str>, Millis>,
    /// Accounts whose saved state could not be read, with the version it was stored at.
    unreadable: HashMap<Arc<str>, u64>,
    heartbeat: Option<Millis>,
}

/// Reads the database's copy and this instance's marks, and plans the restore of `accounts`,
/// given the crash mark the previous process left in `data_dir` (if any). `interval` is
/// `sync.database_interval`; `instance_id` names this instance (`instance.id`).
pub async fn plan(
    store: &Store,
    instance_id: &str,
    accounts: &[Arc<str>],
    interval: Duration,
    mark: Option<Mark>,
    now: Millis,
) -> Result<RestorePlan, String> {
    let (database, ending) = read_database(store.clone(), instance_id.to_string()).await?;
    Ok(choose(
        &database,
        Previous {
            clean: ending == Ending::Clean,
            ran: ending != Ending::FirstStart,
            mark,
            interval,
        },
        accounts,
        now,
    ))
}

/// How this instance's previous process ended, as its shutdown mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// No process of this instance ever started on this database.
    FirstStart,
    Clean,
    /// It started, and did not leave the clean-shutdown mark.
    Unclean,
}

/// How the previous process ended, as far as the database and `data_dir` tell.
#[derive(Debug, Clone, Copy)]
struct Previous {
    /// The database holds this instance's clean-shutdown mark.
    clean: bool,
    /// A process of this instance ran on this database before (it left a shutdown mark, clean or
    /// not).
    ran: bool,
    mark: Option<Mark>,
    /// `sync.database_interval`: the previous process wrote the copy at least this often.
    interval: Duration,
}

/// Restores each account from the copy and picks the gap to charge (pure, tested directly).
fn choose(
    database: &StateCopy,
    previous: Previous,
    accounts: &[Arc<str>],
    now: Millis,
) -> RestorePlan {
    // A mark older than the copy's last write was left by an earlier process (this one could not
    // write its own): it says nothing about the last run.
    let mut previous = previous;
    previous.mark = previous.mark.filter(|m| {
        database
            .heartbeat
            .is_none_or(|h| m.died_before().saturating_add(m.every_ms) >= h)
    });
    let died_before = [
        database
            .heartbeat
            .map(|h| h.saturating_add(duration_ms(previous.interval))),
        previous.mark.map(|m| m.died_before()),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now)
    .min(now);
    let idle = previous.mark.is_some_and(|m| m.idle_since.is_some());
    // Nothing to charge on a first start: no process of this instance ran before.
    let charged = !previous.clean && !idle && previous.ran;
    // An account the copy does not hold was not there (or not changed) when it was last written.
    let last_copy = database
        .heartbeat
        .or(previous.mark.map(|m| m.started_at))
        .unwrap_or(died_before);
    let mut plan = RestorePlan {
        clean: previous.clean,
        ..RestorePlan::default()
    };
    let ids: std::collections::HashSet<&Arc<str>> = accounts
        .iter()
        .chain(database.states.keys())
        .chain(database.unreadable.keys())
        .collect();
    for id in ids {
        let restored = match (database.states.get(id), database.unreadable.get(id)) {
            (Some(state), _) => {
                plan.from_database += 1;
                let known_until = database
                    .heartbeat
                    .unwrap_or(state.saved_at)
                    .max(state.saved_at);
                Restored {
                    state: state.clone(),
                    gap: charged.then(|| died_before.saturating_sub(known_until).max(0)),
                }
            }
            (None, Some(&version)) => Restored {
                state: AccountState::unreadable(version),
                gap: charged.then(|| died_before.saturating_sub(last_copy).max(0)),
            },
            (None, None) => {
                let created = database.created.get(id).copied().unwrap_or(0);
                // New since the previous process died (or no process ran before): it has no
                // history to charge.
                if !charged || created >= died_before {
                    continue;
                }
                Restored {
                    state: AccountState::missing(),
                    gap: Some(died_before.saturating_sub(last_copy.max(created)).max(0)),
                }
            }
        };
        plan.saved.insert(id.clone(), restored);
    }
    plan
}

/// Reads the copy and this instance's marks, and sets its shutdown mark to `running`.
async fn read_database(store: Store, instance_id: String) -> Result<(StateCopy, Ending), String> {
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        let (shutdown_mark, heartbeat) =
            read_marks(&mut conn, &instance_id).map_err(|e| e.to_string())?;
        let ending = match shutdown_mark.as_deref() {
            None => Ending::FirstStart,
            Some("clean") => Ending::Clean,
            Some(_) => Ending::Unclean,
        };
        let created = accounts::created_times(&mut conn)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(id, at)| (Arc::from(id.as_str()), at.and_utc().timestamp_millis()))
            .collect();
        let heartbeat = heartbeat.and_then(|v| v.parse().ok());
        let mut states = HashMap::new();
        let mut unreadable = HashMap::new();
        for row in state::list(&mut conn).map_err(|e| e.to_string())? {
            match serde_json::from_str::<AccountState>(&row.state) {
                Ok(s) => {
                    states.insert(Arc::from(row.account_id.as_str()), s);
                }
                Err(e) => {
                    log::error!(
                        account_id = row.account_id.as_str();
                        "unreadable saved state: its windows restart full, and it is replaced at the next sync: {e}"
                    );
                    let version = u64::try_from(row.version).unwrap_or(0);
                    unreadable.insert(Arc::from(row.account_id.as_str()), version);
                }
            }
        }
        // From now on a stop without a final flush must be detectable.
        settings::put(&mut conn, &settings::shutdown_mark(&instance_id), "running")
            .map_err(|e| e.to_string())?;
        Ok((
            StateCopy {
                states,
                created,
                unreadable,
                heartbeat,
            },
            ending,
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// This instance's shutdown mark and heartbeat, as stored. An instance that has no mark of its own
/// yet reads the legacy global pair instead, which a version before instance ids wrote: a
/// single-instance deployment then restores exactly across the upgrade (the two are read as a
/// pair, so a heartbeat always belongs to the mark it is read with).
fn read_marks(
    conn: &mut DbConn,
    instance_id: &str,
) -> Result<(Option<String>, Option<String>), StoreError> {
    if let Some(own) = settings::get(conn, &settings::shutdown_mark(instance_id))? {
        let heartbeat = settings::get(conn, &settings::heartbeat(instance_id))?;
        return Ok((Some(own), heartbeat));
    }
    Ok((
        settings::get(conn, settings::LEGACY_SHUTDOWN_MARK)?,
        settings::get(conn, settings::LEGACY_HEARTBEAT)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::account::SavedCopy;

    fn state(version: u64, saved_at: Millis) -> AccountState {
        AccountState {
            version,
            saved_at,
            ..AccountState::default()
        }
    }

    fn copy(states: &[(&str, u64, Millis)], heartbeat: Option<Millis>) -> StateCopy {
        StateCopy {
            states: states
                .iter()
                .map(|(id, v, at)| (Arc::from(*id), state(*v, *at)))
                .collect(),
            heartbeat,
            ..StateCopy::default()
        }
    }

    const FIVE: Duration = Duration::from_secs(5);

    fn previous(clean: bool, mark: Option<Mark>) -> Previous {
        Previous {
            clean,
            ran: true,
            mark,
            interval: FIVE,
        }
    }

    fn ids(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|id| Arc::from(*id)).collect()
    }

    fn mark(alive_at: Millis, idle_since: Option<Millis>) -> Mark {
        Mark {
            started_at: 1_000,
            alive_at,
            every_ms: 1_000,
            idle_since,
        }
    }

    #[test]
    fn a_clean_stop_restores_the_copy_exactly_and_charges_nothing() {
        let db = copy(&[("a", 5, 9_000), ("b", 9, 1_000)], Some(10_000));
        let plan = choose(&db, previous(true, None), &ids(&["a", "b"]), 20_000);
        assert_eq!(plan.saved[&Arc::from("a")].state.version, 5);
        assert_eq!(plan.saved[&Arc::from("b")].state.version, 9);
        assert_eq!(plan.from_database, 2);
        assert!(plan.clean);
        assert!(
            plan.saved.values().all(|r| r.gap.is_none()),
            "a clean stop charges nothing"
        );
    }

    #[test]
    fn after_a_crash_the_gap_runs_from_the_heartbeat_to_the_last_possible_tick() {
        // Another instance wrote "b" later than this one's heartbeat: "b" is known until then.
        let db = copy(&[("a", 5, 9_000), ("b", 2, 12_000)], Some(10_000));
        let plan = choose(&db, previous(false, None), &ids(&["a", "b"]), 60_000);
        // The process died before 15 000 (heartbeat + 5 s).
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(5_000));
        assert_eq!(plan.saved[&Arc::from("b")].gap, Some(3_000));
    }

    #[test]
    fn without_any_heartbeat_the_gap_runs_until_now() {
        let db = copy(&[("a", 1, 1_000)], None);
        let plan = choose(&db, previous(false, None), &ids(&["a"]), 4_000);
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(3_000));
    }

    #[test]
    fn the_crash_mark_ends_the_gap_where_the_process_was_last_alive_though_no_copy_was_written() {
        // The copy stopped at 10 000 (the database down); the process lived on until 3 600 000
        // and died before its next mark, 1 s later.
        let db = copy(&[("a", 5, 9_000)], Some(10_000));
        let plan = choose(
            &db,
            previous(false, Some(mark(3_600_000, None))),
            &ids(&["a"]),
            4_000_000,
        );
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(3_591_000));
    }

    #[test]
    fn an_idle_crash_mark_charges_no_gap() {
        let db = copy(&[("a", 5, 9_000)], Some(10_000));
        let plan = choose(
            &db,
            previous(false, Some(mark(60_000, Some(11_000)))),
            &ids(&["a", "new"]),
            90_000,
        );
        assert_eq!(plan.saved[&Arc::from("a")].gap, None);
        assert!(!plan.saved.contains_key(&Arc::from("new")));
    }

    #[test]
    fn a_mark_older_than_the_last_copy_is_not_trusted() {
        // An idle mark from an earlier run, then a run that could not write its own and crashed
        // after writing a copy at 500 000.
        let db = copy(&[("a", 5, 490_000)], Some(500_000));
        let plan = choose(
            &db,
            previous(false, Some(mark(60_000, Some(11_000)))),
            &ids(&["a"]),
            600_000,
        );
        assert_eq!(
            plan.saved[&Arc::from("a")].gap,
            Some(5_000),
            "charged as busy"
        );
    }

    #[test]
    fn an_account_the_copy_misses_is_charged_the_gap_since_the_last_copy() {
        let db = copy(&[("a", 5, 9_000)], Some(10_000));
        let plan = choose(
            &db,
            previous(false, Some(mark(20_000, None))),
            &ids(&["a", "new"]),
            90_000,
        );
        let new = &plan.saved[&Arc::from("new")];
        assert_eq!(new.state.copy, SavedCopy::Missing);
        assert_eq!(
            new.gap,
            Some(11_000),
            "from the heartbeat to the mark's 21 000"
        );
        // After a clean stop it simply has no state.
        let clean = choose(&db, previous(true, None), &ids(&["new"]), 90_000);
        assert!(!clean.saved.contains_key(&Arc::from("new")));
        // Without any heartbeat: since the previous process started.
        let none = choose(
            &StateCopy::default(),
            previous(false, Some(mark(20_000, None))),
            &ids(&["new"]),
            90_000,
        );
        assert_eq!(none.saved[&Arc::from("new")].gap, Some(20_000));
        // Created after the last copy: from its creation.
        let mut with_created = copy(&[("a", 5, 9_000)], Some(10_000));
        with_created.created.insert(Arc::from("new"), 15_000);
        let plan = choose(
            &with_created,
            previous(false, Some(mark(20_000, None))),
            &ids(&["new"]),
            90_000,
        );
        assert_eq!(plan.saved[&Arc::from("new")].gap, Some(6_000));
    }

    #[test]
    fn accounts_new_since_the_crash_and_a_first_start_are_charged_nothing() {
        let mut db = copy(&[("a", 5, 9_000)], Some(10_000));
        db.created.insert(Arc::from("added"), 80_000);
        let plan = choose(
            &db,
            previous(false, Some(mark(20_000, None))),
            &ids(&["a", "added"]),
            90_000,
        );
        assert!(
            !plan.saved.contains_key(&Arc::from("added")),
            "created after the death"
        );
        let first = Previous {
            ran: false,
            ..previous(false, None)
        };
        let plan = choose(&StateCopy::default(), first, &ids(&["x"]), 90_000);
        assert!(plan.saved.is_empty(), "a first start restores nothing");
        // Rows other instances wrote: a first start of this one restores them, charged nothing
        // (no process of this instance can have admitted anything unknown).
        let others = copy(&[("x", 3, 9_000)], Some(10_000));
        let plan = choose(&others, first, &ids(&["x"]), 90_000);
        assert_eq!(plan.saved[&Arc::from("x")].gap, None);
    }

    #[test]
    fn an_unreadable_row_restores_as_unknown_counters_at_its_version() {
        let mut db = copy(&[("b", 7, 9_000)], Some(10_000));
        db.unreadable.insert(Arc::from("a"), 40);
        let plan = choose(&db, previous(true, None), &ids(&["a", "b"]), 20_000);
        let a = &plan.saved[&Arc::from("a")];
        assert_eq!(
            (a.state.copy, a.state.version, a.gap),
            (SavedCopy::Unreadable, 40, None)
        );
        assert_eq!(plan.from_database, 1, "only the readable row counts");
        // After a crash it is charged the gap since the last copy, like a missing one.
        let plan = choose(
            &db,
            previous(false, Some(mark(20_000, None))),
            &ids(&["a"]),
            90_000,
        );
        assert_eq!(plan.saved[&Arc::from("a")].gap, Some(11_000));
    }
}
