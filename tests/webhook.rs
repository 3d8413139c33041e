//! The webhook sink end to end: the real binary, the simulated Opsera API,
//! and real HTTP receivers over loopback.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::receiver::{Mode, Receiver, parse};
use common::*;
use hmac::Mac;

fn hook(r: &Receiver, extra: &str) -> String {
    format!("[sinks.hook]\ntype = \"webhook\"\nurl = {:?}\nbatch_timeout = \"100ms\"\n{extra}\n", r.url())
}

/// Assert the receiver accepted every served record exactly once, unchanged.
fn assert_received_once(r: &Receiver, served: &HashMap<String, String>) {
    let st = r.st();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for text in &st.accepted {
        let id = id_of(text);
        *seen.entry(id.clone()).or_default() += 1;
        let want = served.get(&id).unwrap_or_else(|| panic!("receiver got an unknown record {id}"));
        if r.mode == Mode::Hec {
            let a: serde_json::Value = serde_json::from_str(text).unwrap();
            let b: serde_json::Value = serde_json::from_str(want).unwrap();
            assert_eq!(a, b, "record {id} changed");
        } else {
            assert_eq!(text, want, "record {id} changed");
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(seen.len(), served.len(), "records missing at the receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_signed_batches_arrive_once_and_verify() {
    let h = Harness::new(opts(1_200, 150)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    r.st().auth = Some("Bearer hook-secret-token".into());
    let dir = h.dir.path();
    std::fs::write(dir.join("bearer"), "hook-secret-token\n").unwrap();
    std::fs::write(dir.join("sig"), "  shared-signing-secret\n").unwrap();
    let cfg = h.config(&hook(
        &r,
        &format!(
            "compression = \"gzip\"\nbatch_max_records = 100\nbatch_max_bytes = \"20KiB\"\nheaders = {{ \"X-Env\" = \"prod\" }}\n\
             [sinks.hook.auth]\nbearer_token_file = {:?}\n[sinks.hook.signing]\nsecret_file = {:?}\n",
            dir.join("bearer").display().to_string(),
            dir.join("sig").display().to_string()
        ),
    ));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
    h.assert_exactly_once(); // the file sink beside it too
    let st = r.st();
    assert!(st.requests.len() >= 1_350 / 100);
    for req in &st.requests {
        assert!(req.records <= 100, "batch_max_records exceeded: {}", req.records);
        assert!(req.body.len() <= 20 * 1024, "batch_max_bytes exceeded: {}", req.body.len());
        assert_eq!(req.headers["x-env"], "prod");
        assert_eq!(
            req.headers["content-length"].to_str().unwrap(),
            req.raw.len().to_string(),
            "sent with Content-Length"
        );
        assert!(req.headers.get("transfer-encoding").is_none(), "not chunked");
        // t=<secs>,v1=<hex HMAC-SHA256("<t>.<body as sent>")>
        let sig = req.headers["x-opsera-signature"].to_str().unwrap();
        let (t, v1) = sig.strip_prefix("t=").unwrap().split_once(",v1=").unwrap();
        let verify = |secret: &[u8]| {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(&req.raw);
            mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
        };
        assert!(verify(b"shared-signing-secret"), "signature does not verify");
        assert!(!verify(b"wrong-secret"), "a wrong secret must fail verification");
    }
}

/// A proxy in the environment (as on a machine behind a corporate proxy)
/// is for other hosts: the API and a receiver on this host are reached
/// directly, and the ops endpoints' probe too. (A proxy on port 9 answers
/// nothing: anything sent through it would fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_proxy_is_not_used_for_this_host() {
    let h = Harness::new(opts(300, 0)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    let port = free_port();
    let cfg = h.config(&format!(
        "{}[server]\nlisten = \"127.0.0.1:{port}\"\n",
        hook(&r, "[streams.token_activity]\nenabled = false\n")
    ));
    let c = cfg.to_str().unwrap();
    let proxy = [
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("http_proxy", "http://127.0.0.1:9"),
        ("ALL_PROXY", "http://127.0.0.1:9"),
    ];
    let o = run_bin(&["once", "--config", c], &proxy).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
    h.assert_exactly_once();
    let daemon = spawn_daemon(&cfg, &proxy, None);
    wait_until("the daemon is ready", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    let mut code = None;
    for _ in 0..50 {
        code = run_bin(&["health", "--config", c], &proxy).await.status.code();
        if code == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(code, Some(0), "the probe reached the ops endpoints directly");
    assert_eq!(sigterm(daemon).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_array_and_basic_auth() {
    let h = Harness::new(SimOptions { pretty: true, ..opts(300, 40) }).await;
    let r = Receiver::start(Mode::JsonArray).await;
    r.st().auth = Some("Basic dXNlcjpwYXNz".into()); // user:pass
    let dir = h.dir.path();
    std::fs::write(dir.join("pw"), "pass\n").unwrap();
    let cfg = h.config(&hook(
        &r,
        &format!(
            "encoding = \"json_array\"\n[sinks.hook.auth]\nbasic_user = \"user\"\nbasic_password_file = {:?}\n",
            dir.join("pw").display().to_string()
        ),
    ));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_hec_with_a_poison_record_dead_letters_only_it_and_retries_it() {
    let h = Harness::new(opts(400, 60)).await;
    let r = Receiver::start(Mode::Hec).await;
    r.st().auth = Some("Splunk hec-token-123".into());
    let poison = h.sim.user_records()[137].0.clone();
    r.st().poison = Some(poison.clone());
    let cfg = h.config(&hook(
        &r,
        "encoding = \"splunk_hec\"\nbatch_max_records = 200\n[sinks.hook.auth]\nsplunk_token = \"hec-token-123\"\n\
         [sinks.hook.splunk]\nindex = \"opsera\"\nsource = \"opsera-shipper\"\n",
    ));
    let c = cfg.to_str().unwrap();
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut served = h.served();
    served.remove(&poison);
    assert_received_once(&r, &served);
    {
        let st = r.st();
        for env in &st.envelopes {
            assert_eq!(env["index"], "opsera");
            assert_eq!(env["source"], "opsera-shipper");
            let ev = &env["event"];
            let stream = if ev.get("token_id").is_some() { "token_activity" } else { "user_activity" };
            assert_eq!(env["sourcetype"], format!("opsera:{stream}"));
            let created = opsera_shipper::window::parse_timestamp(ev["createdAt"].as_str().unwrap()).unwrap();
            assert_eq!(env["time"].as_f64().unwrap(), created as f64 / 1000.0);
        }
    }
    // The poison record is a dead letter, shown by status and dead-letters list.
    let st = status_json(&h, &cfg).await;
    let sink = st["sinks"].as_array().unwrap().iter().find(|s| s["name"] == "hook").unwrap().clone();
    assert_eq!(sink["dead_letters"], 1);
    let o = h.run(&["dead-letters", "list", "--config", c]).await;
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(list.contains(&poison) && list.contains("400") && list.contains("Invalid data format"), "{list}");
    // Once the receiver accepts it, a retry delivers it and clears the dead letter.
    r.st().poison = None;
    let o = h.run(&["dead-letters", "retry", "--id", &poison, "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = h.run(&["once", "--config", c]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
    let o = h.run(&["dead-letters", "list", "--json", "--config", c]).await;
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(), serde_json::json!([]));
}

/// Splunk itself indexes the events of a refused batch before the one it
/// names. With `splunk.assume_prefix_indexed` they are not sent again, and
/// every record arrives once; without it (the default, for receivers that
/// keep nothing of a refused batch) exactly those arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_keeping_the_events_before_a_refused_one_gets_them_once_when_told() {
    for assume in [true, false] {
        let h = Harness::new(opts(400, 0)).await;
        let r = Receiver::start(Mode::Hec).await;
        let poison = h.sim.user_records()[137].0.clone();
        {
            let mut st = r.st();
            (st.poison, st.keeps_prefix) = (Some(poison.clone()), true);
        }
        let cfg = h.config(&hook(
            &r,
            &format!(
                "encoding = \"splunk_hec\"\nbatch_max_records = 200\n[streams.token_activity]\nenabled = false\n\
                 [sinks.hook.splunk]\nassume_prefix_indexed = {assume}\n"
            ),
        ));
        let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let mut served = h.served();
        served.remove(&poison);
        let (accepted, refused_at) = {
            let st = r.st();
            (st.accepted.clone(), st.refused_at.clone())
        };
        let ids: Vec<String> = accepted.iter().map(|t| id_of(t)).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), served.len(), "every record but the poison arrived");
        // The first refusal named the poison's place in its batch of 200; the
        // split that follows sends it alone (refused at 0).
        assert!(refused_at.len() >= 2 && refused_at[1..].iter().all(|i| *i == 0), "{refused_at:?}");
        let twice = ids.len() - unique.len();
        assert_eq!(twice, if assume { 0 } else { refused_at[0] }, "assume_prefix_indexed = {assume}");
        if assume {
            assert_received_once(&r, &served);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_400_is_narrowed_down_by_splitting() {
    let h = Harness::new(opts(250, 0)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    let poison = h.sim.user_records()[42].0.clone();
    r.st().poison = Some(poison.clone());
    // An ndjson receiver's 400 names no record: the batch is bisected.
    let cfg = h.config(&hook(&r, "batch_max_records = 250\n[streams.token_activity]\nenabled = false\n"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut served = h.served();
    served.remove(&poison);
    assert_received_once(&r, &served);
    let st = status_json(&h, &cfg).await;
    let sink = st["sinks"].as_array().unwrap().iter().find(|s| s["name"] == "hook").unwrap().clone();
    assert_eq!(sink["dead_letters"], 1, "only the poison record is condemned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_garbage_is_retried_and_loses_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new(opts(80, 0)).await;
    // Not HTTP at all, a malformed status line, and a 200 whose body is noise.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        let answers: [&[u8]; 3] = [
            b"\x00\xffSSH-2.0-not-http\r\n\r\n",
            b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 500 Oops\r\ncontent-length: 9\r\n\r\n\x00\x01{]]]garb",
        ];
        for i in 0.. {
            let Ok((mut s, _)) = garbage.accept().await else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answers[i % answers.len()]).await;
            let _ = s.shutdown().await;
        }
    });
    let url = format!("http://{addr}/ingest");
    let cfg = h.config(&format!(
        "[sinks.hook]\ntype = \"webhook\"\nurl = {url:?}\nbatch_timeout = \"100ms\"\nmax_backoff = \"200ms\"\n\
         [streams.token_activity]\nenabled = false\n"
    ));
    let o = h.run(&["once", "--timeout", "3s", "--config", cfg.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&format!("{url}: request failed")) && err.contains("invalid HTTP"), "{err}");
    assert!(err.contains(&format!("{url} answered HTTP 500")), "{err}");
    assert!(!err.contains('\x1b'), "no terminal colours in logs that go to a file: {err}");
    let st = status_json(&h, &cfg).await;
    let sink = st["sinks"].as_array().unwrap().iter().find(|s| s["name"] == "hook").unwrap().clone();
    assert_eq!(sink["dead_letters"], 0, "garbage is not a verdict on the records: {sink}");
    // The same sink at a real receiver: everything arrives, once.
    let r = Receiver::start(Mode::Ndjson).await;
    let cfg = h.config(&hook(&r, "[streams.token_activity]\nenabled = false\n"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let h = Harness::new(opts(20, 0)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    r.st().script.push_back((429, Some(2)));
    let cfg = h.config(&hook(&r, "[streams.token_activity]\nenabled = false\n"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let st = r.st();
    assert!(st.requests.len() >= 2);
    let gap = st.requests[1].at - st.requests[0].at;
    assert!(gap >= Duration::from_secs(2), "retried {gap:?} after a 429 with Retry-After: 2");
}

/// A receiver that takes only `Bearer new-token`, and a config whose sink
/// reads its bearer token from the file returned (not written yet).
async fn bearer_token_setup() -> (Harness, Receiver, std::path::PathBuf, std::path::PathBuf) {
    let h = Harness::new(opts(50, 0)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    r.st().auth = Some("Bearer new-token".into());
    let tf = h.path("bearer");
    let cfg = h.config(&hook(
        &r,
        &format!(
            "[streams.token_activity]\nenabled = false\n[sinks.hook.auth]\nbearer_token_file = {:?}\n",
            tf.display().to_string()
        ),
    ));
    (h, r, tf, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_hold_the_sink_and_lose_nothing() {
    let (h, r, tf, cfg) = bearer_token_setup().await;
    std::fs::write(&tf, "old-token\n").unwrap();
    let o = h.run(&["once", "--timeout", "2s", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("refused sinks.hook.auth credentials"), "{}", stderr(&o));
    let st = status_json(&h, &cfg).await;
    let sink = st["sinks"].as_array().unwrap().iter().find(|s| s["name"] == "hook").unwrap().clone();
    assert_eq!(sink["dead_letters"], 0, "records are never condemned for a 401");
    assert!(sink["last_error"].as_str().unwrap().contains("401"), "status shows why: {sink}");
    // The secret rotated on disk: the next run delivers everything.
    std::fs::write(&tf, "new-token\n").unwrap();
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
}

/// A credential file rewritten during a run without its modification time
/// changing (as when it is rewritten within one tick of the file system's
/// clock): the refusal makes the sink read it again, and the records go out
/// in the same run, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_is_read_again_even_when_its_file_time_is_unchanged() {
    let (h, r, tf, cfg) = bearer_token_setup().await;
    let write = |value: &str| {
        std::fs::write(&tf, value).unwrap();
        let stamp = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(&tf).unwrap().set_modified(stamp).unwrap();
    };
    write("old-token\n");
    let args: Vec<String> = ["once", "--timeout", "60s", "--config", cfg.to_str().unwrap()].map(String::from).into();
    let run = tokio::spawn(async move { run_bin(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await });
    wait_until("the receiver refused the old token", || r.st().requests.iter().any(|q| q.status == 401)).await;
    write("new-token\n");
    let o = run.await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
}

/// HTTPS end to end: a receiver whose certificate only `tls.ca_file`
/// trusts, then one that requires a client certificate. A sink that trusts
/// another CA fails the handshake, says why, and keeps its records until
/// the right CA is configured; nothing is lost or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_client_certificates_delivers_once() {
    let h = Harness::new(opts(300, 0)).await;
    let (server, client) = common::tls::make_certs(h.dir.path(), "hook");
    let (other, _) = common::tls::make_certs(h.dir.path(), "other");
    let tls = |ca: &std::path::Path, client_cert: bool| {
        let mut t = format!("[sinks.hook.tls]\nca_file = {:?}\n", ca.display().to_string());
        if client_cert {
            t += &format!(
                "cert_file = {:?}\nkey_file = {:?}\n",
                client.cert.display().to_string(),
                client.key.display().to_string()
            );
        }
        t
    };
    let r = Receiver::start_tls(Mode::Ndjson, &server, None).await;
    assert!(r.url().starts_with("https://"));
    let one = "[streams.token_activity]\nenabled = false\n";
    // A CA that did not sign the receiver's certificate: refused, kept.
    let cfg = h.config(&hook(&r, &format!("{one}{}", tls(&other.ca, false))));
    let o = h.run(&["once", "--timeout", "2s", "--config", cfg.to_str().unwrap()]).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(75), "{err}");
    assert!(err.contains(&r.url()) && err.to_lowercase().contains("certificate"), "names the URL and why: {err}");
    assert!(!err.contains("ERROR failed to verify"), "one report, with the URL: {err}");
    assert!(r.st().accepted.is_empty());
    // The right CA: everything, once.
    let cfg = h.config(&hook(&r, &format!("{one}{}", tls(&server.ca, false))));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());

    // Mutual TLS: without a client certificate the receiver refuses the
    // handshake; with one, it accepts.
    let h = Harness::new(opts(200, 0)).await;
    let r = Receiver::start_tls(Mode::Ndjson, &server, Some(&server.ca)).await;
    let cfg = h.config(&hook(&r, &format!("{one}{}", tls(&server.ca, false))));
    let o = h.run(&["once", "--timeout", "2s", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(r.st().accepted.is_empty());
    let cfg = h.config(&hook(&r, &format!("{one}{}", tls(&server.ca, true))));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_received_once(&r, &h.served());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_holds_back_only_its_sink_and_loses_nothing() {
    let h = Harness::new(opts(600, 60)).await;
    let r = Receiver::start(Mode::Ndjson).await;
    // First the receiver answers 503 for a while...
    for _ in 0..4 {
        r.st().script.push_back((503, None));
    }
    let cfg = h.config(&hook(
        &r,
        "batch_max_records = 50\nmax_backoff = \"500ms\"\n[streams.user_activity]\ninterval = \"1s\"\n[streams.token_activity]\ninterval = \"1s\"\n",
    ));
    let mut child = spawn_daemon(&cfg, &[], None);
    wait_until("the receiver answered 503 four times", || r.st().script.is_empty()).await;
    // ...then goes away entirely, while the file sink keeps delivering...
    r.stop().await;
    wait_until("the file sink delivered the backlog", || h.lines_so_far().len() >= 660).await;
    let more = h.sim.add_user_at(25, h.sim.now() - 3 * MINUTE);
    wait_until("the file sink delivered new records", || {
        let ids: Vec<String> = h.lines_so_far().iter().map(|l| id_of(l)).collect();
        more.iter().all(|m| ids.contains(m))
    })
    .await;
    // ...then comes back, and the webhook catches up from the journal.
    r.restart().await;
    wait_until("the receiver caught up", || r.st().accepted.len() >= 685).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(r.st().requests.iter().filter(|q| q.status == 503).count(), 4);
    assert_received_once(&r, &h.served());
    h.assert_exactly_once();
}

#[tokio::test]
async fn webhook_config_errors_name_the_key() {
    let r = "[api]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n[state]\npath = \"/tmp/n.db\"\n[sinks.hook]\ntype = \"webhook\"\n";
    let cases = [
        (format!("{r}url = \"http://collector.example.com/x\"\n"), "sinks.hook.url"),
        (format!("{r}url = \"https://c.example.com/x\"\nencoding = \"xml\"\n"), "sinks.hook.encoding"),
        (
            format!("{r}url = \"https://c.example.com/x\"\nheaders = {{ \"X-T\" = \"${{NOPE_NOT_SET}}\" }}\n"),
            "NOPE_NOT_SET",
        ),
        (format!("{r}url = \"https://c.example.com/x\"\n[sinks.hook.auth]\nsplunk_token = \"x\"\n"), "splunk_hec"),
        (
            format!("{r}url = \"https://c.example.com/x\"\n[sinks.hook.signing]\nsecret_file = \"/nonexistent/s\"\n"),
            "sinks.hook.signing.secret_file",
        ),
        (format!("{r}url = \"https://c.example.com/x\"\nbatch_max_records = 0\n"), "sinks.hook.batch_max_records"),
    ];
    for (text, key) in cases {
        assert_config_error(&text, key).await;
    }
    // A header may reference the environment; check-config masks it.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!("{r}url = \"https://c.example.com/x?sig=1\"\nheaders = {{ \"X-T\" = \"Bearer ${{HOOK_TOK}}\" }}\n"),
    )
    .unwrap();
    let o = run_bin(&["check-config", "--config", p.to_str().unwrap()], &[("HOOK_TOK", "zzsecretzz")]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("zzsecretzz"));
}

#[test]
fn receiver_parses_what_it_is_sent() {
    let (recs, _) = parse(Mode::Ndjson, b"{\"_id\":\"a\"}\n");
    assert_eq!(recs[0].0, "a");
}

use opsera_shipper::simulator::SimOptions;
