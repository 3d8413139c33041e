//! A hostile or broken Opsera API, over real HTTP, against the real binary:
//! endless and slow bodies, a server that hangs and then vanishes, clock
//! skew, records outside their window, duplicate ids, lying counts.
//! Each gives a clear message, no panic, no lost and no repeated record.

mod common;

use std::time::Duration;

use common::*;
use opsera_shipper::simulator::{Fault, PastEnd, SimOptions};
use opsera_shipper::window::parse_timestamp;

const ONE_STREAM: &str = "[streams.token_activity]\nenabled = false\n";

fn no_panic(log: &str) {
    assert!(!log.contains("panicked"), "the daemon panicked: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_stops_at_the_size_cap_without_the_process_growing() {
    let h = Harness::new(opts(300, 0)).await;
    h.sim.push_fault(Fault::Huge(1 << 30));
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\ninterval = \"1s\"\n"));
    // The cap belongs to [api]: rewrite the generated config.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[api]\n", "[api]\nmax_response_bytes = \"4MiB\"\n");
    std::fs::write(&cfg, text).unwrap();
    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &[], Some(&log));
    let pid = daemon.id().unwrap();
    wait_until("the daemon delivered after the endless body", || h.lines_so_far().len() >= 300).await;
    let peak_kb = proc_kb(pid, "VmHWM");
    assert_eq!(sigterm(daemon).await, Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    no_panic(&log);
    assert!(log.contains("larger than api.max_response_bytes (4194304 bytes)"), "{log}");
    assert!(log.contains("/api/v2/logs/audit/user"), "the message names the URL: {log}");
    // A 1 GiB body read whole would need over 1 GiB; the cap bounds it at 4 MiB.
    assert!(peak_kb > 0 && peak_kb < 100 * 1024, "peak RSS {peak_kb} kB");
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_a_second_body_times_out_and_is_retried() {
    let h = Harness::new(opts(200, 0)).await;
    h.sim.push_fault(Fault::Slow);
    let cfg = h.config(ONE_STREAM);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("timeout = \"5s\"", "timeout = \"2s\"");
    std::fs::write(&cfg, text).unwrap();
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    no_panic(&err);
    assert!(err.contains("timed out") && err.contains("retrying"), "{err}");
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_then_vanished_api_is_reported_and_the_whole_gap_is_fetched_after() {
    // The checkpoint is an hour old when the outage starts: records written
    // since are "the gap".
    let h = Harness::new(SimOptions { backlog_age: Duration::from_secs(3600), ..opts(200, 0) }).await;
    let port = free_port();
    let cfg = h.config(&format!(
        "{ONE_STREAM}[server]\nlisten = \"127.0.0.1:{port}\"\n[streams.user_activity]\ninterval = \"1s\"\npage_size = 100\n"
    ));
    let text = std::fs::read_to_string(&cfg).unwrap().replace("timeout = \"5s\"", "timeout = \"1s\"\nmax_retries = 1");
    std::fs::write(&cfg, text).unwrap();
    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &[], Some(&log));
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 200).await;

    // The API accepts requests and never answers.
    for _ in 0..10_000 {
        h.sim.push_fault(Fault::Hang);
    }
    let mut ready = (0, String::new());
    wait_until("/readyz says the API times out", || {
        ready = block_on(http_get(&readyz));
        ready.0 == 503 && ready.1.contains("timed out")
    })
    .await;
    assert!(ready.1.contains("user_activity"), "{}", ready.1);
    let st = status_json(&h, &cfg).await;
    let stream = st["streams"].as_array().unwrap().iter().find(|s| s["name"] == "user_activity").unwrap().clone();
    assert!(stream.to_string().contains("timed out"), "status says why: {stream}");

    // Then it goes away altogether, while records keep being written.
    h.sim.go_down();
    h.sim.clear_faults();
    let now = h.sim.now();
    let mut gap = Vec::new();
    for back in (3..40).rev() {
        gap.extend(h.sim.add_user_at(10, now - back * MINUTE));
    }
    wait_until("/readyz says the connection is refused", || {
        ready = block_on(http_get(&readyz));
        ready.0 == 503 && ready.1.contains("onnection refused")
    })
    .await;
    let before = h.sim.requests();
    h.sim.come_back().await.unwrap();
    wait_until("the whole gap is delivered", || {
        let ids: std::collections::HashSet<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        gap.iter().all(|g| ids.contains(g))
    })
    .await;
    // 370 records at 100 a page: the gap costs one window of a few pages, not a request per missed poll.
    let spent = h.sim.requests() - before;
    assert!(spent <= 12, "catching up took {spent} requests");
    wait_until("/readyz is ready again", || block_on(http_get(&readyz)).0 == 200).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    no_panic(&std::fs::read_to_string(&log).unwrap());
    h.assert_exactly_once();
    integrity_ok(&h.path("state.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_clock_ahead_of_the_api_leaves_no_gap_and_no_runaway_refetch() {
    // The API's clock is 10 minutes behind this host's: every window the
    // host asks for ends in the API's future, and records keep arriving
    // "before" the last window's end. The watermark, not the window's end,
    // anchors the next poll, so none is missed.
    let h = Harness::new(SimOptions { skew_ms: -10 * MINUTE, ..opts(100, 0) }).await;
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\ninterval = \"1s\"\n"));
    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &[], Some(&log));
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 100).await;
    let started = std::time::Instant::now();
    let before = h.sim.requests();
    let trickle = h.sim.start_trickle(Duration::from_millis(300), 2);
    tokio::time::sleep(Duration::from_secs(8)).await;
    trickle.cancel();
    // The token stream is off: only user records are expected.
    let served: std::collections::HashMap<String, String> = h.sim.user_records().into_iter().collect();
    assert!(served.len() > 140, "the trickle added records");
    wait_until("every trickled record is delivered", || h.lines_so_far().len() >= served.len()).await;
    let polls = started.elapsed().as_secs() + 2;
    let spent = h.sim.requests() - before;
    assert!(spent <= 2 * polls, "{spent} requests in about {polls} one-second polls");
    assert_eq!(sigterm(daemon).await, Some(0));
    no_panic(&std::fs::read_to_string(&log).unwrap());
    assert_exactly_once(&h.lines(), &served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_outside_their_window_are_kept_once_and_do_not_move_the_watermark_into_the_future() {
    let h = Harness::new(opts(50, 0)).await;
    // A server that ignores its bounds returns, on every first page, a
    // record from the far past and one from the API's future.
    let now = h.sim.now();
    let past =
        r#"{"_id":"aaaaaaaaaaaaaaaaaaaaaaaa","createdAt":"2001-02-03T04:05:06.789Z","type":"pipeline","action":"run"}"#;
    let future = format!(
        r#"{{"_id":"ffffffffffffffffffffffff","createdAt":"{}","type":"pipeline","action":"run"}}"#,
        opsera_shipper::window::fmt_rfc3339(now + 2 * 86_400_000)
    );
    h.sim.set_extra(vec![past.to_string(), future.clone()]);
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\ninterval = \"1s\"\noverlap = \"1m\"\n"));
    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &[], Some(&log));
    wait_until("the backlog is delivered", || h.lines_so_far().len() >= 52).await;
    // Later windows start an hour past the first, so pruning has run over the
    // far-past record's window many times while the server kept serving it.
    let polls_before = h.sim.requests();
    wait_until("several more polls", || h.sim.requests() >= polls_before + 5).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    no_panic(&log);
    assert!(log.contains("created in the future"), "{log}");
    assert!(log.contains("outside the requested window"), "{log}");
    let mut served = h.served();
    served.insert("aaaaaaaaaaaaaaaaaaaaaaaa".into(), past.to_string());
    served.insert("ffffffffffffffffffffffff".into(), future);
    assert_exactly_once(&h.lines(), &served);
    let wm = watermark(&status_json(&h, &cfg).await, "user_activity").unwrap();
    let wm = opsera_shipper::window::parse_timestamp(&wm).unwrap();
    assert!(wm <= h.sim.now(), "the watermark went into the future");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_in_a_page_wrong_types_and_lying_counts() {
    let h = Harness::new(opts(120, 0)).await;
    let rec = |id: &str| format!(r#"{{"_id":"{id}","createdAt":"2026-01-01T00:00:00.000Z","action":"x"}}"#);
    // Rejected whole, with a reason and the URL; the next poll retries the span.
    for (body, why) in [
        (
            r#"{"count":1,"data":[{"_id":{"$oid":"61042540e1d666c9ded178c4"},"createdAt":"2026-01-01T00:00:00Z"}]}"#
                .to_string(),
            "\"_id\" is missing or not a string",
        ),
        (
            format!(
                r#"{{"count":1,"data":[{},{}]}}"#,
                rec("bbbbbbbbbbbbbbbbbbbbbbb1"),
                rec("bbbbbbbbbbbbbbbbbbbbbbb2")
            ),
            "cannot be smaller",
        ),
        (r#"{"count":"12","data":[]}"#.to_string(), "not a non-negative integer"),
    ] {
        h.sim.push_fault(Fault::Raw(body));
        let cfg = h.config(ONE_STREAM);
        let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(75), "{err}");
        no_panic(&err);
        assert!(err.contains(why) && err.contains("/api/v2/logs/audit/user"), "{why}: {err}");
        assert!(h.lines().is_empty(), "nothing from a rejected page");
    }
    // The same record twice in one page, and a count larger than the truth:
    // stored once, the window re-paged once, then accepted with a warning.
    let dup = rec("cccccccccccccccccccccccc");
    h.sim.push_fault(Fault::Raw(format!(r#"{{"count":999,"data":[{dup},{dup}]}}"#)));
    let cfg = h.config(ONE_STREAM);
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("paging the window again"), "{err}");
    let mut served = h.served();
    served.insert("cccccccccccccccccccccccc".into(), dup);
    assert_exactly_once(&h.lines(), &served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_page_fails_the_poll_instead_of_skipping_records() {
    let h = Harness::new(SimOptions { ignore_page: true, ..opts(250, 0) }).await;
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\npage_size = 100\n"));
    let c = cfg.to_str().unwrap();
    let o = h.run(&["once", "--config", c]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains("does not honour `page`") && err.contains("/api/v2/logs/audit/user"), "{err}");
    assert_eq!(watermark(&status_json(&h, &cfg).await, "user_activity"), None, "the checkpoint did not move");
    // Once the server pages properly, everything arrives, once.
    h.sim.set_ignore_page(false);
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
}

/// Whether a page past the end comes back empty, as the last page again
/// or as an error is unknown. When a window holds a whole number of pages,
/// the page after the last is asked for; a server that repeats its last page
/// or refuses the page there has already sent every record its `count`
/// promised, so the window is complete (both used to fail the poll: as a
/// server that ignores `page`, and as a refused request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_past_the_end_answered_with_the_last_page_or_an_error_completes_the_window() {
    for past_end in [PastEnd::LastPage, PastEnd::NotFound] {
        let h = Harness::new(SimOptions { past_end, ..opts(200, 0) }).await;
        let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\npage_size = 100\n"));
        let c = cfg.to_str().unwrap();
        let o = h.run(&["once", "--config", c]).await;
        let err = stderr(&o);
        assert!(o.status.success(), "{past_end:?}: {err}");
        assert!(!err.contains("paging the window again"), "{past_end:?}: the page past the end is not counted: {err}");
        assert_eq!(h.sim.requests(), 3, "{past_end:?}: pages 1, 2 and the one past the end: {err}");
        assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
        // More records later, again a whole number of pages: delivered once.
        h.sim.add_user_at(100, h.sim.now() - 3 * MINUTE);
        let o = h.run(&["once", "--config", c]).await;
        assert!(o.status.success(), "{past_end:?}: {}", stderr(&o));
        assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
    }
}

/// An order that is not stable between requests serves a record on two
/// pages and skips another, with as many records received as counted.
/// Counting unique ids across each page boundary shows it; the window is
/// paged again, then in narrower spans, down to spans of one page, where
/// nothing can be skipped. Counting every record received, as before,
/// completed the window without the skipped ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_unstable_between_requests_skips_nothing() {
    let h = Harness::new(SimOptions { backlog_span: Duration::from_secs(3600), unstable_order: true, ..opts(300, 0) })
        .await;
    let cfg = h.config(&format!("{ONE_STREAM}[streams.user_activity]\npage_size = 100\ninitial_lookback = \"2h\"\n"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("narrower spans: its records did not add up"), "{err}");
    assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
    let wm = watermark(&status_json(&h, &cfg).await, "user_activity").and_then(|w| parse_timestamp(&w));
    assert_eq!(wm, Some(newest_created(&h)));
}

/// A window with more pages than `max_pages` is polled in narrower spans,
/// each completed before the next. Stopping at the cap and completing the
/// window moved the watermark to the newest record (served first) past the
/// pages never read. With a count, the first page shows the window is too
/// large; a server that caps its pages silently is stopped at the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_more_pages_than_allowed_is_polled_in_narrower_spans_losing_nothing() {
    for page_cap in [None, Some(5)] {
        let h = Harness::new(SimOptions { backlog_span: Duration::from_secs(3600), page_cap, ..opts(300, 0) }).await;
        let cfg = h.config(&format!(
            "{ONE_STREAM}[streams.user_activity]\npage_size = 10\nmax_pages = 8\ninitial_lookback = \"2h\"\n"
        ));
        let c = cfg.to_str().unwrap();
        let o = h.run(&["once", "--config", c]).await;
        let err = stderr(&o);
        assert!(o.status.success(), "{page_cap:?}: {err}");
        no_panic(&err);
        assert!(
            err.contains(
                "Polling the window in narrower spans: it has more pages than streams.user_activity.max_pages"
            ),
            "{page_cap:?}: {err}"
        );
        assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
        let wm = watermark(&status_json(&h, &cfg).await, "user_activity").and_then(|w| parse_timestamp(&w));
        assert_eq!(wm, Some(newest_created(&h)), "{page_cap:?}: the watermark is the newest record's");
        // The next poll starts from there: nothing more to deliver.
        let o = h.run(&["once", "--config", c]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
    }
}

/// The newest `createdAt` the simulator serves for user activity.
fn newest_created(h: &Harness) -> i64 {
    let created = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        parse_timestamp(v["createdAt"].as_str().unwrap()).unwrap()
    };
    h.sim.user_records().iter().map(|(_, l)| created(l)).max().unwrap()
}

/// A window of two minutes that still has more pages than allowed cannot
/// be narrowed: the poll fails, naming the key, and the watermark stays
/// short of the newest record; with the bound raised, everything arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_too_busy_to_narrow_fails_the_poll_and_keeps_the_checkpoint() {
    let h = Harness::new(SimOptions { backlog_span: Duration::from_secs(30), ..opts(100, 0) }).await;
    let cfg = h.config(&format!(
        "{ONE_STREAM}[streams.user_activity]\npage_size = 10\nmax_pages = 2\ninitial_lookback = \"1h\"\n"
    ));
    let c = cfg.to_str().unwrap();
    let o = h.run(&["once", "--config", c]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains("streams.user_activity.max_pages") && err.contains("/api/v2/logs/audit/user"), "{err}");
    let wm = watermark(&status_json(&h, &cfg).await, "user_activity").and_then(|w| parse_timestamp(&w));
    assert!(wm.is_none_or(|wm| wm < newest_created(&h)), "the watermark moved past records not read: {wm:?}");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("max_pages = 2", "max_pages = 20")).unwrap();
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_once(&h.lines(), &h.sim.user_records().into_iter().collect());
}
