//! The status page's HTML, rendered on the server from a [`Snapshot`]: the whole page, the
//! fragment its script swaps in on every live update, and the login form.
//!
//! Everything that comes from data is escaped ([`esc`]). Bars and charts are inline SVG drawn with
//! attributes, never `style=""`, so the page runs under a strict Content-Security-Policy (no
//! inline styles or scripts at all).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::status::compose::{clock_time, relative};
use crate::status::{thousands, AccountState, AccountView, ProviderView, Snapshot, WindowFigures};

/// Where the embedded assets are served, with a version so browsers may cache them for good.
#[derive(Debug, Clone)]
pub struct AssetLinks {
    pub css: String,
    pub js: String,
}

/// How often the page asks for a new fragment.
pub const LIVE_INTERVAL_MS: u64 = 2000;

/// HTML-escapes text for an element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn head(title: &str, assets: &AssetLinks, script: bool) -> String {
    let script = if script {
        format!("<script src=\"{}\" defer></script>\n", esc(&assets.js))
    } else {
        String::new()
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"color-scheme\" content=\"light dark\">\n\
         <meta name=\"referrer\" content=\"same-origin\">\n\
         <title>{}</title>\n<link rel=\"icon\" href=\"data:,\">\n\
         <link rel=\"stylesheet\" href=\"{}\">\n{script}</head>\n",
        esc(title),
        esc(&assets.css)
    )
}

/// The login form; `problem` says why the last attempt failed. Shows no data at all.
pub fn login(assets: &AssetLinks, problem: Option<&str>) -> String {
    let mut html = head("quotagate — log in", assets, false);
    html.push_str(
        "<body class=\"login\">\n<main>\n<h1>quotagate</h1>\n\
         <p>Enter the admin token to see the pools.</p>\n\
         <form method=\"post\" action=\"/login\">\n\
         <label for=\"token\">Admin token</label>\n\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required autofocus>\n<button type=\"submit\">Log in</button>\n</form>\n",
    );
    if let Some(problem) = problem {
        let _ = writeln!(
            html,
            "<p class=\"problem\" role=\"alert\">{}</p>",
            esc(problem)
        );
    }
    html.push_str("</main>\n</body>\n</html>\n");
    html
}

/// The whole page: header, the live fragment, and the script that keeps it fresh.
pub fn page(snapshot: &Snapshot, assets: &AssetLinks, session: bool) -> String {
    let mut html = head("quotagate — status", assets, true);
    html.push_str("<body>\n<header>\n<h1>quotagate</h1>\n");
    html.push_str("<span id=\"live\" class=\"live\" aria-live=\"polite\">live</span>\n");
    if session {
        html.push_str(
            "<form method=\"post\" action=\"/logout\"><button type=\"submit\">Log out</button></form>\n",
        );
    }
    html.push_str("</header>\n");
    let _ = writeln!(
        html,
        "<main id=\"pools\" data-live=\"/status/live\" data-interval=\"{LIVE_INTERVAL_MS}\">"
    );
    html.push_str(&fragment(snapshot));
    html.push_str(
        "</main>\n<noscript><p class=\"note\">Live updates need JavaScript: reload to refresh.</p></noscript>\n\
         </body>\n</html>\n",
    );
    html
}

/// What the live update replaces: every pool, as of the snapshot.
pub fn fragment(s: &Snapshot) -> String {
    let now = s.generated_at;
    let mut html = String::with_capacity(4096);
    let _ = writeln!(
        html,
        "<p class=\"updated\">Updated <time id=\"updated\" datetime=\"{}\">{}</time> · rates over the last {} min</p>",
        now.to_rfc3339(),
        now.format("%H:%M:%S UTC"),
        s.rate_span_minutes
    );
    if s.providers.is_empty() {
        html.push_str(
            "<p class=\"note\">No providers yet: add one in <code>config.yaml</code> or with \
             <code>POST /api/v1/admin/providers</code>.</p>\n",
        );
    }
    for p in &s.providers {
        provider(&mut html, p, now);
    }
    html
}

fn when(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "<time datetime=\"{}\">{}</time> ({})",
        at.to_rfc3339(),
        clock_time(at, now),
        relative(at, now)
    )
}

