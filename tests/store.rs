//! One storage suite, run on embedded SQLite and on a real Postgres (`scripts/test` starts it).

mod common;

use std::path::Path;
use std::time::Duration;

use quotagate::config::{Config, Credentials, DatabaseBackend};
use quotagate::domain::FixedReset;
use quotagate::domain::{LimitKind, LimitSpec, Strategy, Tokenizer};
use quotagate::manage::REMOVED_FROM_CONFIG;
use quotagate::manage::{self, NewAccount, NewProvider};
use quotagate::provision;
use quotagate::secrets::{MasterKey, Secret};
use quotagate::store::accounts;
use quotagate::store::audit;
use quotagate::store::keys;
use quotagate::store::limits::{self, LimitOwner};
use quotagate::store::logs::{self, NewRequestLog};
use quotagate::store::providers::{self, Source};
use quotagate::store::settings;
use quotagate::store::state::{self, AccountStateRow};
use quotagate::store::{self as qstore, Store, StoreError};

/// A migrated store and whatever keeps it alive (the SQLite temp dir).
struct TestDb {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let backend = DatabaseBackend::Sqlite(dir.path().join("q.db"));
    let (store, _) = Store::open_and_migrate(&backend, 4).unwrap();
    TestDb {
        store,
        _dir: Some(dir),
    }
}

fn postgres() -> TestDb {
    let backend = DatabaseBackend::Postgres(Secret::new(common::pg_database()));
    let (store, _) = Store::open_and_migrate(&backend, 4).unwrap();
    TestDb { store, _dir: None }
}

/// Generates one test per backend for each suite function.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::sqlite()) } )*
        }
        mod postgres {
            $(
                #[test]
                #[ignore = "needs postgres: run scripts/test"]
                fn $name() { super::$name(super::postgres()) }
            )*
        }
    };
}

on_every_backend!(
    migrations_are_recorded_and_not_applied_twice,
    providers_are_created_found_by_id_or_name_and_unique,
    deleting_a_provider_removes_its_models_and_limits,
    accounts_keep_sealed_credentials_and_are_found_by_any_reference,
    an_ambiguous_account_name_lists_the_candidates,
    disabling_an_account_leaves_an_audit_row,
    limit_sets_of_each_scope_are_replaced_independently,
    client_keys_are_stored_hashed_and_revocation_sticks,
    settings_are_created_and_overwritten,
    account_state_keeps_the_higher_version,
    request_logs_are_inserted_in_batches,
    provisioning_is_idempotent_and_keeps_usage,
    provisioning_deactivates_removed_accounts_and_leaves_api_accounts_alone,
    provisioning_reseals_a_changed_key,
);

fn sample_provider(name: &str) -> NewProvider {
    NewProvider {
        name: name.into(),
        base_url: "https://api.example.com/v1/".into(),
        strategy: Strategy::RoundRobin,
        auth_header: "Authorization".into(),
        auth_scheme: "Bearer".into(),
        timeout_ms: Some(60_000),
        max_completion_tokens: 1024,
        tokenizer: Tokenizer::Bytes,
        models: vec![("small".into(), 0.1, 0.2), ("large".into(), 1.0, 2.0)],
        limits: vec![
            spec(LimitKind::Requests, 30, Some(60)),
            spec(LimitKind::Concurrent, 4, None),
        ],
    }
}

fn spec(kind: LimitKind, limit: u64, per_secs: Option<u64>) -> LimitSpec {
    LimitSpec {
        kind,
        limit,
        per: per_secs.map(Duration::from_secs),
        reset: None,
    }
}

fn sample_account(provider: &str, name: &str, key: &str) -> NewAccount {
    NewAccount {
        provider: provider.into(),
        name: name.into(),
        credentials: Credentials {
            api_key: Secret::new(key),
            headers: Default::default(),
        },
        quota_limit: 1000,
        expires_at: None,
        active: true,
    }
}

fn migrations_are_recorded_and_not_applied_twice(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    assert!(qstore::pending_migrations(&mut conn).unwrap().is_empty());
    assert!(qstore::run_migrations(&mut conn).unwrap().is_empty());
}

