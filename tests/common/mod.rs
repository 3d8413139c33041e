//! Test harness: the simulated Opsera API in-process on loopback, a temp
//! directory with a config, a real SQLite state file and a real output
//! file, and the real `opsera-shipper` binary run against them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

pub mod cef;
pub mod receiver;
pub mod rsyslog;
pub mod tls;

use opsera_shipper::simulator::{SimOptions, Simulator};

pub const BIN: &str = env!("CARGO_BIN_EXE_opsera-shipper");
pub const MINUTE: i64 = 60_000;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub sim: Simulator,
}

impl Harness {
    pub async fn new(opts: SimOptions) -> Harness {
        let sim = Simulator::start(opts).await.expect("start simulator");
        Harness { dir: tempfile::tempdir().expect("tempdir"), sim }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn out(&self) -> PathBuf {
        self.path("out/audit.jsonl")
    }

    /// A config pointing at the simulator, a state db and a file sink in the temp dir,
    /// plus `extra` TOML appended (later tables win over nothing: keep keys distinct).
    pub fn config(&self, extra: &str) -> PathBuf {
        self.config_with(&format!(
            "[sinks.archive]\ntype = \"file\"\npath = {:?}\n{extra}",
            self.out().display().to_string()
        ))
    }

    /// A config with the [api] and [state] sections filled in and `rest` appended.
    pub fn config_with(&self, rest: &str) -> PathBuf {
        let text = format!(
            "[api]\nbase_url = {:?}\ntoken = {:?}\ntimeout = \"5s\"\n\n[state]\npath = {:?}\n\n{rest}\n",
            self.sim.base_url(),
            self.sim.token(),
            self.path("state.db").display().to_string(),
        );
        let p = self.path("config.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        run_bin(args, &[]).await
    }

    /// Lines of the output file (empty when it does not exist).
    pub fn lines(&self) -> Vec<String> {
        read_lines(&self.out())
    }

    /// Complete lines written so far, while the daemon may be writing (for waits).
    pub fn lines_so_far(&self) -> Vec<String> {
        let t = std::fs::read_to_string(self.out()).unwrap_or_default();
        let complete = t.rfind('\n').map_or("", |i| &t[..=i]);
        complete.lines().map(String::from).collect()
    }

    /// Every record the simulator holds, as id → compact JSON text.
    pub fn served(&self) -> HashMap<String, String> {
        self.sim.user_records().into_iter().chain(self.sim.token_records()).collect()
    }

    /// Assert the output holds every served record exactly once, byte for byte.
    pub fn assert_exactly_once(&self) {
        assert_exactly_once(&self.lines(), &self.served());
    }
}

pub fn read_lines(p: &Path) -> Vec<String> {
    match std::fs::read_to_string(p) {
        Ok(t) => {
            assert!(t.is_empty() || t.ends_with('\n'), "output ends with a torn line");
            t.lines().map(String::from).collect()
        }
        Err(_) => Vec::new(),
    }
}

pub fn id_of(line: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("output line is not JSON ({e}): {line}"));
    v["_id"].as_str().expect("_id").to_string()
}

pub fn assert_exactly_once(lines: &[String], served: &HashMap<String, String>) {
    let mut seen = HashMap::new();
    for l in lines {
        let id = id_of(l);
        *seen.entry(id.clone()).or_insert(0) += 1;
        let want = served.get(&id).unwrap_or_else(|| panic!("output has a record the server never served: {id}"));
        assert_eq!(l, want, "record {id} was changed on the way");
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "records written more than once: {dups:?}");
    let missing: Vec<_> = served.keys().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} served records missing from the output, e.g. {:?}", missing.len(), missing.first());
}

pub async fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("opsera-shipper did not finish within 120s")
        .expect("run opsera-shipper")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Wait until `f` holds, for at most 90 seconds.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting until {what}");
}

pub fn opts(user: usize, tokens: usize) -> SimOptions {
    SimOptions { user_backlog: user, token_backlog: tokens, ..SimOptions::default() }
}

/// `status --json` of the harness's config.
pub async fn status_json(h: &Harness, cfg: &Path) -> serde_json::Value {
    let o = h.run(&["status", "--json", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "status failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("status --json is JSON")
}

pub fn watermark(status: &serde_json::Value, stream: &str) -> Option<String> {
    status["streams"].as_array()?.iter().find(|s| s["name"] == stream)?.get("watermark")?.as_str().map(String::from)
}

/// Assert that `check-config` exits 78 on config `text` with a message naming `key`.
pub async fn assert_config_error(text: &str, key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    let o = run_bin(&["check-config", "--config", p.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(78), "{key}: {}", stderr(&o));
    assert!(stderr(&o).contains(key), "{key}: {}", stderr(&o));
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Start `opsera-shipper run` on `cfg` with `env`, its stderr to `stderr_to` (or discarded).
pub fn spawn_daemon(cfg: &Path, env: &[(&str, &str)], stderr_to: Option<&Path>) -> tokio::process::Child {
    let err = match stderr_to {
        Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
        None => Stdio::null(),
    };
    tokio::process::Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub fn signal(child: &tokio::process::Child, sig: i32) {
    unsafe { libc::kill(child.id().unwrap() as i32, sig) };
}

pub async fn exit_code(mut child: tokio::process::Child) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits within 30s").unwrap().code()
}

/// SIGTERM the daemon and return its exit code.
pub async fn sigterm(child: tokio::process::Child) -> Option<i32> {
    signal(&child, libc::SIGTERM);
    exit_code(child).await
}

/// GET `url`: (status, body), or (0, "") when it cannot connect.
pub async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The value of one sample line in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().split(' ').next()?.parse().ok()))
}

/// A `/proc/<pid>/status` field in kB (VmRSS, VmHWM).
pub fn proc_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// `PRAGMA integrity_check` of a state database is "ok".
pub fn integrity_ok(db: &Path) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let r: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(r, "ok", "state database integrity");
}

/// Run a future to completion from synchronous code inside a multi-thread
/// runtime (a `wait_until` predicate).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A state database in a temp directory with sink "t" registered and `n`
/// small `user_activity` records (ids `{i:024x}`, `createdAt` i) journaled.
pub async fn journal_of(n: usize) -> (tempfile::TempDir, opsera_shipper::store::Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = opsera_shipper::store::Store::open(&dir.path().join("s.db")).unwrap();
    store.register_sinks(vec!["t".into()]).await.unwrap();
    for from in (0..n).step_by(1000) {
        let recs = (from..n.min(from + 1000))
            .map(|i| opsera_shipper::opsera::Record {
                id: format!("{i:024x}").into(),
                created: i as i64,
                body: format!("{{\"_id\":\"{i:024x}\"}}").into(),
            })
            .collect();
        store.ingest("user_activity", recs, (0, 0)).await.unwrap();
    }
    (dir, store)
}