fn provider(html: &mut String, p: &ProviderView, now: DateTime<Utc>) {
    let _ = writeln!(
        html,
        "<section class=\"pool\" data-provider=\"{}\" data-provider-id=\"{}\">",
        esc(&p.provider),
        esc(&p.provider_id)
    );
    let _ = write!(
        html,
        "<div class=\"pool-head\">\n<h2>{}</h2> <span class=\"tag\">{}</span>",
        esc(&p.provider),
        esc(&p.strategy)
    );
    if !p.active {
        html.push_str(" <span class=\"tag off\">not routed</span>");
    }
    let forecast = match p.forecast.quota_exhausts_at {
        Some(at) => when(at, now),
        None => "not before a reset".to_string(),
    };
    let _ = writeln!(
        html,
        "\n<dl class=\"figures\">\
         <div><dt>available</dt><dd data-field=\"available\">{} / {}</dd></div>\
         <div><dt>requests/min</dt><dd data-field=\"rpm\">{}</dd></div>\
         <div><dt>errors/min</dt><dd data-field=\"epm\"{}>{}</dd></div>\
         <div><dt>pool quota runs out</dt><dd data-field=\"forecast\">{}</dd></div></dl>",
        p.available_accounts,
        p.total_accounts,
        thousands(p.requests_per_minute),
        if p.errors_per_minute > 0 {
            " class=\"bad\""
        } else {
            ""
        },
        thousands(p.errors_per_minute),
        forecast
    );
    chart(html, &p.requests_history, &p.errors_history);
    html.push_str("</div>\n");
    if p.accounts.is_empty() {
        html.push_str("<p class=\"note\">No accounts.</p>\n</section>\n");
        return;
    }
    html.push_str(
        "<table class=\"accounts\">\n<thead><tr><th>account</th><th>state</th><th>quota</th>\
         <th>rate windows</th><th>in flight</th><th>last error</th></tr></thead>\n<tbody>\n",
    );
    for a in &p.accounts {
        account(html, a, now);
    }
    html.push_str("</tbody>\n</table>\n</section>\n");
}

/// A small bar chart of requests per minute over the last hour (errors in their own colour).
fn chart(html: &mut String, requests: &[u64], errors: &[u64]) {
    let max = requests.iter().copied().max().unwrap_or(0).max(1);
    let total: u64 = requests.iter().sum();
    let (w, h) = (requests.len().max(1) * 4, 40);
    let _ = write!(
        html,
        "<figure class=\"chart\"><svg viewBox=\"0 0 {w} {h}\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"requests per minute over the last hour: {total} in all, at most {max} a minute\">"
    );
    let _ = write!(
        html,
        "<rect class=\"axis\" x=\"0\" y=\"{}\" width=\"{w}\" height=\"1\"/>",
        h - 1
    );
    for (i, (&r, &e)) in requests.iter().zip(errors).enumerate() {
        if r == 0 {
            continue;
        }
        let bar = (r as f64 / max as f64 * (h - 1) as f64).max(1.0);
        let err = (e.min(r) as f64 / max as f64 * (h - 1) as f64).min(bar);
        let x = i * 4;
        let _ = write!(
            html,
            "<rect class=\"req\" x=\"{x}\" y=\"{:.1}\" width=\"3\" height=\"{:.1}\"/>",
            (h - 1) as f64 - bar,
            bar - err
        );
        if err > 0.0 {
            let _ = write!(
                html,
                "<rect class=\"err\" x=\"{x}\" y=\"{:.1}\" width=\"3\" height=\"{err:.1}\"/>",
                (h - 1) as f64 - err
            );
        }
    }
    html.push_str(
        "</svg><figcaption>requests per minute, last hour <span class=\"key-err\">errors</span></figcaption></figure>\n",
    );
}

/// A horizontal bar of `percent` (0–100), coloured by how full it is.
fn bar(html: &mut String, percent: f64) {
    let p = if percent.is_finite() {
        percent.clamp(0.0, 100.0)
    } else {
        0.0
    };
    let level = if p >= 95.0 {
        "full"
    } else if p >= 80.0 {
        "high"
    } else {
        "ok"
    };
    let _ = write!(
        html,
        "<svg class=\"bar\" viewBox=\"0 0 100 6\" preserveAspectRatio=\"none\" aria-hidden=\"true\">\
         <rect class=\"track\" width=\"100\" height=\"6\"/><rect class=\"fill {level}\" width=\"{p:.1}\" height=\"6\"/></svg>"
    );
}