fn providers_are_created_found_by_id_or_name_and_unique(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let row = manage::add_provider(&mut conn, &sample_provider("groq"), Source::Api).unwrap();
    assert_eq!(row.base_url, "https://api.example.com/v1");
    assert_eq!(providers::find(&mut conn, "groq").unwrap(), row);
    assert_eq!(providers::find(&mut conn, &row.id).unwrap(), row);
    let models = providers::list_models(&mut conn, &row.id).unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["large", "small"]);
    assert_eq!(models[1].price_output, 0.2);

    let again = manage::add_provider(&mut conn, &sample_provider("groq"), Source::Api);
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert!(matches!(
        providers::find(&mut conn, "nope"),
        Err(StoreError::NotFound(_))
    ));
}

fn deleting_a_provider_removes_its_models_and_limits(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let row = manage::add_provider(&mut conn, &sample_provider("p"), Source::Api).unwrap();
    manage::add_account(
        &mut conn,
        &MasterKey::generate(),
        &sample_account("p", "a", "sk-1234567890"),
        Source::Api,
        "test",
    )
    .unwrap();
    providers::delete(&mut conn, &row.id).unwrap();
    assert!(providers::list_all_models(&mut conn).unwrap().is_empty());
    assert!(limits::list_all(&mut conn).unwrap().is_empty());
    assert!(accounts::list(&mut conn, None).unwrap().is_empty());
}

fn accounts_keep_sealed_credentials_and_are_found_by_any_reference(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let key = MasterKey::generate();
    manage::add_provider(&mut conn, &sample_provider("groq"), Source::Api).unwrap();
    let created = manage::add_account(
        &mut conn,
        &key,
        &sample_account("groq", "groq-1", "sk-secret-value-9876"),
        Source::Api,
        "test",
    )
    .unwrap();
    let account = &created.account;
    assert_eq!(account.credentials_hint, "…9876");
    assert!(!String::from_utf8_lossy(&account.credentials).contains("sk-secret"));
    let opened = manage::open_credentials(&key, account).unwrap();
    assert_eq!(opened.api_key.expose(), "sk-secret-value-9876");

    for reference in [account.id.as_str(), "groq/groq-1", "groq-1"] {
        let found = accounts::find(&mut conn, reference).unwrap();
        assert_eq!(found.account.id, account.id, "{reference}");
        assert_eq!(found.qualified_name(), "groq/groq-1");
    }
    let dup = manage::add_account(
        &mut conn,
        &key,
        &sample_account("groq", "groq-1", "sk-other-000000"),
        Source::Api,
        "test",
    );
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
}

fn an_ambiguous_account_name_lists_the_candidates(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let key = MasterKey::generate();
    for provider in ["a", "b"] {
        manage::add_provider(&mut conn, &sample_provider(provider), Source::Api).unwrap();
        manage::add_account(
            &mut conn,
            &key,
            &sample_account(provider, "main", "sk-1234567890"),
            Source::Api,
            "test",
        )
        .unwrap();
    }
    match accounts::find(&mut conn, "main") {
        Err(StoreError::Invalid(message)) => {
            assert!(
                message.contains("a/main") && message.contains("b/main"),
                "{message}"
            )
        }
        other => panic!("expected an ambiguity error, got {other:?}"),
    }
    assert_eq!(
        accounts::find(&mut conn, "b/main").unwrap().provider_name,
        "b"
    );
}

fn disabling_an_account_leaves_an_audit_row(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    manage::add_provider(&mut conn, &sample_provider("p"), Source::Api).unwrap();
    let created = manage::add_account(
        &mut conn,
        &MasterKey::generate(),
        &sample_account("p", "a", "sk-1234567890"),
        Source::Api,
        "test",
    )
    .unwrap();
    manage::disable_account(&mut conn, "p/a", "cli", "key leaked").unwrap();
    let stored = accounts::find(&mut conn, "p/a").unwrap().account;
    assert!(!stored.active);
    assert_eq!(stored.disabled_reason.as_deref(), Some("key leaked"));
    let trail = audit::list_for_account(&mut conn, &created.account.id).unwrap();
    let actions: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r.action.as_str(), r.actor.as_str()))
        .collect();
    assert_eq!(actions, [("create", "test"), ("disable", "cli")]);
    assert_eq!(trail[1].reason, "key leaked");
}

