//! Reliability: kill -9 at random points, full disks, a second instance.
//! The real binary, the simulated API over loopback, real SQLite files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use opsera_shipper::simulator::SimOptions;

fn spawn_run(cfg: &Path, stderr_to: Option<&Path>) -> tokio::process::Child {
    spawn_daemon(cfg, &[], stderr_to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_refuses_to_start_and_status_still_works() {
    let h = Harness::new(opts(300, 30)).await;
    let cfg = h.config("[streams.user_activity]\ninterval = \"1s\"\n");
    let c = cfg.to_str().unwrap();
    let daemon = spawn_run(&cfg, None);
    wait_until("the daemon delivered", || h.lines_so_far().len() >= 330).await;
    let o = h.run(&["once", "--config", c]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("another opsera-shipper (pid ") && err.contains("state.db"), "{err}");
    let o = h.run(&["reset", "--stream", "user_activity", "--config", c]).await;
    assert_eq!(o.status.code(), Some(75), "reset refuses while the daemon runs: {}", stderr(&o));
    let st = status_json(&h, &cfg).await;
    assert!(watermark(&st, "user_activity").is_some(), "status reads while the daemon runs");
    assert_eq!(sigterm(daemon).await, Some(0));
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "the lock is released on exit: {}", stderr(&o));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_and_duplicates_nothing() {
    // A slow API stretches the backfill over several seconds, so kills land
    // while paging, between ingest and watermark, and while writing batches.
    // Its pages come further apart than the storer waits for a next one, so
    // each page is a group of its own.
    kill_9_loop(Duration::from_millis(15), 0x5eed_1234_abcd_ef01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_pages_are_stored_in_groups_loses_nothing_and_duplicates_nothing() {
    // A fast API: pages follow each other within the storer's wait, so they
    // are stored in groups of several, and kills land inside open groups.
    kill_9_loop(Duration::from_millis(2), 0x0dd_ba11_cafe_f00d).await;
}

/// Kill `run` 24 times at random points of a backfill from an API that
/// answers each request after `latency`, then check that a final `once`
/// delivers every record exactly once.
async fn kill_9_loop(latency: Duration, seed: u64) {
    let h = Harness::new(SimOptions { latency, ..opts(30_000, 3_000) }).await;
    let cfg = h.config(
        "[streams.user_activity]\npage_size = 250\ninterval = \"1s\"\n[streams.token_activity]\ninterval = \"1s\"\n",
    );
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut kills = 0;
    let mut progress = Vec::new();
    for i in 0..24 {
        // Every other run holds each delivered batch uncommitted for a while, so
        // kills also land between a file write and its cursor commit.
        let env: &[(&str, &str)] =
            if i % 2 == 1 { &[("OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS", "150")] } else { &[] };
        let mut child = spawn_daemon(&cfg, env, None);
        tokio::time::sleep(Duration::from_millis(80 + next() % 600)).await;
        child.start_kill().unwrap(); // SIGKILL
        let _ = child.wait().await;
        kills += 1;
        // A kill mid-write may leave a torn last line; the next start cuts it.
        progress.push(h.lines_so_far().len());
    }
    assert!(kills >= 20);
    assert!(progress.iter().any(|n| *n > 0 && *n < 33_000), "kills landed mid-backfill: {progress:?}");
    // Whatever the kills left, a final run completes the backfill exactly once.
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
    integrity_ok(&h.path("state.db"));
}

/// A small tmpfs mounted on `dir` (tests run as root in CI), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs needs root (CI runs as root): mount -t tmpfs ... {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disks_are_retried_and_nothing_is_lost() {
    let h = Harness::new(opts(3_000, 300)).await;
    // The file sink's filesystem holds about a quarter of the backlog.
    let out_fs = Tmpfs::mount(&h.path("out"), "256k");
    let cfg = h.config(
        "[streams.user_activity]\ninterval = \"1s\"\npage_size = 200\n[streams.token_activity]\ninterval = \"1s\"\n",
    );
    let log = h.path("daemon.log");
    let daemon = spawn_run(&cfg, Some(&log));
    wait_until("the file sink reports the full disk", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("No space left on device")
    })
    .await;
    let stuck = h.lines().len();
    assert!(stuck < 3_300, "the disk filled before the backlog was written");
    out_fs.grow("16m");
    wait_until("the file sink resumed and caught up", || h.lines_so_far().len() >= 3_300).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    h.assert_exactly_once();
    integrity_ok(&h.path("state.db"));
    drop(out_fs);

    // Now the state database's filesystem fills up while new records arrive.
    let h = Harness::new(opts(0, 0)).await;
    let state_fs = Tmpfs::mount(&h.path("state"), "1m");
    let cfg = h.config(
        "[streams.user_activity]\ninterval = \"1s\"\npage_size = 200\n[streams.token_activity]\nenabled = false\n",
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace("state.db", "state/state.db");
    std::fs::write(&cfg, text).unwrap();
    let log = h.path("daemon2.log");
    let daemon = spawn_run(&cfg, Some(&log));
    let big = serde_json::to_string(&"x".repeat(2_000)).unwrap();
    let at = h.sim.now() - 3 * MINUTE;
    for _ in 0..1_500 {
        h.sim.add_user_with(at, &[("description", big.clone())]);
    }
    wait_until("the store reports the full disk", || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.contains("full") || l.contains("No space left")
    })
    .await;
    state_fs.grow("64m");
    wait_until("everything was delivered after space was freed", || h.lines_so_far().len() >= 1_500).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    h.assert_exactly_once();
    integrity_ok(&h.path("state/state.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_while_the_journal_fills_stops_polling_at_the_bound_then_drains() {
    use common::receiver::{Mode, Receiver};
    let h = Harness::new(opts(6_000, 0)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    r.stop().await;
    let port = free_port();
    let cfg = h.config_with(&format!(
        "max_buffered_records = 500\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [streams.token_activity]\nenabled = false\n[streams.user_activity]\ninterval = \"1s\"\npage_size = 100\n\
         [sinks.hook]\ntype = \"webhook\"\nurl = {:?}\nbatch_timeout = \"100ms\"\nmax_backoff = \"300ms\"\n",
        r.url()
    ));
    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &[], Some(&log));
    let pid = daemon.id().unwrap();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let journal =
        || async { sample(&http_get(&metrics).await.1, "opsera_shipper_journal_records ").unwrap_or(0.0) as u64 };
    wait_until("the journal is at its bound", || block_on(journal()) >= 500).await;
    // Held there: no more API requests, no growth of the journal or the process.
    let (requests, rss) = (h.sim.requests(), proc_kb(pid, "VmRSS"));
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let n = journal().await;
        assert!((500..=600).contains(&n), "journal holds {n} records; the bound is 500 (+ one page)");
    }
    assert_eq!(h.sim.requests(), requests, "pollers kept fetching while the journal was full");
    let grown = proc_kb(pid, "VmRSS").saturating_sub(rss);
    assert!(grown < 8 * 1024, "RSS grew {grown} kB while waiting");
    assert!(std::fs::read_to_string(&log).unwrap().contains("Journal is full"));
    // The receiver comes back: everything drains, once.
    r.restart().await;
    wait_until("the receiver has every record", || r.st().accepted.len() >= 6_000).await;
    assert_eq!(sigterm(daemon).await, Some(0));
    let ids: std::collections::HashSet<String> = r.st().accepted.iter().map(|t| id_of(t)).collect();
    assert_eq!((ids.len(), r.st().accepted.len()), (6_000, 6_000), "every record once");
    integrity_ok(&h.path("state.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_first_batch_ever_commits_duplicates_nothing() {
    // A fresh state database and output file: the sink has never committed
    // a position. Its first batch is written, then held uncommitted.
    let h = Harness::new(opts(3_000, 500)).await;
    let cfg = h.config("");
    let mut child = spawn_daemon(&cfg, &[("OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS", "5000")], None);
    wait_until("the first batch is written", || !h.lines_so_far().is_empty()).await;
    child.start_kill().unwrap(); // SIGKILL
    let _ = child.wait().await;
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    h.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_first_batch_after_a_rotation_commits_duplicates_nothing() {
    let h = Harness::new(opts(300, 0)).await;
    let cfg = h.config("[streams.user_activity]\ninterval = \"1s\"\n[streams.token_activity]\nenabled = false\n");
    // Every delivered batch is held uncommitted for 3 s.
    let mut daemon = spawn_daemon(&cfg, &[("OPSERA_SHIPPER_TEST_DELAY_AFTER_DELIVERY_MS", "3000")], None);
    wait_until("the backlog is written", || h.lines_so_far().len() >= 300).await;
    let rotated = h.path("out/audit.jsonl.1");
    std::fs::rename(h.out(), &rotated).unwrap(); // logrotate's move, then SIGHUP
    signal(&daemon, libc::SIGHUP);
    let fresh = h.sim.add_user_at(40, h.sim.now() - 3 * MINUTE);
    wait_until("new records are written to a new file", || {
        let ids: Vec<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        fresh.iter().all(|f| ids.contains(f))
    })
    .await;
    // Killed while the first batch into the new file waits for its commit.
    daemon.start_kill().unwrap();
    let _ = daemon.wait().await;
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut all = read_lines(&rotated);
    assert_eq!(all.len(), 300, "the rotated file kept the old records, and only those");
    all.extend(h.lines());
    assert_exactly_once(&all, &h.served());
}
