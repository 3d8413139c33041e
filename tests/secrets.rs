//! Secrets never leave: every configured secret (API token, webhook bearer,
//! basic and Splunk credentials, HMAC key, a header from the environment)
//! is absent from logs at trace level, errors, `check-config`, `status`,
//! `dead-letters` and the ops endpoints. Loose secret-file permissions warn.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::receiver::{Mode, Receiver};
use common::*;
use opsera_shipper::simulator::{Fault, SimOptions};

const API_TOKEN: &str = "api-T0KEN-aaaa1111";
const BEARER: &str = "bearer-T0KEN-bbbb2222";
const BASIC_PW: &str = "basic-PASS-cccc3333";
const HMAC: &str = "hmac-SECRET-dddd4444";
const SPLUNK: &str = "splunk-T0KEN-eeee5555";
const HEADER: &str = "header-KEY-ffff6666";

fn assert_no_secret(what: &str, text: &str) {
    let basic_b64 = "dXNlcjpiYXNpYy1QQVNTLWNjY2MzMzMz"; // base64("user:basic-PASS-cccc3333")
    for s in [API_TOKEN, BEARER, BASIC_PW, HMAC, SPLUNK, HEADER, basic_b64] {
        assert!(!text.contains(s), "{what} leaked {s}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_anywhere_and_loose_files_warn() {
    let h = Harness::new(SimOptions { token: API_TOKEN.into(), ..opts(300, 30) }).await;
    // The API refuses the token once: the error path runs too.
    h.sim.push_fault(Fault::Status { code: 500, retry_after: None });
    let refusing = Receiver::start(Mode::Ndjson).await;
    refusing.st().auth = Some("Bearer something-else".into());
    let basic = Receiver::start(Mode::Ndjson).await;
    basic.st().auth = Some(format!("Basic {}", "dXNlcjpiYXNpYy1QQVNTLWNjY2MzMzMz"));
    let hec = Receiver::start(Mode::Hec).await;
    hec.st().auth = Some(format!("Splunk {SPLUNK}"));

    let bearer_file = h.path("bearer.token");
    std::fs::write(&bearer_file, format!("{BEARER}\n")).unwrap();
    std::fs::set_permissions(&bearer_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let splunk_file = h.path("splunk.token");
    std::fs::write(&splunk_file, SPLUNK).unwrap();
    std::fs::set_permissions(&splunk_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let cfg = h.config(&format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[streams.user_activity]
interval = "1s"
[sinks.refused]
type = "webhook"
url = "{}"
batch_timeout = "100ms"
max_backoff = "200ms"
auth.bearer_token_file = {:?}
[sinks.basic]
type = "webhook"
url = "{}"
batch_timeout = "100ms"
auth.basic_user = "user"
auth.basic_password = "{BASIC_PW}"
signing.secret = "{HMAC}"
headers = {{ "X-Api-Key" = "${{HOOK_KEY}}" }}
[sinks.hec]
type = "webhook"
url = "{}"
encoding = "splunk_hec"
batch_timeout = "100ms"
auth.splunk_token_file = {:?}
"#,
        refusing.url(),
        bearer_file.display().to_string(),
        basic.url(),
        hec.url(),
        splunk_file.display().to_string(),
    ));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = [("RUST_LOG", "trace"), ("HOOK_KEY", HEADER)];
    let c = cfg.to_str().unwrap();

    let o = run_bin(&["check-config", "--config", c], &env).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let check = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert_no_secret("check-config", &check);
    assert!(check.contains("sinks.refused.auth.bearer_token_file") && check.contains("mode 0644"), "{check}");
    assert!(!check.contains("splunk_token_file: "), "a 0600 file is fine: {check}");
    assert!(check.contains("holds secrets inline and is readable by every user"), "{check}");

    let log = h.path("daemon.log");
    let daemon = spawn_daemon(&cfg, &env, Some(&log));
    wait_until("the basic and HEC receivers have everything", || {
        basic.st().accepted.len() >= 330 && hec.st().accepted.len() >= 330
    })
    .await;
    wait_until("the refusing receiver refused", || !refusing.st().requests.is_empty()).await;
    // The header and signature really were sent (so their absence from the logs means something).
    let sent = basic.st().requests[0].headers.clone();
    assert_eq!(sent.get("x-api-key").unwrap(), HEADER);
    let base = format!("http://127.0.0.1:{port}");
    let mut ops = String::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        ops.push_str(&http_get(&format!("{base}{path}")).await.1);
    }
    assert!(ops.contains("credentials refused"), "{ops}");
    assert_no_secret("the ops endpoints", &ops);
    for args in [vec!["status", "--json"], vec!["status"], vec!["dead-letters", "list"]] {
        let mut a = args.clone();
        a.extend(["--config", c]);
        let o = run_bin(&a, &env).await;
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert_no_secret(&format!("{args:?}"), &format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o)));
    }
    assert_eq!(sigterm(daemon).await, Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.len() > 10_000 && log.contains("TRACE"), "trace logging ran");
    assert!(log.contains("sinks.refused.auth.bearer_token_file"), "the daemon warns about the loose file too");
    assert_no_secret("the daemon's trace log", &log);
    // The state (records and checkpoints) is the owner's alone; the output is group-readable at most.
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777).ok();
    assert_eq!(mode(h.path("state.db")), Some(0o600));
    for side in ["state.db-wal", "state.db-shm", "state.db.lock"] {
        if let Some(m) = mode(h.path(side)) {
            assert_eq!(m & 0o077, 0, "{side} mode {m:o}");
        }
    }
    assert_eq!(mode(h.out()), Some(0o640));
}