fn account(html: &mut String, a: &AccountView, now: DateTime<Utc>) {
    let _ = writeln!(
        html,
        "<tr class=\"account state-{state}\" data-account=\"{name}\" data-account-id=\"{id}\" data-state=\"{state}\" \
         data-quota-used=\"{used}\" data-quota-limit=\"{limit}\">",
        state = a.state.as_str(),
        name = esc(&a.account),
        id = esc(&a.account_id),
        used = a.quota.used,
        limit = a.quota.limit,
    );
    let _ = writeln!(
        html,
        "<td data-label=\"account\"><strong>{}</strong></td>",
        esc(&a.account)
    );

    // State, with until when and why.
    let _ = write!(
        html,
        "<td data-label=\"state\"><span class=\"state\">{}</span>",
        a.state.label()
    );
    if let Some(hold) = &a.cooldown {
        let _ = write!(
            html,
            "<small>until {} — {}</small>",
            when(hold.until, now),
            esc(&hold.why)
        );
    }
    if let Some(until) = a.circuit_open_until {
        let _ = write!(
            html,
            "<small>circuit open until {}</small>",
            when(until, now)
        );
    }
    if matches!(a.state, AccountState::Disabled | AccountState::Expired) {
        if let Some(reason) = &a.reason {
            let _ = write!(html, "<small>{}</small>", esc(reason));
        }
    }
    html.push_str("</td>\n");

    // Quota.
    html.push_str("<td data-label=\"quota\" class=\"quota\">");
    if a.quota.limit == 0 {
        let _ = write!(
            html,
            "<span class=\"num\" data-field=\"quota\">{} tokens</span> <small>no limit</small>",
            thousands(a.quota.used)
        );
    } else {
        bar(html, a.quota.usage_percent);
        let _ = write!(
            html,
            "<span class=\"num\" data-field=\"quota\">{} / {} tokens · {:.1} %</span>",
            thousands(a.quota.used),
            thousands(a.quota.limit),
            a.quota.usage_percent
        );
        let _ = write!(
            html,
            "<small>resets {}</small>",
            when(a.quota.reset_at, now)
        );
        if let Some(at) = a.quota.exhausts_at {
            let _ = write!(
                html,
                "<small class=\"warn\">runs out {}</small>",
                when(at, now)
            );
        }
    }
    let _ = writeln!(
        html,
        "<small>{:.1} req/min · {} tokens/min</small></td>",
        a.requests_per_minute,
        thousands(a.tokens_per_minute.round() as u64)
    );

    // Rate windows.
    html.push_str("<td data-label=\"rate windows\" class=\"windows\">");
    if a.windows.is_empty() {
        html.push_str("<small>none</small>");
    }
    for w in &a.windows {
        window(html, w, now);
    }
    html.push_str("</td>\n");

    let _ = writeln!(
        html,
        "<td data-label=\"in flight\" class=\"num\" data-field=\"in-flight\">{}</td>",
        a.in_flight
    );

    html.push_str("<td data-label=\"last error\" class=\"error\">");
    match &a.last_error {
        None => html.push_str("<small>none</small>"),
        Some(e) => {
            let mut message: String = e.message.chars().take(160).collect();
            if e.message.chars().count() > 160 {
                message.push('…');
            }
            let status = e.status.map(|s| format!("{s} ")).unwrap_or_default();
            let _ = write!(
                html,
                "<small>{}</small> {}{}",
                when(e.at, now),
                status,
                esc(&message)
            );
        }
    }
    html.push_str("</td>\n</tr>\n");
}

fn window(html: &mut String, w: &WindowFigures, now: DateTime<Utc>) {
    let _ = write!(
        html,
        "<div class=\"window\" data-window=\"{}\"><span class=\"name\">{}</span>",
        esc(&w.limit_type),
        esc(&w.limit_type)
    );
    let _ = write!(
        html,
        "<span class=\"num\">{} / {}</span>",
        thousands(w.current),
        thousands(w.limit)
    );
    bar(html, w.usage_percent);
    if w.retry_after > 0.0 {
        let _ = write!(html, "<small>full, frees in {:.1} s</small>", w.retry_after);
    }
    if let Some(at) = w.exhausts_at {
        let _ = write!(
            html,
            "<small class=\"warn\">runs out {}</small>",
            when(at, now)
        );
    }
    html.push_str("</div>");
}

#[cfg(test)]
mod tests;
