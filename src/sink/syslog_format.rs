//! Syslog message formatting: RFC 5424, RFC 3164 and CEF, pure functions.
//!
//! - RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] BOM MSG`;
//!   TIMESTAMP is the record's `createdAt`; MSGID is the stream's name;
//!   SD carries the record's key fields (`"`, `\` and `]` escaped); MSG is
//!   the record's compact JSON.
//! - RFC 3164: `<PRI>Mmm dd hh:mm:ss HOSTNAME APP[PID]: MSG` (UTC).
//! - CEF: `CEF:0|Opsera|opsera-shipper|VERSION|SIGNATURE|NAME|SEVERITY|EXT`
//!   as the MSG of an RFC 3164 line.
//!
//! No message ever holds a raw CR or LF (JSON text has none; SD values and
//! CEF extensions escape them), so LF framing cannot be broken. A message
//! over the size limit is cut with a visible marker, never silently; the
//! record's `_id` always stays in the structured data or extension.

use std::borrow::Cow;

use super::LineFormat;
use crate::config::{SyslogConfig, SyslogFormat};
use crate::store::JournalRow;
use crate::window::fmt_rfc3339;

/// Appended where a message was cut.
pub const TRUNCATION_MARKER: &str = "...[truncated by opsera-shipper]";
/// SD parameter values longer than this are cut (with the marker).
const SD_VALUE_CAP: usize = 1024;
/// The record fields carried as structured data (and mapped in CEF), when present.
pub const KEY_FIELDS: [&str; 11] = [
    "_id",
    "user_id",
    "user_email",
    "type",
    "action",
    "secondary_action",
    "target_id",
    "account",
    "token_id",
    "scope",
    "target",
];

/// Formats records for one syslog sink.
#[derive(Debug, Clone)]
pub struct Formatter {
    pub format: SyslogFormat,
    pub pri: u8,
    pub severity: u8,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub sd_id: String,
    pub max_bytes: usize,
    pub lines: LineFormat,
    /// Write CR/LF in SD values as `\r`/`\n` (LF framing, where a raw line
    /// break would end the message); octet counting keeps values exact.
    pub escape_line_breaks: bool,
}

