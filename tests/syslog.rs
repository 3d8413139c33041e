//! The syslog sink against a real rsyslogd: every format over UDP, TCP
//! (both framings) and TLS, parsed back field for field; hostile values;
//! a receiver restart; TLS verification.

mod common;

use std::collections::HashMap;

use common::cef::{cef_ext, cef_ext_start};
use common::rsyslog::Rsyslog;
use common::tls::make_certs;
use common::*;
use opsera_shipper::simulator::SimOptions;

/// (sink name = app-name, format, transport, framing, port selector)
const SINKS: [(&str, &str, &str, Option<&str>, &str); 9] = [
    ("s5424-udp", "rfc5424", "udp", None, "udp"),
    ("s5424-tcp-oc", "rfc5424", "tcp", Some("octet-counting"), "tcp"),
    ("s5424-tcp-lf", "rfc5424", "tcp", Some("lf"), "tcp"),
    ("s5424-tls", "rfc5424", "tls", None, "tls"),
    ("s3164-udp", "rfc3164", "udp", None, "udp"),
    ("s3164-tcp-lf", "rfc3164", "tcp", Some("lf"), "tcp"),
    ("cef-tcp-oc", "cef", "tcp", Some("octet-counting"), "tcp"),
    ("cef-tcp-lf", "cef", "tcp", Some("lf"), "tcp"),
    ("cef-tls", "cef", "tls", None, "tls"),
];

fn sink_toml(name: &str, format: &str, transport: &str, framing: Option<&str>, port: u16, ca: &str) -> String {
    let mut s = format!(
        "[sinks.{name}]\ntype = \"syslog\"\naddress = \"127.0.0.1:{port}\"\ntransport = \"{transport}\"\nformat = \"{format}\"\n\
         app_name = \"{name}\"\nhostname = \"shipper-test\"\nfacility = \"local4\"\nseverity = \"notice\"\n"
    );
    if let Some(f) = framing {
        s.push_str(&format!("framing = \"{f}\"\n"));
    }
    if transport == "tls" {
        s.push_str(&format!("[sinks.{name}.tls]\nca_file = {ca:?}\nserver_name = \"localhost\"\n"));
    }
    s
}

/// Hostile values: quotes, backslashes, `]`, newlines, non-ASCII, 9 KB.
fn add_hostile_records(h: &Harness) -> Vec<String> {
    let at = h.sim.now() - 10 * MINUTE;
    let js = |s: &str| serde_json::to_string(s).unwrap();
    vec![
        h.sim.add_user_with(at, &[("user_email", js("q\"uote\\back]slash@example.com"))]),
        h.sim
            .add_user_with(at, &[("secondary_action", js("line one\nline two\r\nthree")), ("type", js("pipe|line=x"))]),
        h.sim.add_user_with(at, &[("account", js("ümlaut ✓ 日本")), ("action", js("update"))]),
        h.sim.add_user_with(at, &[("description", js(&"nine-kilobytes ".repeat(620)))]),
    ]
}

fn by_app(msgs: &[serde_json::Value]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for v in msgs {
        m.entry(v["app-name"].as_str().unwrap_or("").to_string()).or_default().push(v.clone());
    }
    m
}

/// mmpstrucdata's parsed structured data (rsyslog writes it as a JSON string).
fn sd(m: &serde_json::Value) -> serde_json::Value {
    match &m["sd"] {
        serde_json::Value::String(t) => serde_json::from_str(t).unwrap_or(serde_json::Value::Null),
        v => v.clone(),
    }
}

/// The `_id` at the start of a (possibly truncated) record's JSON text.
fn id_from_prefix(text: &str) -> String {
    let rest = text.split_once("\"_id\":\"").map(|(_, r)| r).unwrap_or_else(|| panic!("no _id in {text}"));
    rest.split('"').next().unwrap().to_string()
}

const MARKER: &str = opsera_shipper::sink::syslog_format::TRUNCATION_MARKER;

/// `got` is `want`, or `want` cut with the truncation marker.
fn same_or_cut(got: &str, want: &str, what: &str) {
    if let Some(prefix) = got.strip_suffix(MARKER) {
        assert!(want.starts_with(prefix), "{what}: truncated text is not a prefix of the record");
    } else {
        assert_eq!(got, want, "{what}");
    }
}

