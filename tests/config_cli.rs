//! Config handling through the real binary: exit 78 and a message naming
//! the key and file; the shipped configs parse.

mod common;

use common::*;

const BASE: &str = r#"
[api]
base_url = "http://127.0.0.1:9"
token = "t"
[state]
path = "/tmp/never-opened.db"
[sinks.archive]
type = "file"
path = "/tmp/never-written.jsonl"
"#;

async fn check(text: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, text).unwrap();
    let o = run_bin(&["check-config", "--config", p.to_str().unwrap()], env).await;
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
}

#[tokio::test]
async fn bad_configs_exit_78_naming_the_key() {
    let cases: Vec<(String, &str)> = vec![
        (BASE.replace("[state]", "[state]\nmax_bufered_records = 5"), "max_bufered_records"),
        (format!("{BASE}\n[streams.user_activity]\ninterval = \"often\"\n"), "streams.user_activity.interval"),
        (BASE.replace("token = \"t\"", "token_file = \"/nonexistent/opsera-token\""), "api.token_file"),
        (BASE.replace("http://127.0.0.1:9", "http://opsera.example.com"), "api.base_url"),
        (format!("{BASE}\n[streams.user_activity]\npage_size = 5000\n"), "streams.user_activity.page_size"),
        (format!("{BASE}\n[streams.user_activity]\nmax_pages = 1\n"), "streams.user_activity.max_pages"),
        (format!("{BASE}\n[streams.audit_trail]\ninterval = \"1m\"\n"), "streams.audit_trail"),
        (BASE.replace("type = \"file\"", "type = \"carrier-pigeon\""), "carrier-pigeon"),
        (BASE.replace("token = \"t\"\n", ""), "no API token"),
        ("this is not toml".to_string(), "bad.toml"),
    ];
    for (text, key) in cases {
        let (code, _, err) = check(&text, &[]).await;
        assert_eq!(code, Some(78), "expected exit 78 for {key}: {err}");
        assert!(err.contains(key), "message should name {key}: {err}");
        assert!(err.contains("bad.toml"), "message should name the file: {err}");
    }
}

#[tokio::test]
async fn missing_config_file_is_a_config_error() {
    let o = run_bin(&["check-config", "--config", "/nonexistent/config.toml"], &[]).await;
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("/nonexistent/config.toml"));
}

#[tokio::test]
async fn environment_overrides_apply_and_check_config_masks_secrets() {
    let (code, out, err) = check(
        BASE,
        &[
            ("OPSERA_SHIPPER__API__TOKEN", "00123"),
            ("OPSERA_SHIPPER__STREAMS__USER_ACTIVITY__INTERVAL", "90s"),
            ("OPSERA_SHIPPER__API__TIMEOUT", ""),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("interval = \"1m 30s\""), "{out}");
    assert!(out.contains("environment OPSERA_SHIPPER__API__TOKEN"), "{out}");
    assert!(!out.contains("00123"), "the token must be masked: {out}");
    assert!(out.contains("timeout = \"30s\""), "an empty variable does not override: {out}");
    let (code, _, err) = check(BASE, &[("OPSERA_SHIPPER__STREAMS__USER_ACTIVITY__INTERVAL", "soon")]).await;
    assert_eq!(code, Some(78));
    assert!(err.contains("streams.user_activity.interval"), "{err}");
}

#[tokio::test]
async fn token_file_is_trimmed_and_preferred() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    std::fs::write(&tf, "  file-token \n").unwrap();
    let text = BASE.replace("token = \"t\"", &format!("token = \"t\"\ntoken_file = {:?}", tf.display().to_string()));
    let (code, out, err) = check(&text, &[("OPSERA_SHIPPER__API__TOKEN", "env-token")]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("from file {}", tf.display())), "{out}");
}

/// The shipped configs, each in a directory of its own as installed, with
/// the token file the reference config names beside it (`opsera-token`,
/// relative: next to the config, or the systemd credential of that name).
#[tokio::test]
async fn shipped_configs_parse() {
    let root = env!("CARGO_MANIFEST_DIR");
    for name in ["config/opsera-shipper.toml", "config/demo.toml"] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::copy(format!("{root}/{name}"), &p).unwrap();
        std::fs::write(dir.path().join("opsera-token"), "x\n").unwrap();
        let o = run_bin(&["check-config", "--config", p.to_str().unwrap()], &[]).await;
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
    }
}

/// A relative `api.token_file` is found next to the config, wherever the
/// command runs from, as every other path in the config is.
#[tokio::test]
async fn a_relative_token_file_is_next_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tok"), "file-token\n").unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, BASE.replace("token = \"t\"", "token_file = \"tok\"")).unwrap();
    let o = run_bin(&["check-config", "--config", p.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("from file {}", dir.path().join("tok").display())), "{}", stdout(&o));
}

#[tokio::test]
async fn worker_threads_are_checked_and_taken() {
    for bad in ["0", "65", "\"many\""] {
        let (code, _, err) = check(&format!("{BASE}\n[runtime]\nworker_threads = {bad}\n"), &[]).await;
        assert_eq!(code, Some(78), "{bad}: {err}");
        assert!(err.contains("runtime.worker_threads") && err.contains("bad.toml"), "{bad}: {err}");
    }
    let (code, out, err) = check(BASE, &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("worker_threads = 1"), "the default is one worker: {out}");
    let (code, out, err) = check(BASE, &[("OPSERA_SHIPPER__RUNTIME__WORKER_THREADS", "3")]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("worker_threads = 3"), "{out}");
    // The daemon's commands run on that many workers (here: status).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let state = dir.path().join("state.db");
    std::fs::write(
        &p,
        BASE.replace("/tmp/never-opened.db", state.to_str().unwrap()) + "[runtime]\nworker_threads = 2\n",
    )
    .unwrap();
    let o = run_bin(&["status", "--config", p.to_str().unwrap()], &[]).await;
    assert!(o.status.success(), "{}", stderr(&o));
}
