//! `cargo bench --bench pipeline`: the whole pipeline, measured.
//!
//! An in-process server hands out pre-rendered v2 pages (so the server is
//! not what is measured); the release binary runs `once` over them into a
//! file sink, with every durability setting on. The same pages fetched by
//! the same HTTP client and appended raw to a file, with no parsing, no
//! SQLite and no fsync, give the raw limit. Each child's CPU time and peak
//! RSS come from `wait4`. Then: idle cost, start-up to READY with the 1M
//! state database, binary size, and per-stage micro figures.
//!
//! Environment: `BENCH_SIZES` (default `10000,100000,1000000`),
//! `BENCH_IDLE_SECS` (default 60; 0 skips the idle run), `BENCH_QUICK`
//! (only the size table), `BENCH_WRAP` (a profiler to run the pipeline
//! under, e.g. `perf record -g -o /tmp/perf.data`), `BENCH_OLDEST_FIRST`
//! (serve each window oldest record first; the default is newest first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::routing::get;

const BIN: &str = env!("CARGO_BIN_EXE_opsera-shipper");
const PAGE: usize = 1000;
const TOKEN: &str = "bench-token";

/// Pre-rendered pages of one backlog, newest first.
struct Pages {
    bodies: Vec<Bytes>,
    total: usize,
    /// Answer every request with an empty page (idle and start-up runs).
    empty: AtomicBool,
}

fn hex24(mut x: u64) -> String {
    let mut s = String::with_capacity(24);
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for i in 0..24 {
        let v = ((x >> ((i % 16) * 4)) ^ (i as u64 * 7)) & 0xf;
        s.push(char::from_digit(v as u32, 16).unwrap());
    }
    s
}

