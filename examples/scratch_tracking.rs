// TEMPORARY profiling scratch (not to be committed).
use quotagate::config::DatabaseBackend;
use quotagate::secrets::Secret;
use quotagate::store::logs::{self, NewRequestLog};
use quotagate::store::{stats, Store};
use std::time::Instant;

fn row(i: usize, ts: chrono::NaiveDateTime) -> NewRequestLog {
    NewRequestLog {
        request_id: format!("bench-{i}"),
        ts,
        provider_id: format!("provider-{}", i % 3),
        account_id: Some(format!("account-{}", i % 30)),
        model: format!("model-{}", i % 7),
        user_id: Some(format!("user-{}", i % 100)),
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        status_code: 200,
        latency_ms: 120,
        input_tokens: 200,
        output_tokens: 50,
        success: true,
        error_type: None,
        error_message: None,
        estimated_cost: 0.0002,
    }
}

fn main() {
    let url = std::env::args().nth(1).unwrap();
    let backend = if url.starts_with("postgres") {
        DatabaseBackend::Postgres(Secret::new(url))
    } else {
        DatabaseBackend::Sqlite(url.into())
    };
    let (store, _) = Store::open_and_migrate(&backend, 4).unwrap();
    let now = quotagate::store::now();
    let mut conn = store.conn().unwrap();
    let batches = 40;
    let rows: Vec<Vec<NewRequestLog>> = (0..batches)
        .map(|b| (0..500).map(|i| row(b * 500 + i, now)).collect())
        .collect();
    let t = Instant::now();
    for b in &rows[..batches / 2] {
        logs::insert_batch(&mut conn, b).unwrap();
    }
    println!(
        "insert_batch: {:.2} ms/batch",
        t.elapsed().as_secs_f64() * 1000.0 / (batches / 2) as f64
    );
    let t = Instant::now();
    for b in &rows[batches / 2..] {
        stats::record_batch(&mut conn, b).unwrap();
    }
    println!(
        "record_batch: {:.2} ms/batch",
        t.elapsed().as_secs_f64() * 1000.0 / (batches / 2) as f64
    );
    let t = Instant::now();
    for _ in 0..20 {
        let _ = store.conn().unwrap();
    }
    println!(
        "checkout: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
}