/// One formatted message (without framing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl Formatter {
    pub fn new(cfg: &SyslogConfig, lines: LineFormat) -> Self {
        Self {
            format: cfg.format,
            pri: cfg.facility * 8 + cfg.severity,
            severity: cfg.severity,
            hostname: cfg.hostname.clone(),
            app_name: cfg.app_name.clone(),
            procid: std::process::id().to_string(),
            sd_id: cfg.sd_id.clone(),
            max_bytes: cfg.max_message_bytes,
            lines,
            escape_line_breaks: cfg.transport != crate::config::Transport::Udp
                && cfg.framing == crate::config::Framing::Lf,
        }
    }

    pub fn format(&self, row: &JournalRow) -> Message {
        let json = self.lines.line(row);
        let json = json.as_ref();
        let fields = key_fields(&row.body);
        match self.format {
            SyslogFormat::Rfc5424 => self.rfc5424(row, &fields, json),
            SyslogFormat::Rfc3164 => self.rfc3164(row, json),
            SyslogFormat::Cef => self.cef(row, &fields, json),
        }
    }

    fn rfc5424(&self, row: &JournalRow, fields: &[(&'static str, Cow<str>)], json: &str) -> Message {
        let mut sd_truncated = false;
        let mut sd = format!("[{}", self.sd_id);
        for (k, v) in fields.iter().map(|(k, v)| (*k, v.as_ref())).chain([("stream", &*row.stream)]) {
            let (v, cut) = cap(v, SD_VALUE_CAP);
            sd_truncated |= cut;
            sd.push(' ');
            sd.push_str(k);
            sd.push_str("=\"");
            sd.push_str(&escape_sd(&v, self.escape_line_breaks));
            sd.push('"');
        }
        sd.push(']');
        let head = format!(
            "<{}>1 {} {} {} {} {} {} \u{feff}",
            self.pri,
            fmt_rfc3339(row.created),
            self.hostname,
            self.app_name,
            self.procid,
            msgid(&row.stream),
            sd
        );
        let mut m = fit(head, json, self.max_bytes);
        m.truncated |= sd_truncated;
        m
    }

    fn rfc3164(&self, row: &JournalRow, json: &str) -> Message {
        fit(self.header3164(row), json, self.max_bytes)
    }

    fn header3164(&self, row: &JournalRow) -> String {
        let t = chrono::DateTime::from_timestamp_millis(row.created).unwrap_or_default();
        format!("<{}>{} {} {}[{}]: ", self.pri, t.format("%b %e %H:%M:%S"), self.hostname, self.app_name, self.procid)
    }

    fn cef(&self, row: &JournalRow, fields: &[(&'static str, Cow<str>)], json: &str) -> Message {
        let get = |k: &str| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_ref());
        let (signature, name) = match (get("type"), get("action"), get("token_id")) {
            (_, _, Some(_)) => (
                get("scope").map_or_else(|| row.stream.to_string(), |s| format!("token.{s}")),
                "Opsera token activity".into(),
            ),
            (Some(t), Some(a), None) => (format!("{t}.{a}"), format!("Opsera {t} {a}")),
            _ => (row.stream.to_string(), format!("Opsera {}", row.stream.replace('_', " "))),
        };
        let mut ext = format!("rt={}", row.created);
        let mut push = |k: &str, v: &str| {
            ext.push(' ');
            ext.push_str(k);
            ext.push('=');
            ext.push_str(&escape_cef_ext(&cap(v, SD_VALUE_CAP).0));
        };
        for (field, key, label) in [
            ("_id", "externalId", None),
            ("user_id", "suid", None),
            ("user_email", "suser", None),
            ("action", "act", None),
            ("type", "cat", None),
            ("secondary_action", "cs1", Some("secondaryAction")),
            ("target_id", "cs2", Some("targetId")),
            ("account", "cs3", Some("account")),
            ("token_id", "cs4", Some("tokenId")),
            ("scope", "cs5", Some("scope")),
            ("target", "request", None),
        ] {
            if let Some(v) = get(field) {
                if let Some(l) = label {
                    push(&format!("{key}Label"), l);
                }
                push(key, v);
            }
        }
        push("cs6Label", "stream");
        push("cs6", &row.stream);
        let head = format!(
            "{}CEF:0|Opsera|opsera-shipper|{}|{}|{}|{}|{} msg=",
            self.header3164(row),
            env!("CARGO_PKG_VERSION"),
            escape_cef_header(&signature),
            escape_cef_header(&name),
            cef_severity(self.severity),
            ext
        );
        fit_with(head, json, self.max_bytes, escape_cef_ext)
    }
}

/// MSGID: the stream's name (≤ 32 printable ASCII).
fn msgid(stream: &str) -> Cow<'_, str> {
    let clean: String = stream.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
    if clean.is_empty() { Cow::Borrowed("-") } else { Cow::Owned(clean) }
}

/// The record's top-level key fields that are strings, numbers or
/// booleans, in `KEY_FIELDS` order (numbers keep their original text).
/// One streaming pass over the record: other fields are skipped without
/// being built, so a record nested deeper than serde_json's recursion
/// limit still yields its `_id`; of repeated keys the last one wins.
fn key_fields(body: &str) -> Vec<(&'static str, Cow<'_, str>)> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;

    #[derive(serde::Deserialize)]
    struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

    struct Fields;
    impl<'de> Visitor<'de> for Fields {
        type Value = [Option<&'de RawValue>; KEY_FIELDS.len()];
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; KEY_FIELDS.len()];
            while let Some(Key(k)) = map.next_key()? {
                match KEY_FIELDS.iter().position(|f| *f == k) {
                    Some(i) => found[i] = Some(map.next_value()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }

    let Ok(found) = serde_json::Deserializer::from_str(body).deserialize_map(Fields) else {
        return Vec::new();
    };
    KEY_FIELDS
        .iter()
        .zip(found)
        .filter_map(|(k, raw)| {
            let text = raw?.get();
            let value = match text.as_bytes().first()? {
                b'"' => serde_json::from_str::<Key>(text).ok()?.0,
                b't' | b'f' | b'-' | b'0'..=b'9' => Cow::Borrowed(text),
                _ => return None,
            };
            Some((*k, value))
        })
        .collect()
}

/// Copy `v`, replacing each byte for which `rule` gives a replacement;
/// borrowed when nothing needs replacing. Every special character is ASCII,
/// so runs between them are copied whole and UTF-8 stays intact.
fn escape_with(v: &str, rule: impl Fn(u8) -> Option<&'static str>) -> Cow<'_, str> {
    let bytes = v.as_bytes();
    let Some(first) = bytes.iter().position(|b| rule(*b).is_some()) else {
        return Cow::Borrowed(v);
    };
    let mut o = String::with_capacity(v.len() + 16);
    o.push_str(&v[..first]);
    let mut run = first;
    for (i, b) in bytes.iter().enumerate().skip(first) {
        if let Some(rep) = rule(*b) {
            o.push_str(&v[run..i]);
            o.push_str(rep);
            run = i + 1;
        }
    }
    o.push_str(&v[run..]);
    Cow::Owned(o)
}

/// RFC 5424 PARAM-VALUE escaping (`"`, `\`, `]`); with `line_breaks`, CR and
/// LF are also written as `\r`/`\n`, so no message holds a raw line break.
pub fn escape_sd(v: &str, line_breaks: bool) -> Cow<'_, str> {
    escape_with(v, |b| match b {
        b'"' => Some("\\\""),
        b'\\' => Some("\\\\"),
        b']' => Some("\\]"),
        b'\n' if line_breaks => Some("\\n"),
        b'\r' if line_breaks => Some("\\r"),
        _ => None,
    })
}

/// CEF header escaping: `\` and `|`; line breaks become spaces.
pub fn escape_cef_header(v: &str) -> Cow<'_, str> {
    escape_with(v, |b| match b {
        b'\\' => Some("\\\\"),
        b'|' => Some("\\|"),
        b'\n' | b'\r' => Some(" "),
        _ => None,
    })
}

/// CEF extension value escaping: `\`, `=`, and line breaks as `\n`/`\r`.
pub fn escape_cef_ext(v: &str) -> Cow<'_, str> {
    escape_with(v, |b| match b {
        b'\\' => Some("\\\\"),
        b'=' => Some("\\="),
        b'\n' => Some("\\n"),
        b'\r' => Some("\\r"),
        _ => None,
    })
}

fn cef_severity(syslog_severity: u8) -> u8 {
    match syslog_severity {
        0 | 1 => 10,
        2 => 9,
        3 => 7,
        4 => 5,
        5 => 4,
        6 => 3,
        _ => 1,
    }
}

/// At most `n` bytes of `s` (on a character boundary), with the marker when cut.
fn cap(s: &str, n: usize) -> (Cow<'_, str>, bool) {
    if s.len() <= n {
        return (Cow::Borrowed(s), false);
    }
    let mut end = n.saturating_sub(TRUNCATION_MARKER.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (Cow::Owned(format!("{}{TRUNCATION_MARKER}", &s[..end])), true)
}

/// `head` + `body`, cutting `body` (with the marker) to stay within `max` bytes.
fn fit(head: String, body: &str, max: usize) -> Message {
    fit_with(head, body, max, |s: &str| Cow::Borrowed(s))
}

fn fit_with(mut head: String, body: &str, max: usize, esc: impl Fn(&str) -> Cow<'_, str>) -> Message {
    let full = esc(body);
    if head.len() + full.len() <= max {
        head.push_str(&full);
        return Message { bytes: head.into_bytes(), truncated: false };
    }
    let room = max.saturating_sub(head.len() + TRUNCATION_MARKER.len());
    // Cut the unescaped body, then escape: the escaped cut may be longer, so shrink until it fits.
    let mut end = room.min(body.len());
    loop {
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        let part = esc(&body[..end]);
        if part.len() <= room || end == 0 {
            head.push_str(&part);
            break;
        }
        end = end.saturating_sub((part.len() - room).max(1));
    }
    // When even the header is over the limit it is kept whole (it holds the _id): better long than lost.
    head.push_str(TRUNCATION_MARKER);
    Message { bytes: head.into_bytes(), truncated: true }
}

/// RFC 5425/6587 octet counting: `LEN SP MSG`.
pub fn frame_octet(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

/// LF framing: `MSG LF`.
pub fn frame_lf(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(msg);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fmt(format: SyslogFormat, max: usize) -> Formatter {
        Formatter {
            format,
            pri: 20 * 8 + 6,
            severity: 6,
            hostname: "host-1".into(),
            app_name: "opsera-shipper".into(),
            procid: "42".into(),
            sd_id: "opsera@32473".into(),
            max_bytes: max,
            lines: LineFormat::default(),
            escape_line_breaks: true,
        }
    }

    fn row(body: &str) -> JournalRow {
        JournalRow {
            seq: 1,
            stream: "user_activity".into(),
            id: "x".into(),
            created: 1_627_661_632_109,
            body: body.into(),
        }
    }

    /// RFC 5424 PARAM-VALUE unescaping, as a receiver does it.
    fn unescape_sd(v: &str) -> String {
        let mut o = String::new();
        let mut it = v.chars().peekable();
        while let Some(c) = it.next() {
            if c == '\\' && matches!(it.peek(), Some('"' | '\\' | ']')) {
                o.push(it.next().unwrap_or_default());
            } else {
                o.push(c);
            }
        }
        o
    }

    #[test]
    fn rfc5424_layout() {
        let m = fmt(SyslogFormat::Rfc5424, 65536).format(&row(
            r#"{"_id":"61042540e1d666c9ded178c4","user_email":"a\"b]c\\d","type":"pipeline","action":"update","createdAt":"2021-07-30T16:13:52.109Z"}"#,
        ));
        let s = String::from_utf8(m.bytes).unwrap();
        assert!(s.starts_with(
            "<166>1 2021-07-30T16:13:52.109Z host-1 opsera-shipper 42 user_activity [opsera@32473 _id=\"61042540e1d666c9ded178c4\" user_email=\"a\\\"b\\]c\\\\d\" type=\"pipeline\" action=\"update\" stream=\"user_activity\"] \u{feff}{\"_id\""
        ), "{s}");
        assert!(!m.truncated);
    }

    #[test]
    fn cef_layout_and_escaping() {
        let m = fmt(SyslogFormat::Cef, 65536).format(&row(
            r#"{"_id":"i1","user_id":"u","user_email":"e=1","type":"pi|pe","action":"run","createdAt":"x"}"#,
        ));
        let s = String::from_utf8(m.bytes).unwrap();
        assert!(s.contains("CEF:0|Opsera|opsera-shipper|"), "{s}");
        assert!(
            s.contains(
                "|pi\\|pe.run|Opsera pi\\|pe run|3|rt=1627661632109 externalId=i1 suid=u suser=e\\=1 act=run cat=pi|pe"
            ),
            "{s}"
        );
        assert!(s.contains(" msg={\"_id\"\\=") || s.contains(" msg={\"_id\":"), "{s}");
    }

    #[test]
    fn oversized_message_is_cut_visibly_and_keeps_the_id() {
        let big = "x".repeat(5000);
        let body = format!(r#"{{"_id":"keep-me","createdAt":"x","v":"{big}"}}"#);
        for f in [SyslogFormat::Rfc5424, SyslogFormat::Rfc3164, SyslogFormat::Cef] {
            let m = fmt(f, 2048).format(&row(&body));
            assert!(m.truncated, "{f:?}");
            assert!(m.bytes.len() <= 2048, "{f:?}: {}", m.bytes.len());
            let s = String::from_utf8(m.bytes).unwrap();
            assert!(s.ends_with(TRUNCATION_MARKER), "{f:?}");
            if f != SyslogFormat::Rfc3164 {
                assert!(s.contains("keep-me"), "{f:?}: the _id survives in SD/extension");
            }
        }
    }

    proptest! {
        /// SD escaping round-trips through a receiver's unescaping, and never leaves a raw line break.
        #[test]
        fn sd_escaping_round_trips(v in "[a-z\"\\\\\\]ü✓ =\n]{0,40}") {
            let e = escape_sd(&v, false);
            prop_assert_eq!(unescape_sd(&e), v.clone());
            let with_break = format!("{}\n", v);
            prop_assert!(!escape_sd(&with_break, true).contains('\n'));
        }

        /// No format ever puts a raw CR/LF in a message, and every message fits the limit
        /// (records with a short enough header).
        #[test]
        fn messages_have_no_line_breaks_and_fit(
            email in "[a-z\n\r\"\\]|=ü]{0,30}",
            pad in 0usize..4000,
            max in 600usize..3000,
        ) {
            let body = serde_json::json!({"_id": "abc", "user_email": email, "type": "t\n", "action": "a|=", "createdAt": "x", "pad": "p".repeat(pad)}).to_string();
            for f in [SyslogFormat::Rfc5424, SyslogFormat::Rfc3164, SyslogFormat::Cef] {
                let m = fmt(f, max).format(&row(&body));
                prop_assert!(!m.bytes.contains(&b'\n') && !m.bytes.contains(&b'\r'));
                prop_assert!(m.bytes.len() <= max, "{:?}: {} > {}", f, m.bytes.len(), max);
                prop_assert!(std::str::from_utf8(&m.bytes).is_ok());
            }
        }

        #[test]
        fn cef_ext_escaping_is_reversible(v in "[a-z=\\\\\n ]{0,30}") {
            let e = escape_cef_ext(&v);
            prop_assert!(!e.contains('\n'));
            let mut o = String::new();
            let mut it = e.chars();
            while let Some(c) = it.next() {
                if c == '\\' {
                    match it.next() { Some('n') => o.push('\n'), Some('r') => o.push('\r'), Some(x) => o.push(x), None => {} }
                } else { o.push(c); }
            }
            prop_assert_eq!(o, v);
        }
    }
}