/// A realistic audit record of about 350 bytes; one in 20 carries a 2 KB
/// value. Its `_id` is shaped like a MongoDB ObjectId: the creation second
/// in 8 hex digits, then 16 that differ per record.
fn record(i: usize, created_ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(created_ms).unwrap();
    let users = ["alice.nguyen@example.com", "bob.okafor@example.com", "carla.rossi@example.com", "support@opsera.io"];
    let actions = [("pipeline", "run"), ("tool", "update"), ("user", "login"), ("task", "create")];
    let (ty, action) = actions[i % actions.len()];
    let note = if i.is_multiple_of(20) {
        "x".repeat(2000)
    } else {
        format!("Pipeline {} step {} finished with status success in {} ms", i % 97, i % 13, i % 9973)
    };
    format!(
        r#"{{"_id":"{:08x}{}","user_id":"5f0a1b2c3d4e5f607182930{}","user_email":"{}","type":"{ty}","action":"{action}","secondary_action":"via-api","target_id":"{}","account":"org-acme-prod","note":"{note}","ip":"10.1.{}.{}","createdAt":"{}","__v":0}}"#,
        created_ms / 1000,
        &hex24(i as u64)[..16],
        i % 10,
        users[i % users.len()],
        hex24(i as u64 ^ 0xabcdef),
        i % 256,
        (i / 256) % 256,
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// `n` records spread over the 50 minutes ending 5 minutes ago, in pages of `PAGE`, newest first.
fn oldest_first() -> bool {
    std::env::var("BENCH_OLDEST_FIRST").is_ok()
}

fn render(n: usize) -> (Vec<Bytes>, u64) {
    let end = chrono::Utc::now().timestamp_millis() - 5 * 60_000;
    let span = 50 * 60_000i64;
    let mut bodies = Vec::new();
    let mut bytes = 0u64;
    let mut i = 0;
    while i < n {
        let mut page = format!("{{\"count\":{n},\"data\":[");
        for k in i..(i + PAGE).min(n) {
            // Newest first, as a server sorting by `createdAt` would send
            // them (BENCH_OLDEST_FIRST: the other way round).
            let step = (span * k as i64) / n as i64;
            let created = if oldest_first() { end - span + step } else { end - step };
            let r = record(k, created);
            bytes += r.len() as u64;
            if k > i {
                page.push(',');
            }
            page.push_str(&r);
        }
        page.push_str("]}");
        bodies.push(Bytes::from(page));
        i += PAGE;
    }
    (bodies, bytes)
}

async fn serve_page(
    State(p): State<Arc<Pages>>,
    Query(q): Query<Vec<(String, String)>>,
) -> ([(axum::http::HeaderName, &'static str); 1], Bytes) {
    let ct = [(axum::http::header::CONTENT_TYPE, "application/json")];
    if p.empty.load(Ordering::Relaxed) {
        return (ct, Bytes::from_static(b"{\"count\":0,\"data\":[]}"));
    }
    let page: usize = q.iter().find(|(k, _)| k == "page").and_then(|(_, v)| v.parse().ok()).unwrap_or(1);
    match p.bodies.get(page - 1) {
        Some(b) => (ct, b.clone()),
        None => (ct, Bytes::from(format!("{{\"count\":{},\"data\":[]}}", p.total))),
    }
}

async fn start_server(pages: Arc<Pages>) -> String {
    let app = Router::new()
        .route("/api/v2/logs/audit/user", get(serve_page))
        .route("/api/v1/logs/user/tokens", get(serve_page))
        .route("/api/v1/logs/user/actions", get(serve_page))
        .with_state(pages);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

/// A finished child: wall time, CPU time (from `wait4`) and peak RSS (from `/proc`).
struct Usage {
    wall: Duration,
    cpu: Duration,
    peak_rss_kb: u64,
    ok: bool,
}

#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its CPU time
fn run_child(cmd: &mut std::process::Command) -> Usage {
    let started = Instant::now();
    let child = cmd.stdin(std::process::Stdio::null()).spawn().expect("spawn");
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as i32;
    // Peak RSS from /proc, read until the process is gone: wait4's ru_maxrss
    // would count this (large) bench process, which the child was spawned from.
    // Until the child has exec'd, /proc shows this process's memory (the
    // rendered pages, hundreds of MB): skip samples while it still has our name.
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ours = comm(std::process::id());
    let hwm = std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            // The name first: once it has changed, the figure read next is the child's own.
            if comm(pid as u32) != ours {
                match proc_kb(pid as u32, "VmHWM") {
                    0 => return peak,
                    h => peak = peak.max(h),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Usage {
        wall: started.elapsed(),
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        peak_rss_kb: hwm.join().unwrap(),
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    }
}

fn write_config(dir: &Path, base_url: &str, both_streams: bool) -> PathBuf {
    let p = dir.join("config.toml");
    let streams = if both_streams {
        String::new()
    } else {
        "[streams.token_activity]\nenabled = false\n[streams.user_activity]\npage_size = 1000\ninitial_lookback = \"1d\"\n"
            .into()
    };
    std::fs::write(
        &p,
        format!(
            "[api]\nbase_url = {base_url:?}\ntoken = {TOKEN:?}\ntimeout = \"120s\"\n[state]\npath = {:?}\n\
             [log]\nlevel = \"warn\"\n{streams}[sinks.out]\ntype = \"file\"\npath = {:?}\n",
            dir.join("state.db").display().to_string(),
            dir.join("out.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    // It holds the token inline: readable by its owner only (else the daemon warns at every start).
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The raw limit, run as a child of this bench: fetch `pages` pages with
/// the same client settings as the daemon and append the bodies to `out`.
fn raw_child(base_url: &str, out: &str, pages: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .retry(reqwest::retry::never())
            .gzip(true)
            .build()
            .unwrap();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out).unwrap();
        let url = format!("{base_url}/api/v2/logs/audit/user");
        for page in 1..=pages {
            let body = http
                .get(&url)
                .bearer_auth(TOKEN)
                .query(&[("page_size", "1000"), ("page", &page.to_string())])
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            f.write_all(&body).unwrap();
        }
    });
}

/// CPU seconds (user+sys) a process has used, from `/proc/<pid>/stat`.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
        / ticks
}

fn proc_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Start `run` with a notify socket; return the child and the time to READY=1.
#[allow(clippy::zombie_processes)] // the caller stops and waits for it
fn start_until_ready(cfg: &Path, dir: &Path) -> (std::process::Child, Duration) {
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let child = std::process::Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        let n = sock.recv(&mut buf).expect("READY=1 within 30s");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            return (child, started.elapsed());
        }
    }
}

fn stop(mut child: std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

struct Row {
    n: usize,
    rps: f64,
    mbps: f64,
    cpu_s: f64,
    us_per_rec: f64,
    peak_mb: f64,
    db_mb: f64,
    raw_rps: f64,
    raw_cpu_s: f64,
    raw_peak_mb: f64,
}

fn micro() -> Vec<(String, f64)> {
    use opsera_shipper::config::SyslogFormat;
    use opsera_shipper::opsera::{CountMeaning, parse_page};
    use opsera_shipper::sink::LineFormat;
    use opsera_shipper::sink::syslog_format::Formatter;
    use opsera_shipper::store::{JournalRow, Store};
    let (pages, _) = render(PAGE * 20);
    let mut out = Vec::new();
    let time = |iters: usize, mut f: Box<dyn FnMut(usize) + '_>| {
        f(0);
        let t = Instant::now();
        for i in 0..iters {
            f(i + 1);
        }
        t.elapsed().as_secs_f64() * 1e6 / iters as f64
    };
    out.push((
        "parse a 1000-record page".to_string(),
        time(50, Box::new(|i| drop(parse_page(&pages[i % pages.len()], CountMeaning::Total).unwrap()))),
    ));
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Store::open(&dir.path().join("m.db")).unwrap();
    let parsed: Vec<_> = pages.iter().map(|b| parse_page(b, CountMeaning::Total).unwrap().records).collect();
    let mut it = parsed.into_iter();
    out.push((
        "store a 1000-record page (segment append + fsync, SQLite transaction + fsync)".to_string(),
        time(
            18,
            Box::new(|_| {
                let recs = it.next().unwrap();
                rt.block_on(store.ingest("user_activity", recs, (0, i64::MAX))).unwrap();
            }),
        ),
    ));
    let streams: std::sync::Arc<[String]> = std::sync::Arc::from(vec!["user_activity".to_string()]);
    let mut after = 0;
    out.push((
        "read a 1000-record batch back from the journal".to_string(),
        time(
            15,
            Box::new(|_| {
                let b = rt.block_on(store.read_batch(after, streams.clone(), 1000, 64 << 20, 1)).unwrap();
                assert_eq!(b.rows.len(), 1000);
                after = b.last_seq;
            }),
        ),
    ));
    let rows: Vec<JournalRow> = parse_page(&pages[0], CountMeaning::Total)
        .unwrap()
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| JournalRow {
            seq: i as i64,
            stream: "user_activity".into(),
            id: r.id,
            created: r.created,
            body: r.body,
        })
        .collect();
    for (name, format) in [("RFC 5424", SyslogFormat::Rfc5424), ("CEF", SyslogFormat::Cef)] {
        let f = Formatter {
            format,
            pri: 110,
            severity: 6,
            hostname: "bench".into(),
            app_name: "opsera-shipper".into(),
            procid: "1".into(),
            sd_id: "opsera@32473".into(),
            max_bytes: 8192,
            lines: LineFormat::default(),
            escape_line_breaks: true,
        };
        out.push((
            format!("format 1000 records as {name}"),
            time(
                50,
                Box::new(|_| {
                    for r in &rows {
                        std::hint::black_box(f.format(r));
                    }
                }),
            ),
        ));
    }
    let cfg = opsera_shipper::config::load_str(
        "[api]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n[sinks.h]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\nencoding = \"splunk_hec\"\n",
        Path::new("bench.toml"),
        &opsera_shipper::config::LoadOptions { require_token: true, env: Some(Default::default()) },
    )
    .unwrap();
    let sink = cfg.sinks.into_iter().next().unwrap();
    let opsera_shipper::config::SinkKind::Webhook(w) = sink.kind else { unreachable!() };
    let hook = opsera_shipper::sink::WebhookSink::new("h", *w, LineFormat::default()).unwrap();
    out.push((
        "encode 1000 records as Splunk HEC".to_string(),
        time(50, Box::new(|_| drop(std::hint::black_box(hook.encode(&rows))))),
    ));
    out
}

fn main() {
    // The raw-limit child.
    if let Ok(spec) = std::env::var("OPSERA_BENCH_RAW") {
        // A name of its own, so that `run_child` can tell it has exec'd.
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, c"raw-limit".as_ptr()) };
        let mut parts = spec.splitn(3, '|');
        let (url, out, pages) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        raw_child(url, out, pages.parse().unwrap());
        return;
    }
    if std::env::args().any(|a| a == "--list") || std::env::var("BENCH_SKIP").is_ok() {
        return; // `cargo bench -- --list` and test harness probes
    }
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let idle_secs: u64 = std::env::var("BENCH_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rows = Vec::new();
    let mut last: Option<(tempfile::TempDir, Arc<Pages>, String)> = None;
    for &n in &sizes {
        eprintln!("rendering {n} records…");
        let (bodies, record_bytes) = render(n);
        let pages = Arc::new(Pages { total: n, bodies, empty: AtomicBool::new(false) });
        let url = rt.block_on(start_server(pages.clone()));
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), &url, false);
        eprintln!("pipeline once over {n} records…");
        // BENCH_WRAP (e.g. "perf record -g -o /tmp/perf.data") runs the pipeline under a profiler.
        let wrap: Vec<String> =
            std::env::var("BENCH_WRAP").unwrap_or_default().split_whitespace().map(String::from).collect();
        let mut cmd = match wrap.split_first() {
            Some((head, rest)) => {
                let mut c = std::process::Command::new(head);
                c.args(rest).arg(BIN);
                c
            }
            None => std::process::Command::new(BIN),
        };
        let u = run_child(cmd.args(["once", "--config", cfg.to_str().unwrap()]));
        assert!(u.ok, "once failed");
        let lines = std::fs::read_to_string(dir.path().join("out.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        assert_eq!(lines, n, "the file sink holds every record");
        let db = file_size(&dir.path().join("state.db")) + file_size(&dir.path().join("state.db-wal"));
        eprintln!("raw limit over {n} records…");
        let raw_out = dir.path().join("raw.out");
        let raw = run_child(
            std::process::Command::new(std::env::current_exe().unwrap())
                .env("OPSERA_BENCH_RAW", format!("{url}|{}|{}", raw_out.display(), pages.bodies.len())),
        );
        assert!(raw.ok, "raw child failed");
        let secs = u.wall.as_secs_f64();
        rows.push(Row {
            n,
            rps: n as f64 / secs,
            mbps: record_bytes as f64 / 1e6 / secs,
            cpu_s: u.cpu.as_secs_f64(),
            us_per_rec: u.cpu.as_secs_f64() * 1e6 / n as f64,
            peak_mb: u.peak_rss_kb as f64 / 1024.0,
            db_mb: db as f64 / 1e6,
            raw_rps: n as f64 / raw.wall.as_secs_f64(),
            raw_cpu_s: raw.cpu.as_secs_f64(),
            raw_peak_mb: raw.peak_rss_kb as f64 / 1024.0,
        });
        last = Some((dir, pages, url));
    }

    println!(
        "\n| records | records/s | MB/s | CPU s | CPU µs/record | peak RSS MB | state DB MB | raw limit records/s | ratio to raw | raw CPU s | raw peak RSS MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} |",
            r.n,
            r.rps,
            r.mbps,
            r.cpu_s,
            r.us_per_rec,
            r.peak_mb,
            r.db_mb,
            r.raw_rps,
            r.rps / r.raw_rps,
            r.raw_cpu_s,
            r.raw_peak_mb
        );
    }
    if rows.len() >= 2 {
        let (a, b) = (&rows[0], &rows[rows.len() - 1]);
        println!("\npeak RSS {} vs {} records: {:+.0} %", b.n, a.n, (b.peak_mb / a.peak_mb - 1.0) * 100.0);
    }

    // Start-up and idle, on the state database of the largest run (BENCH_QUICK skips the rest).
    if std::env::var("BENCH_QUICK").is_ok() {
        return;
    }
    if let Some((dir, pages, url)) = &last {
        pages.empty.store(true, Ordering::Relaxed);
        let cfg = write_config(dir.path(), url, false);
        let mut starts = Vec::new();
        for _ in 0..5 {
            let (child, t) = start_until_ready(&cfg, dir.path());
            starts.push(t);
            stop(child);
        }
        starts.sort();
        let c = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
        let seen: i64 = c.query_row("SELECT count(*) FROM seen", [], |r| r.get(0)).unwrap();
        drop(c);
        println!(
            "\nstart-up to READY=1 with {seen} seen ids in the state database: median {:.1} ms (of 5)",
            starts[2].as_secs_f64() * 1e3
        );
        let cfg = write_config(dir.path(), url, true);
        if idle_secs == 0 {
            return print_tail();
        }
        let (child, _) = start_until_ready(&cfg, dir.path());
        std::thread::sleep(Duration::from_secs(5));
        let pid = child.id();
        let cpu0 = proc_cpu(pid);
        std::thread::sleep(Duration::from_secs(idle_secs));
        let cpu = proc_cpu(pid) - cpu0;
        let rss = proc_kb(pid, "VmRSS");
        let (anon, file) = (proc_kb(pid, "RssAnon"), proc_kb(pid, "RssFile"));
        stop(child);
        println!(
            "idle over {idle_secs} s (default intervals, nothing new): RSS {:.1} MB (anonymous {:.1}, file-backed {:.1}), CPU {:.3} s = {:.3} % of one core",
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0,
            cpu,
            cpu / idle_secs as f64 * 100.0
        );
    }
    print_tail();
}

/// Binary size and the per-stage micro figures.
fn print_tail() {
    println!(
        "release binary: {:.1} MB (stripped: {})",
        file_size(Path::new(BIN)) as f64 / 1e6,
        if cfg!(debug_assertions) { "debug build" } else { "strip = true" }
    );
    println!("\n| stage | µs |");
    println!("|---|---:|");
    for (name, us) in micro() {
        println!("| {name} | {us:.0} |");
    }
}