fn record_of(served: &HashMap<String, String>, id: &str) -> serde_json::Value {
    serde_json::from_str(served.get(id).unwrap_or_else(|| panic!("unknown record {id}"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_over_udp_tcp_and_tls_parses_field_for_field() {
    let h = Harness::new(SimOptions { ..opts(120, 30) }).await;
    let hostile = add_hostile_records(&h);
    let (server, _client) = make_certs(h.dir.path(), "good");
    let rs = Rsyslog::start(h.dir.path(), Some(&server));
    let ca = server.ca.display().to_string();
    let mut sinks = String::new();
    for (name, format, transport, framing, port) in SINKS {
        let port = match port {
            "udp" => rs.udp_port,
            "tcp" => rs.tcp_port,
            _ => rs.tls_port,
        };
        sinks.push_str(&sink_toml(name, format, transport, framing, port, &ca));
    }
    let cfg = h.config_with(&sinks);
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let served = h.served();
    let expected = served.len();
    for _ in 0..300 {
        if rs.messages().len() >= expected * SINKS.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let counts: HashMap<String, usize> = by_app(&rs.messages()).into_iter().map(|(k, v)| (k, v.len())).collect();
    assert!(
        rs.messages().len() >= expected * SINKS.len(),
        "rsyslog got {counts:?}, want {expected} per sink; shipper said: {}",
        stderr(&o)
    );
    let groups = by_app(&rs.messages());
    for (name, format, _, framing, _) in SINKS {
        let msgs = groups.get(name).unwrap_or_else(|| panic!("{name}: nothing arrived"));
        let mut ids = HashMap::new();
        for m in msgs {
            assert_eq!(m["pri"], (20 * 8 + 5).to_string(), "{name}: PRI");
            assert_eq!(m["hostname"], "shipper-test", "{name}: hostname");
            let msg = m["msg"].as_str().unwrap();
            let id = match format {
                "rfc5424" => {
                    assert_eq!(m["protocol-version"], "1", "{name}");
                    let sd = &sd(m)["opsera@32473"];
                    let id = sd["_id"].as_str().unwrap_or_else(|| panic!("{name}: no _id in SD: {m}")).to_string();
                    let rec = record_of(&served, &id);
                    // TIMESTAMP = createdAt.
                    let ts = opsera_shipper::window::parse_timestamp(m["timereported"].as_str().unwrap()).unwrap();
                    let created = opsera_shipper::window::parse_timestamp(rec["createdAt"].as_str().unwrap()).unwrap();
                    assert_eq!(ts, created, "{name}: timestamp");
                    let stream = if rec.get("token_id").is_some() { "token_activity" } else { "user_activity" };
                    assert_eq!(m["msgid"], stream, "{name}: msgid");
                    assert!(m["procid"].as_str().unwrap().parse::<u32>().is_ok(), "{name}: procid");
                    // Every SD param equals the record's value (unescaped). With LF framing a line
                    // break in a value is written as the two characters \n (documented).
                    for (k, v) in sd.as_object().unwrap() {
                        if k == "stream" {
                            assert_eq!(v, stream);
                            continue;
                        }
                        let want = rec[k].as_str().unwrap().to_string();
                        let want =
                            if framing == Some("lf") { want.replace('\r', "\\r").replace('\n', "\\n") } else { want };
                        assert_eq!(v.as_str().unwrap(), want, "{name}: SD param {k}");
                    }
                    // MSG = BOM + the record's compact JSON.
                    let body = msg.trim_start_matches('\u{feff}');
                    same_or_cut(body, &served[&id], &format!("{name}: MSG"));
                    id
                }
                "rfc3164" => {
                    let body = msg.trim_start();
                    let id = id_from_prefix(body);
                    same_or_cut(body, &served[&id], &format!("{name}: MSG"));
                    id
                }
                _ => {
                    let cef = msg.trim_start();
                    assert!(cef.starts_with("CEF:0|Opsera|opsera-shipper|"), "{name}: {cef}");
                    let ext_start = cef_ext_start(cef);
                    let ext = cef_ext(&cef[ext_start..]);
                    let id = ext["externalId"].clone();
                    let rec = record_of(&served, &id);
                    same_or_cut(&ext["msg"], &served[&id], &format!("{name}: msg= holds the record"));
                    assert_eq!(
                        ext["rt"],
                        opsera_shipper::window::parse_timestamp(rec["createdAt"].as_str().unwrap())
                            .unwrap()
                            .to_string()
                    );
                    if let Some(e) = rec.get("user_email") {
                        assert_eq!(ext["suser"], e.as_str().unwrap(), "{name}: suser");
                        assert_eq!(ext["act"], rec["action"].as_str().unwrap(), "{name}: act");
                        assert_eq!(ext["cat"], rec["type"].as_str().unwrap(), "{name}: cat");
                        assert_eq!(ext["cs1"], rec["secondary_action"].as_str().unwrap(), "{name}: cs1");
                    } else {
                        assert_eq!(ext["cs4"], rec["token_id"].as_str().unwrap(), "{name}: cs4");
                        assert_eq!(ext["cs5"], rec["scope"].as_str().unwrap(), "{name}: cs5");
                    }
                    id
                }
            };
            *ids.entry(id).or_insert(0) += 1;
        }
        assert_eq!(ids.len(), expected, "{name}: every record arrives");
        assert!(ids.values().all(|n| *n == 1), "{name}: no record twice");
        for id in &hostile {
            assert!(ids.contains_key(id), "{name}: hostile record {id} arrived");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restart_mid_stream_loses_nothing_over_tcp_and_tls() {
    // A slow API makes the stream last a while, so the restart lands in the middle of it.
    let h = Harness::new(SimOptions { latency: std::time::Duration::from_millis(150), ..opts(3_000, 0) }).await;
    let (server, _) = make_certs(h.dir.path(), "good");
    let mut rs = Rsyslog::start(h.dir.path(), Some(&server));
    let ca = server.ca.display().to_string();
    let backoff = |s: String, name: &str| {
        s.replacen(&format!("[sinks.{name}]\n"), &format!("[sinks.{name}]\nmax_backoff = \"300ms\"\n"), 1)
    };
    let cfg = h.config_with(&format!(
        "[streams.token_activity]\nenabled = false\n[streams.user_activity]\npage_size = 100\ninterval = \"1s\"\n{}{}",
        backoff(sink_toml("plain", "rfc5424", "tcp", None, rs.tcp_port, &ca), "plain"),
        backoff(sink_toml("secure", "rfc5424", "tls", None, rs.tls_port, &ca), "secure"),
    ));
    let mut child = spawn_daemon(&cfg, &[], None);
    wait_until("some messages arrived", || rs.messages().len() >= 400).await;
    rs.stop();
    let at_stop = rs.messages().len();
    assert!(at_stop < 2 * 3_000, "the receiver stopped mid-stream ({at_stop} messages so far)");
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    rs.restart();
    // Distinct ids per sink (duplicates of the batch in flight are allowed).
    let counts = || {
        let (mut plain, mut secure) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for m in rs.messages() {
            if let Some(id) = sd(&m)["opsera@32473"]["_id"].as_str() {
                let set = if m["app-name"] == "plain" { &mut plain } else { &mut secure };
                set.insert(id.to_string());
            }
        }
        (plain.len(), secure.len())
    };
    wait_until("both sinks delivered everything after the restart", || counts() == (3_000, 3_000)).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = child.wait().await;
    assert_eq!(counts(), (3_000, 3_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_wrong_ca_is_refused_clearly_and_mutual_tls_works() {
    let h = Harness::new(opts(30, 0)).await;
    let (server, client) = make_certs(h.dir.path(), "good");
    let (other, _) = make_certs(h.dir.path(), "other");
    let rs = Rsyslog::start(h.dir.path(), Some(&server));
    let wrong = sink_toml("wrongca", "rfc5424", "tls", None, rs.tls_port, &other.ca.display().to_string());
    let cfg = h.config_with(&format!("[streams.token_activity]\nenabled = false\n{wrong}"));
    let o = h.run(&["once", "--timeout", "3s", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("TLS handshake") && err.contains("certificate"), "names the TLS failure: {err}");
    assert!(rs.messages().is_empty(), "nothing may reach a receiver we cannot verify");

    // Mutual TLS: the receiver requires a client certificate signed by its CA.
    let mtls = sink_toml("mutual", "rfc5424", "tls", None, rs.mtls_port, &server.ca.display().to_string())
        + &format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            client.cert.display().to_string(),
            client.key.display().to_string()
        );
    let cfg = h.config_with(&format!("[streams.token_activity]\nenabled = false\n{mtls}"));
    let o = h.run(&["once", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    for _ in 0..100 {
        if rs.messages().len() >= 30 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(rs.messages().len() >= 30, "mutual TLS: {} arrived; shipper said {}", rs.messages().len(), stderr(&o));
}

#[tokio::test]
async fn syslog_config_errors_name_the_key() {
    let r = "[api]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n[state]\npath = \"/tmp/n.db\"\n[sinks.siem]\ntype = \"syslog\"\n";
    let cases = [
        (format!("{r}address = \"nohostport\"\n"), "sinks.siem.address"),
        (format!("{r}address = \"h:514\"\ntransport = \"carrier\"\n"), "sinks.siem.transport"),
        (format!("{r}address = \"h:514\"\ntransport = \"udp\"\nframing = \"lf\"\n"), "sinks.siem.framing"),
        (format!("{r}address = \"h:514\"\nfacility = \"local9\"\n"), "sinks.siem.facility"),
        (format!("{r}address = \"h:514\"\nsd_id = \"no-at-sign\"\n"), "sinks.siem.sd_id"),
        (format!("{r}address = \"h:514\"\napp_name = \"has space\"\n"), "sinks.siem.app_name"),
        (
            format!(
                "{r}address = \"h:6514\"\ntransport = \"tls\"\n[sinks.siem.tls]\nca_file = \"/nonexistent/ca.pem\"\n"
            ),
            "sinks.siem.tls.ca_file",
        ),
    ];
    for (text, key) in cases {
        assert_config_error(&text, key).await;
    }
}