fn limit_sets_of_each_scope_are_replaced_independently(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let provider = manage::add_provider(&mut conn, &sample_provider("p"), Source::Api).unwrap();
    let account = manage::add_account(
        &mut conn,
        &MasterKey::generate(),
        &sample_account("p", "a", "sk-1234567890"),
        Source::Api,
        "test",
    )
    .unwrap()
    .account;
    let model = providers::list_models(&mut conn, &provider.id)
        .unwrap()
        .remove(0);
    let provider_scope = LimitOwner {
        provider_id: &provider.id,
        model_id: None,
        account_id: None,
    };
    let model_scope = LimitOwner {
        model_id: Some(&model.id),
        ..provider_scope
    };
    let account_scope = LimitOwner {
        account_id: Some(&account.id),
        ..provider_scope
    };

    let fixed = LimitSpec {
        kind: LimitKind::Requests,
        limit: 14_400,
        per: Some(Duration::from_secs(86_400)),
        reset: Some(FixedReset {
            cron: "0 0 * * *".into(),
            timezone: "America/Los_Angeles".into(),
        }),
    };
    let custom = spec(LimitKind::Requests, 5, Some(2));
    limits::replace(
        &mut conn,
        model_scope,
        &[fixed.clone(), spec(LimitKind::Tokens, 12_000, Some(60))],
    )
    .unwrap();
    limits::replace(&mut conn, account_scope, std::slice::from_ref(&custom)).unwrap();
    limits::replace(
        &mut conn,
        provider_scope,
        &[spec(LimitKind::Tokens, 6000, Some(60))],
    )
    .unwrap();

    let rows = limits::list_for_provider(&mut conn, &provider.id).unwrap();
    assert_eq!(rows.len(), 4);
    let of = |model: Option<&str>, account: Option<&str>| -> Vec<LimitSpec> {
        rows.iter()
            .filter(|r| r.model_id.as_deref() == model && r.account_id.as_deref() == account)
            .map(|r| r.spec().unwrap())
            .collect()
    };
    assert_eq!(of(None, None), [spec(LimitKind::Tokens, 6000, Some(60))]);
    assert!(of(Some(&model.id), None).contains(&fixed));
    assert_eq!(of(None, Some(&account.id)), [custom]);

    limits::replace(&mut conn, model_scope, &[]).unwrap();
    assert_eq!(
        limits::list_for_provider(&mut conn, &provider.id)
            .unwrap()
            .len(),
        2
    );
}

fn client_keys_are_stored_hashed_and_revocation_sticks(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let (created, token) = manage::create_key(&mut conn, "laptop", "alice").unwrap();
    assert!(token.expose().starts_with(manage::CLIENT_KEY_PREFIX));
    assert_ne!(created.key.key_hash, token.expose());
    assert!(token.expose().starts_with(&created.key.prefix));
    assert_eq!(created.user_name, "alice");
    manage::create_key(&mut conn, "ci", "alice").unwrap();
    assert!(matches!(
        manage::create_key(&mut conn, "ci", "bob"),
        Err(StoreError::Conflict(_))
    ));

    let active = keys::list_active(&mut conn).unwrap();
    assert_eq!(active.len(), 2);
    assert!(active
        .iter()
        .any(|k| quotagate::secrets::token_matches(token.expose(), &k.key.key_hash)));

    let revoked = keys::revoke(&mut conn, "laptop").unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        keys::revoke(&mut conn, &created.key.id).unwrap().revoked_at,
        revoked.revoked_at
    );
    let names: Vec<String> = keys::list_active(&mut conn)
        .unwrap()
        .into_iter()
        .map(|k| k.key.name)
        .collect();
    assert_eq!(names, ["ci"]);
    assert_eq!(keys::list(&mut conn).unwrap().len(), 2);
}

fn settings_are_created_and_overwritten(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    assert_eq!(settings::get(&mut conn, "k").unwrap(), None);
    settings::put(&mut conn, "k", "one").unwrap();
    settings::put(&mut conn, "k", "two").unwrap();
    assert_eq!(
        settings::get(&mut conn, "k").unwrap().as_deref(),
        Some("two")
    );
    assert!(settings::delete(&mut conn, "k").unwrap());
    assert!(!settings::delete(&mut conn, "k").unwrap());
}

