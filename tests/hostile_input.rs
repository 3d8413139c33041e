//! Hostile input, property-tested: the response parser, the config loader
//! and the syslog/CEF/HEC formatters get arbitrary bytes and arbitrary JSON.
//! None may panic; what the parser accepts is exactly what was sent; what
//! the formatters write always parses back to the record.

use std::collections::BTreeMap;
use std::path::Path;

use opsera_shipper::config::{self, LoadOptions, SinkKind, SyslogFormat};
use opsera_shipper::opsera::{CountMeaning, parse_page};
use opsera_shipper::sink::syslog_format::{Formatter, KEY_FIELDS, TRUNCATION_MARKER};
use opsera_shipper::sink::{LineFormat, WebhookSink};
use opsera_shipper::store::JournalRow;
use proptest::prelude::*;

#[path = "common/cef.rs"]
mod cef;
use cef::{cef_ext, cef_ext_start};
use serde_json::{Value, json};

/// Arbitrary JSON (no floats: their text need not round-trip exactly).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<String>().prop_map(Value::String),
        "[\"\\\\|=\\]\\[\r\n\t ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string that hurts: separators of every format, line breaks, non-ASCII, controls.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\|=\\]\\[ \r\n\u{0}\u{1b}\u{2028}é✓\u{feff}a-z]{0,60}", ".{0,3000}",]
}

