//! End to end: the real binary against the simulated Opsera API over
//! loopback HTTP, with real SQLite state and a real output file.

mod common;

use common::*;
use opsera_shipper::simulator::{EndBound, Fault, SimOptions};

const ONE_STREAM: &str = "[streams.token_activity]\nenabled = false\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_both_streams_is_delivered_exactly_once_and_unchanged() {
    let h = Harness::new(opts(3_000, 700)).await;
    let cfg = h.config("[streams.user_activity]\npage_size = 700\n");
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "once failed: {}", stderr(&o));
    assert_eq!(h.lines().len(), 3_700);
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_bodies_capped_pages_and_exclusive_bounds_still_deliver_everything() {
    let h = Harness::new(SimOptions {
        pretty: true,
        page_cap: Some(150),
        end_bound: EndBound::Exclusive,
        ..opts(1_000, 100)
    })
    .await;
    // The `--config` flag also works before the subcommand.
    let cfg = h.config("");
    let o = h.run(&["--config", cfg.to_str().unwrap(), "once"]).await;
    assert!(o.status.success(), "once failed: {}", stderr(&o));
    // Multi-line records are written as one compact line with every token unchanged.
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_once_delivers_only_new_and_late_records() {
    let h = Harness::new(opts(500, 50)).await;
    let cfg = h.config("");
    let c = cfg.to_str().unwrap();
    assert!(h.run(&["once", "--config", c]).await.status.success());
    assert_eq!(h.lines().len(), 550);

    // Nothing new: nothing written.
    let before = std::fs::read(h.out()).unwrap();
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(h.out()).unwrap(), before, "a second once with no new data wrote something");

    // New records, and a late one written inside the overlap (older than the watermark).
    let wm =
        opsera_shipper::window::parse_timestamp(&watermark(&status_json(&h, &cfg).await, "user_activity").unwrap())
            .unwrap();
    let now = h.sim.now();
    let fresh = h.sim.add_user_at(20, now - 3 * MINUTE);
    let late = h.sim.add_user_at(1, wm - 2 * MINUTE);
    let tokens = h.sim.add_token_at(5, now - 3 * MINUTE);
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = h.lines();
    let added: Vec<String> = lines[550..].iter().map(|l| id_of(l)).collect();
    assert_eq!(added.len(), 26, "expected exactly the new records");
    for id in fresh.iter().chain(&late).chain(&tokens) {
        assert!(added.contains(id), "new record {id} not delivered");
    }
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arriving_while_paging_are_neither_lost_nor_duplicated() {
    // The server's clock is 3 minutes behind ours, so records it creates
    // "now" fall inside our window and push older records onto later pages.
    let h = Harness::new(SimOptions { skew_ms: -3 * MINUTE, ..opts(1_200, 0) }).await;
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\npage_size = 100\n"));
    let c = cfg.to_str().unwrap();
    h.sim.set_insert_while_paging(3, 0);
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.sim.set_insert_while_paging(0, 0);
    // Also late arrivals inside the window, older than the newest record.
    h.sim.set_insert_while_paging(2, 2 * MINUTE);
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.sim.set_insert_while_paging(0, 0);
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(h.sim.user_records().len() > 1_200 + 3 * 12);
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_are_retried() {
    let h = Harness::new(opts(800, 100)).await;
    h.sim.push_fault(Fault::Status { code: 429, retry_after: Some(1) });
    h.sim.push_fault(Fault::Status { code: 500, retry_after: None });
    h.sim.push_fault(Fault::Status { code: 503, retry_after: None });
    h.sim.push_fault(Fault::Status { code: 429, retry_after: Some(1) });
    let cfg = h.config("[streams.user_activity]\npage_size = 200\n");
    let before = h.sim.requests();
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("retrying"), "retries are logged");
    assert!(h.sim.requests() - before > 4 + 4, "the failed requests were retried");
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_page_is_rejected_whole_and_the_watermark_stays() {
    for fault in [Fault::MissingId, Fault::BadCreatedAt, Fault::Garbage] {
        let h = Harness::new(opts(300, 0)).await;
        let cfg = h.config(ONE_STREAM);
        let c = cfg.to_str().unwrap();
        assert!(h.run(&["once", "--config", c]).await.status.success());
        let wm_before = watermark(&status_json(&h, &cfg).await, "user_activity");
        let lines_before = h.lines().len();

        h.sim.add_user_at(10, h.sim.now() - 3 * MINUTE);
        h.sim.push_fault(fault.clone());
        let o = h.run(&["once", "--config", c]).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(75), "{fault:?}: {err}");
        assert!(err.contains("/api/v2/logs/audit/user?"), "{fault:?}: the error names the URL: {err}");
        assert!(err.contains("bad response"), "{fault:?}: {err}");
        assert_eq!(h.lines().len(), lines_before, "{fault:?}: nothing of a bad page is stored or delivered");
        let st = status_json(&h, &cfg).await;
        assert_eq!(watermark(&st, "user_activity"), wm_before, "{fault:?}: watermark moved");
        let stream = st["streams"].as_array().unwrap().iter().find(|s| s["name"] == "user_activity").unwrap().clone();
        assert!(
            stream["last_error"].as_str().unwrap_or("").contains("bad response"),
            "{fault:?}: status shows the error"
        );

        // The next run picks up everything.
        let o = h.run(&["once", "--config", c]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        h.assert_exactly_once();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_that_cannot_deliver_exits_75_and_loses_nothing() {
    let h = Harness::new(opts(200, 20)).await;
    // /dev/full accepts the open and fails every write with ENOSPC.
    let cfg = h.config_with("[sinks.archive]\ntype = \"file\"\npath = \"/dev/full\"\n");
    let o = h.run(&["once", "--timeout", "2s", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("stay in the journal"), "{}", stderr(&o));
    // The same sink, now writable: everything arrives, once.
    let cfg = h.config("");
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_journal_bound_makes_pollers_wait_not_fail() {
    let h = Harness::new(opts(1_500, 0)).await;
    let cfg = h.config_with(&format!(
        "max_buffered_records = 50\n{ONE_STREAM}[streams.user_activity]\npage_size = 100\n[sinks.archive]\ntype = \"file\"\npath = {:?}\n",
        h.out().display().to_string()
    ));
    // max_buffered_records belongs to [state]: config_with puts `rest` right after it.
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("Journal is full"), "backpressure engaged: {}", stderr(&o));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_day_at_the_cap_is_reported_loudly() {
    let h = Harness::new(opts(0, 0)).await;
    let now = h.sim.now();
    // 1,200 records within one UTC day that is certainly complete: yesterday's noon.
    let noon = opsera_shipper::window::floor_to(now, 86_400_000) - 12 * 3_600_000;
    h.sim.add_user_at(1_200, noon);
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\napi = \"v1\"\n"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("TRUNCATED"), "{}", stderr(&o));
    assert_eq!(h.lines().len(), 1_000);
    let st = status_json(&h, &cfg).await;
    let s = st["streams"].as_array().unwrap().iter().find(|s| s["name"] == "user_activity").unwrap().clone();
    assert!(s["truncated_days"].as_i64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_exits_77_with_a_clear_message() {
    let h = Harness::new(opts(10, 0)).await;
    let cfg = h.config("");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(h.sim.token(), "wrong-token");
    std::fs::write(&cfg, text).unwrap();
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(77), "{}", stderr(&o));
    assert!(stderr(&o).contains("Security Logs (Read Only)"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_never_appears_in_output_even_at_trace() {
    let h = Harness::new(SimOptions { token: "s3cr3t-T0KEN-value-4242".into(), ..opts(300, 30) }).await;
    h.sim.push_fault(Fault::Status { code: 500, retry_after: None });
    let cfg = h.config("[sinks.console]\ntype = \"stdout\"\n");
    let o = run_bin(&["once", "--config", cfg.to_str().unwrap()], &[("RUST_LOG", "trace")]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(all.len() > 10_000, "trace logging produced output");
    assert!(!all.contains("s3cr3t-T0KEN-value-4242"), "the token leaked");
    // The stdout sink got the records; the file sink too.
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("{\"_id\"")).count(), 330);
    let o = run_bin(&["check-config", "--config", cfg.to_str().unwrap()], &[("RUST_LOG", "trace")]).await;
    assert!(o.status.success());
    assert!(!format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o)).contains("s3cr3t-T0KEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_resumes_from_its_checkpoint() {
    let h = Harness::new(opts(2_000, 200)).await;
    let cfg = h.config(
        "[streams.user_activity]\ninterval = \"1s\"\npage_size = 250\n[streams.token_activity]\ninterval = \"1s\"\n",
    );
    let c = cfg.to_str().unwrap().to_string();
    let mut child = spawn_daemon(std::path::Path::new(&c), &[], None);
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 2_200).await;
    child.kill().await.unwrap(); // SIGKILL
    let fresh = h.sim.add_user_at(30, h.sim.now() - 3 * MINUTE);
    let mut child = spawn_daemon(std::path::Path::new(&c), &[], None);
    wait_until("new records are delivered after the restart", || {
        let ids: Vec<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        fresh.iter().all(|f| ids.contains(f))
    })
    .await;
    // SIGTERM: a clean stop with exit 0.
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_redelivers_a_stream_from_the_given_time() {
    let h = Harness::new(opts(100, 40)).await;
    let cfg = h.config("");
    let c = cfg.to_str().unwrap();
    assert!(h.run(&["once", "--config", c]).await.status.success());
    let o = h.run(&["reset", "--stream", "token_activity", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(h.run(&["once", "--config", c]).await.status.success());
    // Token records twice (reset asked for it), user records once.
    assert_eq!(h.lines().len(), 100 + 40 * 2);
    let o = h.run(&["reset", "--stream", "nope", "--config", c]).await;
    assert_eq!(o.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_real_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let o = run_bin(&["demo", "--duration", "3s", "--dir", d.to_str().unwrap()], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = read_lines(&d.join("audit.jsonl"));
    assert!(lines.len() >= 2_900, "the demo's backlog was shipped: {}", lines.len());
    let ids: std::collections::HashSet<String> = lines.iter().map(|l| id_of(l)).collect();
    assert_eq!(ids.len(), lines.len(), "the demo shipped a record twice");
    assert!(d.join("state.db").exists());
}

/// A tenant's own API over HTTPS with a private CA (the simulated API behind
/// a TLS-terminating proxy): without `api.ca_file`
/// the certificate is refused, with the URL and the reason, and nothing
/// moves; with it, everything arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_over_https_with_a_private_ca_is_read_with_api_ca_file() {
    let h = Harness::new(opts(300, 20)).await;
    let (server, _) = common::tls::make_certs(h.dir.path(), "api");
    let plain = h.sim.base_url();
    let proxy = common::tls::tls_proxy(plain.trim_start_matches("http://").parse().unwrap(), &server).await;
    let url = format!("https://{proxy}");
    let cfg = h.config("");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("base_url = {plain:?}"), &format!("base_url = {url:?}"))
        .replace("[api]\n", "[api]\nmax_retries = 0\n");
    assert!(text.contains(&url), "{text}");
    std::fs::write(&cfg, &text).unwrap();
    let c = cfg.to_str().unwrap();
    let o = h.run(&["once", "--config", c]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains(&url) && err.to_lowercase().contains("certificate"), "{err}");
    assert!(h.lines().is_empty());
    let with_ca = text.replace("[api]\n", &format!("[api]\nca_file = {:?}\n", server.ca.display().to_string()));
    std::fs::write(&cfg, with_ca).unwrap();
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
}
