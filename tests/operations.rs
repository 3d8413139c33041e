//! Running it in production: ops endpoints, the health probe, systemd
//! notifications, SIGHUP after logrotate, token rotation, SIGTERM.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use opsera_shipper::simulator::SimOptions;

fn spawn_run(cfg: &Path, env: &[(&str, &str)]) -> tokio::process::Child {
    spawn_daemon(cfg, env, None)
}

/// A first backfill that keeps storing pages is ready long before its poll completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_first_backfill_is_ready_while_it_stores_pages() {
    use opsera_shipper::simulator::Fault;
    let h = Harness::new(opts(3_000, 0)).await;
    for _ in 0..40 {
        h.sim.push_fault(Fault::Delay(Duration::from_millis(300)));
    }
    let port = free_port();
    let cfg = h.config(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[streams.user_activity]\ninterval = \"1s\"\npage_size = 100\n\
         [streams.token_activity]\nenabled = false\n"
    ));
    let daemon = spawn_run(&cfg, &[]);
    let url = format!("http://127.0.0.1:{port}/readyz");
    let mut seen = None;
    while h.sim.requests() < 25 {
        let (code, body) = http_get(&url).await;
        if code == 200 {
            seen = Some(h.sim.requests());
            break;
        }
        assert!(body.contains("first poll not completed") || body.is_empty(), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = seen.expect("/readyz stayed 503 through the first 25 pages of the backfill");
    assert!(h.lines_so_far().len() < 3_000, "the backfill had finished (ready after {at} requests)");
    wait_until("the backfill is delivered", || h.lines_so_far().len() >= 3_000).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_report_health_readiness_and_metrics() {
    let h = Harness::new(opts(500, 50)).await;
    let port = free_port();
    let cfg =
        h.config(&format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[streams.user_activity]\ninterval = \"1s\"\n"));
    let daemon = spawn_run(&cfg, &[]);
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the file sink delivered", || h.lines_so_far().len() >= 550).await;
    let mut ready = (0, String::new());
    for _ in 0..100 {
        ready = http_get(&format!("{base}/readyz")).await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    let (code, text) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    assert!(text.ends_with("# EOF\n"), "OpenMetrics exposition");
    for family in [
        "opsera_shipper_records_fetched_total",
        "opsera_shipper_records_duplicate_total",
        "opsera_shipper_records_stored_total",
        "opsera_shipper_records_delivered_total",
        "opsera_shipper_journal_records",
        "opsera_shipper_sink_lag_records",
        "opsera_shipper_sink_lag_seconds",
        "opsera_shipper_watermark_age_seconds",
        "opsera_shipper_api_requests_total",
        "opsera_shipper_api_request_duration_seconds",
        "opsera_shipper_poll_duration_seconds",
        "opsera_shipper_process_start_time_seconds",
        "opsera_shipper_build_info",
    ] {
        assert!(text.contains(family), "/metrics lacks {family}");
    }
    assert_eq!(sample(&text, "opsera_shipper_records_delivered_total{sink=\"archive\"}"), Some(550.0), "{text}");
    assert_eq!(sample(&text, "opsera_shipper_records_stored_total{stream=\"user_activity\"}"), Some(500.0));
    assert_eq!(sample(&text, "opsera_shipper_records_stored_total{stream=\"token_activity\"}"), Some(50.0));
    assert!(!text.contains(h.sim.token()), "no secret in metrics");
    // Every metric the Grafana dashboard queries is exported.
    let dash =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/grafana/opsera-shipper.json")).unwrap();
    let mut queried = 0;
    for (i, _) in dash.match_indices("opsera_shipper_") {
        let name: String = dash[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let name = name.strip_suffix("_bucket").unwrap_or(&name);
        // A family with no samples yet still has its TYPE line (counters without `_total`).
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.contains(&format!("\n{name}")) || text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which /metrics does not export"
        );
        queried += 1;
    }
    assert!(queried >= 10);
    // The probe command agrees, from the config or a URL.
    let o = h.run(&["health", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(h.run(&["health", "--url", &base]).await.status.code(), Some(0));
    signal(&daemon, libc::SIGTERM);
    assert_eq!(exit_code(daemon).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_token_rejected() {
    let h = Harness::new(opts(10, 0)).await;
    let port = free_port();
    let cfg = h.config(&format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(h.sim.token(), "revoked-token");
    std::fs::write(&cfg, text).unwrap();
    let daemon = spawn_run(&cfg, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let mut r = (0, String::new());
    for _ in 0..100 {
        r = http_get(&format!("{base}/readyz")).await;
        if r.1.contains("token rejected") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(r.0, 503);
    assert!(r.1.contains("token rejected"), "{}", r.1);
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200, "alive, though not ready");
    assert_eq!(h.run(&["health", "--url", &base]).await.status.code(), Some(1));
    signal(&daemon, libc::SIGTERM);
    assert_eq!(exit_code(daemon).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_arrive_on_notify_socket() {
    let h = Harness::new(opts(50, 0)).await;
    let sock_path = h.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let cfg = h.config("");
    let daemon = spawn_run(&cfg, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "1000000")]);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut stopped = false;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let has = |m: &str| got.iter().any(|g| g.contains(m));
        if has("READY=1") && has("WATCHDOG=1") && !stopped {
            signal(&daemon, libc::SIGTERM);
            stopped = true;
        }
        if has("STOPPING=1") {
            break;
        }
    }
    for m in ["READY=1", "WATCHDOG=1", "STOPPING=1"] {
        assert!(got.iter().any(|g| g.contains(m)), "{m} not received: {got:?}");
    }
    assert_eq!(exit_code(daemon).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_after_rotation_writes_a_new_file_and_loses_nothing() {
    let h = Harness::new(opts(300, 0)).await;
    let cfg = h.config("[streams.user_activity]\ninterval = \"1s\"\n[streams.token_activity]\nenabled = false\n");
    let daemon = spawn_run(&cfg, &[]);
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 300).await;
    let rotated = h.path("out/audit.jsonl.1");
    std::fs::rename(h.out(), &rotated).unwrap(); // logrotate's move, then `create` + SIGHUP
    signal(&daemon, libc::SIGHUP);
    let fresh = h.sim.add_user_at(40, h.sim.now() - 3 * MINUTE);
    wait_until("new records land in a new file at the configured path", || {
        let ids: Vec<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        fresh.iter().all(|f| ids.contains(f))
    })
    .await;
    signal(&daemon, libc::SIGTERM);
    assert_eq!(exit_code(daemon).await, Some(0));
    let mut all = read_lines(&rotated);
    assert_eq!(all.len(), 300, "the rotated file kept the old records, and only those");
    all.extend(h.lines());
    assert_exactly_once(&all, &h.served());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_picked_up_without_restart() {
    let h = Harness::new(opts(100, 0)).await;
    let tf = h.path("token");
    std::fs::write(&tf, format!("{}\n", h.sim.token())).unwrap();
    let cfg = h.config("[streams.user_activity]\ninterval = \"1s\"\n[streams.token_activity]\nenabled = false\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("token = {:?}", h.sim.token()), &format!("token_file = {:?}", tf.display().to_string()));
    std::fs::write(&cfg, text).unwrap();
    let daemon = spawn_run(&cfg, &[]);
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 100).await;
    // Rotate: the API now accepts only the new token, and the file holds it.
    h.sim.set_token("rotated-token-2");
    std::fs::write(&tf, "rotated-token-2\n").unwrap();
    let fresh = h.sim.add_user_at(20, h.sim.now() - 3 * MINUTE);
    wait_until("records fetched with the rotated token", || {
        let ids: Vec<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        fresh.iter().all(|f| ids.contains(f))
    })
    .await;
    signal(&daemon, libc::SIGTERM);
    assert_eq!(exit_code(daemon).await, Some(0));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_busy_backfill_exits_0_and_a_restart_neither_loses_nor_repeats() {
    let h = Harness::new(SimOptions { latency: Duration::from_millis(20), ..opts(8_000, 0) }).await;
    let cfg = h.config("[streams.user_activity]\npage_size = 200\n[streams.token_activity]\nenabled = false\n");
    let daemon = spawn_run(&cfg, &[]);
    wait_until("the backfill is under way", || h.lines_so_far().len() >= 400).await;
    signal(&daemon, libc::SIGTERM);
    assert_eq!(exit_code(daemon).await, Some(0));
    assert!(h.lines().len() < 8_000, "stopped mid-backfill");
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_a_restart_neither_loses_nor_repeats() {
    let h = Harness::new(opts(3_000, 0)).await;
    let cfg = h.config(
        "[streams.user_activity]\ninterval = \"1s\"\n[streams.token_activity]\nenabled = false\n\
         [runtime]\nshutdown_timeout = \"120s\"\n",
    );
    // Each delivered batch is held uncommitted for a minute, so the first
    // SIGTERM has a batch in flight to wait for.
    let mut daemon = spawn_run(&cfg, &[("OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS", "60000")]);
    wait_until("a batch is written", || !h.lines_so_far().is_empty()).await;
    signal(&daemon, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(daemon.try_wait().unwrap().is_none(), "the first SIGTERM waits for the batch in flight");
    signal(&daemon, libc::SIGTERM);
    let code = tokio::time::timeout(Duration::from_secs(10), daemon.wait()).await;
    let code = code.expect("a second SIGTERM exits at once").unwrap().code();
    assert_eq!(code, Some(0));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
}

/// A journal segment cut short while its records wait for a sink: the
/// daemon refuses to start and names the way out; `repair --dry-run`
/// reports the damage and changes nothing; `repair` drops exactly the pages
/// that cannot be read back and says how to fetch them again; the rest is
/// delivered once, and the `reset` it suggests brings back the lost ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_drops_the_pages_of_a_damaged_segment_and_says_how_to_fetch_them_again() {
    let h = Harness::new(opts(300, 0)).await;
    let streams = "[streams.token_activity]\nenabled = false\n[streams.user_activity]\npage_size = 100\n";
    let full = h.config_with(&format!("{streams}[sinks.archive]\ntype = \"file\"\npath = \"/dev/full\"\n"));
    let full = full.to_str().unwrap().to_string();
    let o = h.run(&["once", "--timeout", "2s", "--config", &full]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));

    let segs: Vec<_> = std::fs::read_dir(h.path("state.db.journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let f = std::fs::OpenOptions::new().write(true).open(&segs[0]).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();

    let o = h.run(&["once", "--config", &full]).await;
    assert_eq!(o.status.code(), Some(74), "{}", stderr(&o));
    assert!(stderr(&o).contains("the filesystem lost data") && stderr(&o).contains("opsera-shipper repair"));
    let o = h.run(&["repair", "--dry-run", "--config", &full]).await;
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stdout(&o).contains("cannot be read back"), "{}", stdout(&o));
    // The same as JSON, for scripts: what is damaged, what a repair would lose, and the reset that fetches it again.
    let o = h.run(&["repair", "--dry-run", "--json", "--config", &full]).await;
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["dropped"], false, "{report}");
    let damaged = report["damaged"].as_array().unwrap();
    assert!(!damaged.is_empty() && damaged.iter().all(|d| d["stream"] == "user_activity"), "{report}");
    let records: i64 =
        damaged.iter().map(|d| d["last_seq"].as_i64().unwrap() - d["first_seq"].as_i64().unwrap() + 1).sum();
    assert_eq!(report["lost_records"].as_i64(), Some(records), "{report}");
    let o = h.run(&["repair", "--config", &full]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lost: usize = out.split("their ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!((1..300).contains(&lost), "{out}");
    assert_eq!(report["lost_records"].as_u64(), Some(lost as u64), "the dry run foretold it: {out}");
    let since = out.split("--since ").nth(1).and_then(|r| r.split(' ').next()).unwrap().to_string();
    assert_eq!(report["reset"], serde_json::json!([{ "stream": "user_activity", "since": since }]), "{out}");
    let o = h.run(&["repair", "--dry-run", "--config", &full]).await;
    assert!(o.status.success() && stdout(&o).contains("sound"), "{}", stdout(&o));
    let o = h.run(&["repair", "--dry-run", "--json", "--config", &full]).await;
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(o.status.success() && report["damaged"] == serde_json::json!([]), "{report}");

    // Everything that could be read back is delivered, once.
    let good = h.config(streams);
    let good = good.to_str().unwrap();
    let o = h.run(&["once", "--config", good]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<String> = h.lines().iter().map(|l| id_of(l)).collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (300 - lost, 300 - lost));
    // The reset repair suggested fetches the lost records again.
    let o = h.run(&["reset", "--stream", "user_activity", "--since", &since, "--config", good]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = h.run(&["once", "--config", good]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: std::collections::HashSet<String> = h.lines().iter().map(|l| id_of(l)).collect();
    let missing: Vec<_> = h.served().into_keys().filter(|id| !ids.contains(id)).collect();
    assert!(missing.is_empty(), "{} still missing", missing.len());
}

/// An operator's `sudo opsera-shipper once` against a service's state and
/// output directories (which belong to the service's user) leaves every file
/// and directory it creates there to that user, as SQLite does with its
/// own: the service can open them all afterwards. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_root_creates_in_a_services_directories_stay_the_services() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let h = Harness::new(opts(300, 0)).await;
    let cfg = h.config("[streams.token_activity]\nenabled = false\n");
    let service = 65534;
    std::os::unix::fs::chown(h.dir.path(), Some(service), Some(service)).unwrap();
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
    let mut created = Vec::new();
    let mut dirs = vec![h.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == cfg {
                continue; // the test's own
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs.push(p.clone());
            }
            created.push((p, m.uid(), m.gid()));
        }
    }
    assert!(created.len() >= 5, "state, lock, journal directory and segment, output directory and file: {created:?}");
    let root_owned: Vec<_> = created.iter().filter(|(_, u, g)| (*u, *g) != (service, service)).collect();
    assert!(root_owned.is_empty(), "left to root: {root_owned:?}");
}