/// An audit-like record: the key fields with hostile values, sometimes
/// wrong types, plus arbitrary extra fields.
fn record() -> impl Strategy<Value = Value> {
    (
        "[0-9a-f]{24}",
        (2000i64..2100, 1u32..13, 1u32..29, 0u32..24, 0u32..60, 0u32..60, 0u32..1000),
        prop::collection::btree_map(
            prop::sample::select(KEY_FIELDS[1..].to_vec()),
            prop_oneof![nasty().prop_map(Value::String), any_json()],
            0..10,
        ),
        prop::collection::btree_map("[a-zA-Z_]{1,12}", any_json(), 0..4),
    )
        .prop_map(|(id, (y, mo, d, h, mi, s, ms), keys, extra)| {
            let mut m = serde_json::Map::new();
            for (k, v) in extra {
                m.insert(k, v);
            }
            for (k, v) in keys {
                m.insert(k.to_string(), v);
            }
            m.insert("_id".into(), json!(id));
            m.insert("createdAt".into(), json!(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")));
            Value::Object(m)
        })
}

fn row(v: &Value, stream: &str) -> JournalRow {
    let id = v["_id"].as_str().unwrap_or("x").to_string();
    let created = v["createdAt"].as_str().and_then(opsera_shipper::window::parse_timestamp).unwrap_or(0);
    JournalRow { seq: 1, stream: stream.to_string().into(), id: id.into(), created, body: v.to_string().into() }
}

fn formatter(format: SyslogFormat, max_bytes: usize, escape_line_breaks: bool) -> Formatter {
    Formatter {
        format,
        pri: 13 * 8 + 6,
        severity: 6,
        hostname: "host.example".into(),
        app_name: "opsera-shipper".into(),
        procid: "42".into(),
        sd_id: "opsera@32473".into(),
        max_bytes,
        lines: LineFormat::default(),
        escape_line_breaks,
    }
}

/// Split an RFC 5424 message into (header fields, SD params, MSG), unescaping SD values.
fn parse_5424(m: &str) -> (Vec<&str>, BTreeMap<String, String>, &str) {
    let mut head = Vec::new();
    let mut rest = m;
    for _ in 0..6 {
        let sp = rest.find(' ').expect("header field");
        head.push(&rest[..sp]);
        rest = &rest[sp + 1..];
    }
    assert!(rest.starts_with("[opsera@32473"), "SD element: {rest:.80}");
    rest = &rest["[opsera@32473".len()..];
    let mut params = BTreeMap::new();
    loop {
        if let Some(r) = rest.strip_prefix(']') {
            rest = r;
            break;
        }
        let r = rest.strip_prefix(' ').expect("space before SD param");
        let eq = r.find("=\"").expect("SD param name");
        let name = r[..eq].to_string();
        let mut value = String::new();
        let mut chars = r[eq + 2..].char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("unterminated SD value");
            match c {
                '\\' => {
                    let (_, e) = chars.next().expect("escape");
                    match e {
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        e => value.push(e),
                    }
                }
                '"' => break eq + 2 + i + 1,
                c => value.push(c),
            }
        };
        params.insert(name, value);
        rest = &r[end..];
    }
    let msg = rest.strip_prefix(" \u{feff}").expect("BOM before MSG");
    (head, params, msg)
}

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:.200}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Arbitrary bytes never panic the parser, and whatever it accepts is JSON it was sent.
    #[test]
    fn parser_survives_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..400)) {
        for meaning in [CountMeaning::Total, CountMeaning::Returned] {
            if let Ok(p) = parse_page(&bytes::Bytes::from(body.clone()), meaning) {
                for r in p.records {
                    prop_assert!(serde_json::from_str::<Value>(&r.body).is_ok());
                }
            }
        }
    }

    /// Arbitrary JSON pages: accepted pages keep every record's exact text,
    /// id and time; rejected ones say why; nothing panics.
    #[test]
    fn parser_accepts_exactly_well_formed_pages(
        items in prop::collection::vec(prop_oneof![record(), any_json()], 0..6),
        count in prop_oneof![Just(None), (0u64..10).prop_map(Some), any_json().prop_map(|v| Some(v.to_string().len() as u64))],
        pretty in any::<bool>(),
    ) {
        let mut env = serde_json::Map::new();
        if let Some(c) = count {
            env.insert("count".into(), json!(c));
        }
        env.insert("data".into(), Value::Array(items.clone()));
        let env = Value::Object(env);
        let body = if pretty { serde_json::to_string_pretty(&env).unwrap() } else { env.to_string() };
        match parse_page(&bytes::Bytes::copy_from_slice(body.as_bytes()), CountMeaning::Total) {
            Ok(p) => {
                prop_assert_eq!(p.records.len(), items.len());
                for (r, want) in p.records.iter().zip(&items) {
                    prop_assert_eq!(&parse_json(&r.body), want);
                    prop_assert_eq!(Some(r.id.as_str()), want["_id"].as_str());
                    prop_assert_eq!(Some(r.created), want["createdAt"].as_str().and_then(opsera_shipper::window::parse_timestamp));
                }
            }
            Err(e) => {
                prop_assert!(!e.is_empty());
                let all_good = items.iter().all(|v| {
                    v["_id"].as_str().is_some_and(|s| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control))
                        && v["createdAt"].as_str().and_then(opsera_shipper::window::parse_timestamp).is_some()
                });
                let count_ok = count.is_none_or(|c| c >= items.len() as u64);
                prop_assert!(!(all_good && count_ok), "a well-formed page was rejected: {}", e);
            }
        }
    }

    /// The config loader never panics on arbitrary text and always names the file.
    #[test]
    fn config_loader_survives_arbitrary_text(text in prop_oneof![
        any::<String>(),
        "[\\[\\]a-z_.=\" \n0-9{}]{0,200}",
        prop::collection::vec(("[a-z_]{1,16}(\\.[a-z_]{1,12}){0,2}", any_json()), 0..6).prop_map(|kv| {
            kv.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>()
        }),
    ]) {
        let path = Path::new("/etc/opsera-shipper/hostile.toml");
        let opts = LoadOptions { require_token: true, env: Some(Default::default()) };
        if let Err(e) = config::load_str(&text, path, &opts) {
            prop_assert!(e.to_string().contains("hostile.toml"), "{}", e);
        }
    }

    /// RFC 5424: the header is well formed, the SD carries the key fields
    /// exactly, no raw line break appears under LF framing, and MSG is the record.
    #[test]
    fn rfc5424_parses_back(v in record(), lf in any::<bool>()) {
        let r = row(&v, "user_activity");
        let m = formatter(SyslogFormat::Rfc5424, 1 << 20, lf).format(&r);
        prop_assert!(!m.truncated || v.to_string().len() > 1000);
        let text = String::from_utf8(m.bytes).unwrap();
        if lf {
            prop_assert!(!text.contains(['\n', '\r']));
        }
        let (head, sd, msg) = parse_5424(&text);
        prop_assert_eq!(head[0], "<110>1");
        prop_assert!(opsera_shipper::window::parse_timestamp(head[1]).is_some());
        prop_assert_eq!(head[5], "user_activity");
        prop_assert_eq!(sd.get("_id").map(String::as_str), v["_id"].as_str());
        prop_assert_eq!(sd.get("stream").map(String::as_str), Some("user_activity"));
        for (k, got) in &sd {
            if let Some(Value::String(want)) = v.get(k)
                && want.len() <= 1024
            {
                prop_assert_eq!(got, want);
            }
        }
        if !m.truncated {
            prop_assert_eq!(parse_json(msg), v);
        }
    }

    /// RFC 3164: a PRI, a timestamp, `host app[pid]: ` and the record as MSG.
    #[test]
    fn rfc3164_parses_back(v in record()) {
        let r = row(&v, "token_activity");
        let m = formatter(SyslogFormat::Rfc3164, 1 << 20, true).format(&r);
        let text = String::from_utf8(m.bytes).unwrap();
        prop_assert!(!text.contains(['\n', '\r']));
        let msg = text.split_once(" host.example opsera-shipper[42]: ").expect("3164 header").1;
        prop_assert!(text.starts_with("<110>"));
        prop_assert_eq!(parse_json(msg), v);
    }

    /// CEF: seven header fields, extension pairs that unescape to the key
    /// fields, and `msg` that unescapes to the record.
    #[test]
    fn cef_parses_back(v in record()) {
        let r = row(&v, "user_activity");
        let m = formatter(SyslogFormat::Cef, 1 << 20, true).format(&r);
        let text = String::from_utf8(m.bytes).unwrap();
        prop_assert!(!text.contains(['\n', '\r']));
        let cef = &text[text.find("CEF:0|").expect("CEF header")..];
        let at = cef_ext_start(cef);
        prop_assert!(at > 0, "CEF header: {:.200}", cef);
        let ext = cef_ext(&cef[at..]);
        prop_assert_eq!(ext.get("externalId").map(String::as_str), v["_id"].as_str());
        prop_assert_eq!(ext.get("cs6").map(String::as_str), Some("user_activity"));
        for (field, key) in [("user_email", "suser"), ("action", "act"), ("target", "request")] {
            if let Some(Value::String(want)) = v.get(field)
                && want.len() <= 1024
            {
                prop_assert_eq!(ext.get(key), Some(want), "{} as {}", field, key);
            }
        }
        prop_assert_eq!(parse_json(ext.get("msg").expect("msg")), v);
    }

    /// A message over the size limit is cut with the marker, stays within
    /// the limit (unless the header alone is over it) and keeps the `_id`.
    #[test]
    fn oversized_messages_are_cut_visibly(v in record(), max in 64usize..600, format in prop::sample::select(vec![SyslogFormat::Rfc5424, SyslogFormat::Rfc3164, SyslogFormat::Cef])) {
        let r = row(&v, "user_activity");
        let m = formatter(format, max, true).format(&r);
        let text = String::from_utf8(m.bytes).expect("cut on a character boundary");
        if m.truncated {
            prop_assert!(text.ends_with(TRUNCATION_MARKER));
        } else {
            prop_assert!(text.len() <= max);
        }
        if format != SyslogFormat::Rfc3164 {
            prop_assert!(text.contains(v["_id"].as_str().unwrap()));
        }
    }

    /// Splunk HEC: every line is a JSON event object whose `event` is the record.
    #[test]
    fn hec_events_parse_back(records in prop::collection::vec(record(), 1..5), stream_field in any::<bool>()) {
        let text = format!(
            "[api]\nbase_url = \"http://127.0.0.1:9\"\ntoken = \"t\"\n[sinks.hec]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/services/collector\"\nencoding = \"splunk_hec\"\n{}",
            if stream_field { "stream_field = \"stream\"\n" } else { "" }
        );
        let cfg = config::load_str(&text, Path::new("hec.toml"), &LoadOptions { require_token: true, env: Some(Default::default()) }).unwrap();
        let sink = cfg.sinks.into_iter().next().unwrap();
        let SinkKind::Webhook(w) = sink.kind else { panic!("webhook") };
        let lines = LineFormat { stream_field: sink.stream_field.clone() };
        let hook = WebhookSink::new("hec", *w, lines).unwrap();
        let rows: Vec<JournalRow> = records.iter().map(|v| row(v, "token_activity")).collect();
        let body = String::from_utf8(hook.encode(&rows)).unwrap();
        let events: Vec<Value> = body.lines().map(parse_json).collect();
        prop_assert_eq!(events.len(), records.len());
        for (e, want) in events.iter().zip(&records) {
            let mut want = want.clone();
            if stream_field && want.get("stream").is_none() {
                want["stream"] = json!("token_activity");
            }
            prop_assert_eq!(&e["event"], &want);
            prop_assert_eq!(&e["sourcetype"], &json!("opsera:token_activity"));
            prop_assert!(e["time"].is_number());
        }
    }
}