fn account_state_keeps_the_higher_version(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    manage::add_provider(&mut conn, &sample_provider("p"), Source::Api).unwrap();
    let account = manage::add_account(
        &mut conn,
        &MasterKey::generate(),
        &sample_account("p", "a", "sk-1234567890"),
        Source::Api,
        "test",
    )
    .unwrap()
    .account;
    let row = |version: i64, state: &str| AccountStateRow {
        account_id: account.id.clone(),
        version,
        state: state.into(),
        updated_at: qstore::now(),
    };
    assert_eq!(state::put(&mut conn, &[row(5, "v5")]).unwrap(), 1);
    assert_eq!(state::put(&mut conn, &[row(3, "v3")]).unwrap(), 0);
    assert_eq!(state::put(&mut conn, &[row(5, "again")]).unwrap(), 0);
    assert_eq!(
        state::get(&mut conn, &account.id).unwrap().unwrap().state,
        "v5"
    );
    assert_eq!(state::put(&mut conn, &[row(6, "v6")]).unwrap(), 1);
    assert_eq!(state::list(&mut conn).unwrap()[0].version, 6);
}

fn request_logs_are_inserted_in_batches(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2026-11-28T23:59:00Z")
        .unwrap()
        .naive_utc();
    let rows: Vec<NewRequestLog> = (0..2500)
        .map(|i| NewRequestLog {
            request_id: format!("req-{i}"),
            ts: start + chrono::Duration::seconds(i),
            provider_id: "p".into(),
            account_id: Some("a".into()),
            model: "m".into(),
            user_id: (i % 2 == 0).then(|| "u".to_string()),
            method: "POST".into(),
            endpoint: "/v1/chat/completions".into(),
            status_code: 200,
            latency_ms: 10,
            input_tokens: 5,
            output_tokens: 7,
            success: i % 10 != 0,
            error_type: (i % 10 == 0).then(|| "upstream_error".to_string()),
            error_message: None,
            estimated_cost: 0.001,
        })
        .collect();
    logs::insert_batch(&mut conn, &rows).unwrap();
    assert_eq!(logs::count(&mut conn).unwrap(), 2500);
    let first_minute =
        logs::list_range(&mut conn, start, start + chrono::Duration::seconds(60)).unwrap();
    assert_eq!(first_minute.len(), 60);
    assert_eq!(first_minute[0], rows[0]);
}

const DECLARED: &str = r#"
providers:
  - name: groq
    base_url: https://api.groq.com/openai/v1
    rate_limits: { rpm: 30, tpm: 6000, concurrent: 2 }
    models:
      - llama-3.1-8b-instant
      - { name: llama-3.3-70b-versatile, price: { input: 0.59, output: 0.79 }, rate_limits: { rpd: 1000 } }
    accounts:
      - { name: groq-1, api_key: "sk-groq-one-1111", quota_limit: 500000 }
      - { name: groq-2, credentials: { api_key: "sk-groq-two-2222", headers: { X-Org: "org-2" } }, quota_limit: 0, rate_limits: { rpm: 60 } }
"#;

fn providers_from(yaml: &str) -> Vec<quotagate::config::ProviderConfig> {
    Config::from_yaml(
        yaml,
        Path::new("/tmp/quotagate-test/config.yaml"),
        &Default::default(),
    )
    .unwrap()
    .providers
}

fn provisioning_is_idempotent_and_keeps_usage(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let key = MasterKey::generate();
    let declared = providers_from(DECLARED);
    let first = provision::apply(&mut conn, &key, &declared).unwrap();
    assert_eq!((first.providers_created, first.accounts_created), (1, 2));

    let mut used = accounts::find(&mut conn, "groq/groq-1").unwrap().account;
    used.quota_used = 1234;
    accounts::update(&mut conn, &used).unwrap();

    let second = provision::apply(&mut conn, &key, &declared).unwrap();
    assert_eq!(
        second,
        provision::Report::default(),
        "an unchanged file changes nothing"
    );
    let after = accounts::find(&mut conn, "groq/groq-1").unwrap().account;
    assert_eq!(after.quota_used, 1234);
    assert_eq!(
        after.credentials, used.credentials,
        "an unchanged key is not re-sealed"
    );

    let provider = providers::find(&mut conn, "groq").unwrap();
    assert_eq!(provider.source, "config");
    let rows = limits::list_for_provider(&mut conn, &provider.id).unwrap();
    assert_eq!(
        rows.len(),
        5,
        "3 provider limits, 1 model limit, 1 account override"
    );
    let two = accounts::find(&mut conn, "groq/groq-2").unwrap().account;
    let creds = manage::open_credentials(&key, &two).unwrap();
    assert_eq!(creds.headers["X-Org"].expose(), "org-2");
}

