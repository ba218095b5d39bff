//! The benchmark's bare forwarder (`scripts/bench-http`): an actix-web server whose one handler
//! forwards the request body to an upstream with the gateway's own upstream client and returns
//! the answer — no authentication, no quota, no logging. The gap between it and the gateway is
//! what the quota work costs; the gap between it and an nginx proxy is what the stack costs.
//!
//!     cargo run --release --example bare_forwarder -- LISTEN_ADDR UPSTREAM_URL [WORKERS]
//!
//! Every POST to any path is sent to `UPSTREAM_URL` (a full URL). Runs until killed.

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use quotagate::http::upstream::{self, UpstreamSettings};

async fn forward(
    body: Bytes,
    client: web::Data<awc::Client>,
    target: web::Data<String>,
) -> HttpResponse {
    let sent = client
        .post(target.as_str())
        .insert_header(("content-type", "application/json"))
        .send_body(body)
        .await;
    let mut answer = match sent {
        Ok(answer) => answer,
        Err(e) => return HttpResponse::BadGateway().body(e.to_string()),
    };
    match answer.body().limit(MAX_ANSWER_BYTES).await {
        Ok(bytes) => HttpResponse::build(answer.status())
            .content_type("application/json")
            .body(bytes),
        Err(e) => HttpResponse::BadGateway().body(e.to_string()),
    }
}

/// As the gateway's limit on a non-streamed answer.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(target)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_forwarder LISTEN_ADDR UPSTREAM_URL [WORKERS]");
        std::process::exit(2);
    };
    let workers = args
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let settings = UpstreamSettings {
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(30),
        stream_idle_timeout: Duration::from_secs(30),
        retries: 0,
        max_cooldown: Duration::from_secs(3600),
        forbidden_cooldown: Duration::from_secs(600),
    };
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(upstream::client(&settings)))
                .app_data(web::Data::new(target.clone()))
                .default_service(web::post().to(forward))
        })
        .workers(workers)
        .bind(&listen)?;
        println!("listening on {listen}");
        server.run().await
    })
}