/// Deep nesting never overflows the stack: an envelope of it is refused;
/// a record with a deeply nested field is kept exactly and still formats
/// with its `_id` in the structured data.
#[test]
fn deeply_nested_json_is_refused_or_kept_never_a_crash() {
    for depth in [100_000usize, 200] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        for b in [nested.clone(), format!("{{\"count\":1,\"data\":{nested}}}")] {
            let e = parse_page(&bytes::Bytes::copy_from_slice(b.as_bytes()), CountMeaning::Total).unwrap_err();
            assert!(!e.is_empty());
        }
        let rec =
            format!("{{\"_id\":\"a\",\"createdAt\":\"2024-01-01T00:00:00Z\",\"user_email\":\"e\",\"x\":{nested}}}");
        let p = parse_page(
            &bytes::Bytes::copy_from_slice(format!("{{\"count\":1,\"data\":[{rec}]}}").as_bytes()),
            CountMeaning::Total,
        )
        .unwrap();
        assert_eq!(p.records[0].body, rec);
        let r = JournalRow { seq: 1, stream: "user_activity".into(), id: "a".into(), created: 0, body: rec.into() };
        let m = String::from_utf8(formatter(SyslogFormat::Rfc5424, 1 << 20, true).format(&r).bytes).unwrap();
        assert!(m.contains("[opsera@32473 _id=\"a\" user_email=\"e\" stream="), "{m:.200}");
        let m = String::from_utf8(formatter(SyslogFormat::Cef, 1 << 20, true).format(&r).bytes).unwrap();
        assert!(m.contains(" externalId=a "), "{m:.300}");
    }
}

/// Empty, binary and all-wrong config files name the file and the problem.
#[test]
fn empty_binary_and_all_wrong_configs_are_refused_clearly() {
    let opts = LoadOptions { require_token: true, env: Some(Default::default()) };
    let p = Path::new("/etc/x/config.toml");
    let e = config::load_str("", p, &opts).unwrap_err().to_string();
    assert!(e.contains("config.toml") && e.contains("token"), "{e}");
    let bin = String::from_utf8_lossy(&[0u8, 159, 146, 150, 0xff, 7, 0, 1, 2]).into_owned();
    let e = config::load_str(&bin, p, &opts).unwrap_err().to_string();
    assert!(e.contains("config.toml"), "{e}");
    let wrong = "[apy]\ntokn = 1\n[stat]\npth = 2\n[sink.x]\ntipe = 3\n";
    let e = config::load_str(wrong, p, &opts).unwrap_err().to_string();
    assert!(e.contains("config.toml") && e.contains("unknown field"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("binary.toml");
    std::fs::write(&f, [0u8, 159, 146, 150, 0xff]).unwrap();
    let e = config::load(&f, &opts).unwrap_err().to_string();
    assert!(e.contains("binary.toml"), "{e}");
}