fn provisioning_deactivates_removed_accounts_and_leaves_api_accounts_alone(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let key = MasterKey::generate();
    provision::apply(&mut conn, &key, &providers_from(DECLARED)).unwrap();
    manage::add_account(
        &mut conn,
        &key,
        &sample_account("groq", "from-api", "sk-api-key-0000"),
        Source::Api,
        "admin-api",
    )
    .unwrap();

    let without_two = DECLARED
        .lines()
        .filter(|l| !l.contains("groq-2"))
        .collect::<Vec<_>>()
        .join("\n");
    let report = provision::apply(&mut conn, &key, &providers_from(&without_two)).unwrap();
    assert_eq!(report.accounts_deactivated, 1);
    let two = accounts::find(&mut conn, "groq/groq-2").unwrap().account;
    assert!(!two.active);
    assert_eq!(two.disabled_reason.as_deref(), Some(REMOVED_FROM_CONFIG));
    assert!(
        accounts::find(&mut conn, "groq/from-api")
            .unwrap()
            .account
            .active
    );

    provision::apply(&mut conn, &key, &providers_from(DECLARED)).unwrap();
    assert!(
        accounts::find(&mut conn, "groq/groq-2")
            .unwrap()
            .account
            .active,
        "back in the file: active again"
    );

    let report = provision::apply(&mut conn, &key, &providers_from("providers: []")).unwrap();
    assert_eq!(report.providers_deactivated, 1);
    assert!(!providers::find(&mut conn, "groq").unwrap().active);
    assert!(
        accounts::find(&mut conn, "groq/from-api")
            .unwrap()
            .account
            .active
    );
}

fn provisioning_reseals_a_changed_key(db: TestDb) {
    let mut conn = db.store.conn().unwrap();
    let key = MasterKey::generate();
    provision::apply(&mut conn, &key, &providers_from(DECLARED)).unwrap();
    let changed = DECLARED.replace("sk-groq-one-1111", "sk-groq-new-5555");
    let report = provision::apply(&mut conn, &key, &providers_from(&changed)).unwrap();
    assert_eq!(report.accounts_updated, 1);
    let one = accounts::find(&mut conn, "groq/groq-1").unwrap().account;
    assert_eq!(one.credentials_hint, "…5555");
    assert_eq!(
        manage::open_credentials(&key, &one)
            .unwrap()
            .api_key
            .expose(),
        "sk-groq-new-5555"
    );
}

#[test]
fn credentials_never_reach_the_sqlite_files_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("q.db");
    let (store, _) = Store::open_and_migrate(&DatabaseBackend::Sqlite(db_path.clone()), 2).unwrap();
    let canary = "sk-PLAINTEXT-CANARY-4242";
    {
        let mut conn = store.conn().unwrap();
        manage::add_provider(&mut conn, &sample_provider("p"), Source::Api).unwrap();
        manage::add_account(
            &mut conn,
            &MasterKey::generate(),
            &sample_account("p", "a", canary),
            Source::Api,
            "test",
        )
        .unwrap();
    }
    // Rows written in WAL mode sit in the -wal file until a checkpoint: read both files.
    let mut seen = 0;
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", db_path.display());
        if let Ok(bytes) = std::fs::read(&path) {
            seen += 1;
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{path} holds the key in plaintext"
            );
            assert!(
                !bytes.windows(14).any(|w| w == b"PLAINTEXT-CANA"),
                "{path} holds part of the key"
            );
        }
    }
    assert_eq!(seen, 2, "both the database and its WAL were read");
}
