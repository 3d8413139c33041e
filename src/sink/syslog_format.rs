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
        use std::fmt::Write as _;
        // One string, sized for the message, takes the header, SD and MSG.
        let sd_len: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut head = String::with_capacity(160 + self.sd_id.len() + sd_len + json.len());
        let _ = write!(
            head,
            "<{}>1 {} {} {} {} {} [{}",
            self.pri,
            fmt_rfc3339(row.created),
            self.hostname,
            self.app_name,
            self.procid,
            msgid(&row.stream),
            self.sd_id
        );
        let mut sd_truncated = false;
        for (k, v) in fields.iter().map(|(k, v)| (*k, v.as_ref())).chain([("stream", &*row.stream)]) {
            let (v, cut) = cap(v, SD_VALUE_CAP);
            sd_truncated |= cut;
            head.push(' ');
            head.push_str(k);
            head.push_str("=\"");
            head.push_str(&escape_sd(&v, self.escape_line_breaks));
            head.push('"');
        }
        head.push_str("] \u{feff}");
        let mut m = fit(head, json, self.max_bytes);
        m.truncated |= sd_truncated;
        m
    }

    fn rfc3164(&self, row: &JournalRow, json: &str) -> Message {
        let mut head = String::with_capacity(64 + self.hostname.len() + self.app_name.len() + json.len());
        self.header3164(row, &mut head);
        fit(head, json, self.max_bytes)
    }

    /// `<PRI>Mmm dd hh:mm:ss HOSTNAME APP[PID]: ` (the day padded with a space, UTC).
    fn header3164(&self, row: &JournalRow, out: &mut String) {
        use chrono::{Datelike, Timelike};
        use std::fmt::Write as _;
        const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let t = chrono::DateTime::from_timestamp_millis(row.created).unwrap_or_default();
        let _ = write!(
            out,
            "<{}>{} {:>2} {:02}:{:02}:{:02} {} {}[{}]: ",
            self.pri,
            MONTHS[t.month0() as usize],
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            self.hostname,
            self.app_name,
            self.procid
        );
    }

    fn cef(&self, row: &JournalRow, fields: &[(&'static str, Cow<str>)], json: &str) -> Message {
        use std::fmt::Write as _;
        let get = |k: &str| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| v.as_ref());
        let (signature, name) = match (get("type"), get("action"), get("token_id")) {
            (_, _, Some(_)) => (
                get("scope").map_or_else(|| row.stream.to_string(), |s| format!("token.{s}")),
                "Opsera token activity".into(),
            ),
            (Some(t), Some(a), None) => (format!("{t}.{a}"), format!("Opsera {t} {a}")),
            _ => (row.stream.to_string(), format!("Opsera {}", row.stream.replace('_', " "))),
        };
        // One string, sized for the message, takes the header, extension and MSG.
        let ext_len: usize = fields.iter().map(|(_, v)| v.len() + 32).sum();
        let mut head = String::with_capacity(256 + self.hostname.len() + ext_len + json.len() + json.len() / 8);
        self.header3164(row, &mut head);
        let _ = write!(
            head,
            "CEF:0|Opsera|opsera-shipper|{}|{}|{}|{}|rt={}",
            env!("CARGO_PKG_VERSION"),
            escape_cef_header(&signature),
            escape_cef_header(&name),
            cef_severity(self.severity),
            row.created
        );
        let mut push = |k: &str, suffix: &str, v: &str| {
            head.push(' ');
            head.push_str(k);
            head.push_str(suffix);
            head.push('=');
            head.push_str(&escape_cef_ext(&cap(v, SD_VALUE_CAP).0));
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
                    push(key, "Label", l);
                }
                push(key, "", v);
            }
        }
        push("cs6Label", "", "stream");
        push("cs6", "", &row.stream);
        head.push_str(" msg=");
        fit_with(head, json, self.max_bytes, escape_cef_ext)
    }
}

/// MSGID: the stream's name (≤ 32 printable ASCII).
fn msgid(stream: &str) -> Cow<'_, str> {
    if stream.len() <= 32 && !stream.is_empty() && stream.bytes().all(|b| b.is_ascii_graphic()) {
        return Cow::Borrowed(stream);
    }
    let clean: String = stream.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
    if clean.is_empty() { Cow::Borrowed("-") } else { Cow::Owned(clean) }
}

/// The record's top-level key fields that are strings, numbers or
/// booleans, in `KEY_FIELDS` order (numbers keep their original text; of
/// repeated keys the last one wins). One pass of the page splitter's
/// scanner finds them; text it leaves to serde (an escaped key) is read by
/// serde's streaming parser, which skips other fields without building
/// them, so a record nested deeper than its recursion limit still yields
/// its `_id`.
fn key_fields(body: &str) -> Vec<(&'static str, Cow<'_, str>)> {
    let Some(found) = crate::opsera::split::top_level(body, &KEY_FIELDS).or_else(|| key_fields_serde(body)) else {
        return Vec::new();
    };
    KEY_FIELDS
        .iter()
        .zip(found)
        .filter_map(|(k, v)| v.and_then(|(text, escaped)| Some((*k, scalar(text, escaped)?))))
        .collect()
}

#[derive(serde::Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// `key_fields`' raw values as serde finds them (strings to be decoded by serde).
fn key_fields_serde(body: &str) -> Option<[Option<(&str, bool)>; KEY_FIELDS.len()]> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;

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

    let found = serde_json::Deserializer::from_str(body).deserialize_map(Fields).ok()?;
    Some(found.map(|raw| raw.map(|r| (r.get(), true))))
}

/// A key field's value from its raw text: a string's content (decoded by
/// serde when `escaped`), a number's or boolean's text; `None` otherwise.
fn scalar(text: &str, escaped: bool) -> Option<Cow<'_, str>> {
    match text.as_bytes().first()? {
        b'"' if !escaped => text.get(1..text.len() - 1).map(Cow::Borrowed),
        b'"' => serde_json::from_str::<Key>(text).ok().map(|k| k.0),
        b't' | b'f' | b'-' | b'0'..=b'9' => Some(Cow::Borrowed(text)),
        _ => None,
    }
}

/// Copy `v`, replacing each byte of `set` by what `rule` gives for it;
/// borrowed when `v` holds none. Every special character is ASCII, so runs
/// between them are copied whole and UTF-8 stays intact.
fn escape_with<'a>(v: &'a str, set: &[u8], rule: impl Fn(u8) -> Option<&'static str>) -> Cow<'a, str> {
    let bytes = v.as_bytes();
    let Some(mut i) = find_any(bytes, set) else {
        return Cow::Borrowed(v);
    };
    let mut o = String::with_capacity(v.len() + 16);
    let mut run = 0;
    loop {
        if let Some(rep) = rule(bytes[i]) {
            o.push_str(&v[run..i]);
            o.push_str(rep);
            run = i + 1;
        }
        match find_any(&bytes[i + 1..], set) {
            Some(n) => i += 1 + n,
            None => break,
        }
    }
    o.push_str(&v[run..]);
    Cow::Owned(o)
}

/// Where the first byte of `b` that is in `set` (at most six bytes) is.
fn find_any(b: &[u8], set: &[u8]) -> Option<usize> {
    let find = |set: &[u8]| match *set {
        [] => None,
        [x] => memchr::memchr(x, b),
        [x, y] => memchr::memchr2(x, y, b),
        [x, y, z, ..] => memchr::memchr3(x, y, z, b),
    };
    let (first, rest) = set.split_at(set.len().min(3));
    debug_assert!(rest.len() <= 3);
    match (find(first), find(rest)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// RFC 5424 PARAM-VALUE escaping (`"`, `\`, `]`); with `line_breaks`, CR and
/// LF are also written as `\r`/`\n`, so no message holds a raw line break.
pub fn escape_sd(v: &str, line_breaks: bool) -> Cow<'_, str> {
    let set: &[u8] = if line_breaks { b"\"\\]\n\r" } else { b"\"\\]" };
    escape_with(v, set, |b| match b {
        b'"' => Some("\\\""),
        b'\\' => Some("\\\\"),
        b']' => Some("\\]"),
        b'\n' => Some("\\n"),
        b'\r' => Some("\\r"),
        _ => None,
    })
}

/// CEF header escaping: `\` and `|`; line breaks become spaces.
pub fn escape_cef_header(v: &str) -> Cow<'_, str> {
    escape_with(v, b"\\|\n\r", |b| match b {
        b'\\' => Some("\\\\"),
        b'|' => Some("\\|"),
        b'\n' | b'\r' => Some(" "),
        _ => None,
    })
}

/// CEF extension value escaping: `\`, `=`, and line breaks as `\n`/`\r`.
pub fn escape_cef_ext(v: &str) -> Cow<'_, str> {
    escape_with(v, b"\\=\n\r", |b| match b {
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
    use std::io::Write;
    let _ = write!(out, "{} ", msg.len()); // writing to a Vec cannot fail
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

    #[test]
    fn frames_count_octets_or_end_with_a_newline() {
        let mut out = b"9 previous".to_vec();
        frame_octet("é <14>1".as_bytes(), &mut out);
        frame_lf(b"x", &mut out);
        assert_eq!(out, "9 previous8 é <14>1x\n".as_bytes());
    }

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
    fn rfc3164_and_cef_messages_whole() {
        let body = r#"{"_id":"i1","type":"pipeline","action":"run","token_id":"t\\1","scope":"a=b","createdAt":"x"}"#;
        let m = fmt(SyslogFormat::Rfc3164, 65536).format(&row(body));
        assert_eq!(
            String::from_utf8(m.bytes).unwrap(),
            format!("<166>Jul 30 16:13:52 host-1 opsera-shipper[42]: {body}")
        );
        let m = fmt(SyslogFormat::Cef, 65536).format(&row(body));
        assert_eq!(
            String::from_utf8(m.bytes).unwrap(),
            format!(
                "<166>Jul 30 16:13:52 host-1 opsera-shipper[42]: CEF:0|Opsera|opsera-shipper|{}|token.a=b|Opsera token activity|3|\
                 rt=1627661632109 externalId=i1 act=run cat=pipeline cs4Label=tokenId cs4=t\\\\1 cs5Label=scope cs5=a\\=b \
                 cs6Label=stream cs6=user_activity msg={}",
                env!("CARGO_PKG_VERSION"),
                escape_cef_ext(body)
            )
        );
        let mut early = row("{}");
        early.created = 1_625_130_000_000; // 2021-07-01T09:00:00Z: the day is padded with a space
        assert!(
            String::from_utf8(fmt(SyslogFormat::Rfc3164, 99).format(&early).bytes)
                .unwrap()
                .starts_with("<166>Jul  1 09:00:00 ")
        );
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

    /// `key_fields` as serde alone finds them.
    fn key_fields_by_serde(body: &str) -> Vec<(&'static str, Cow<'_, str>)> {
        let Some(found) = key_fields_serde(body) else { return Vec::new() };
        KEY_FIELDS.iter().zip(found).filter_map(|(k, v)| v.and_then(|(t, e)| Some((*k, scalar(t, e)?)))).collect()
    }

    #[test]
    fn key_fields_read_like_serde_where_the_scanner_steps_aside() {
        for body in [
            // An escaped key spelling `_id`: serde decodes it, the scanner hands over.
            r#"{"\u005fid":"a","type":"t"}"#,
            // Repeated: the last wins.
            r#"{"_id":"a","_id":"b","action":1.5e3}"#,
            // Escaped values, numbers, booleans; null, objects and arrays are not key fields.
            r#"{"_id":"x\"y\u00e9","account":true,"scope":null,"target":{"a":1},"type":[1],"user_id":-0.5}"#,
            // Not an object, and not JSON.
            r#"["_id","a"]"#,
            r#"{"_id":"a""#,
            "",
        ] {
            assert_eq!(key_fields(body), key_fields_by_serde(body), "{body}");
        }
        assert_eq!(key_fields(r#"{"\u005fid":"a"}"#), vec![("_id", Cow::Borrowed("a"))]);
        assert_eq!(key_fields(r#"{"_id":"a","_id":"b"}"#), vec![("_id", Cow::Borrowed("b"))]);
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

        /// The scanner finds the key fields serde finds, in any record.
        #[test]
        fn key_fields_match_serde(
            members in proptest::collection::vec((
                prop_oneof![
                    proptest::sample::select(KEY_FIELDS.to_vec()).prop_map(String::from),
                    "[a-z_]{1,8}",
                ],
                prop_oneof![
                    "[a-z0-9 \"\\\\/é\u{1}]{0,12}".prop_map(serde_json::Value::from),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
                    any::<bool>().prop_map(serde_json::Value::from),
                    Just(serde_json::Value::Null),
                    Just(serde_json::json!({"_id": "inner", "a": [1, {"b": "c"}]})),
                ],
            ), 0..14),
            pretty in any::<bool>(),
        ) {
            // Built as text, so that keys may repeat.
            let sep = if pretty { ",\n  " } else { "," };
            let body = format!(
                "{{{}}}",
                members
                    .iter()
                    .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                    .collect::<Vec<_>>()
                    .join(sep)
            );
            prop_assert!(crate::opsera::split::top_level(&body, &KEY_FIELDS).is_some(), "{}", body);
            prop_assert_eq!(key_fields(&body), key_fields_by_serde(&body), "{}", body);
        }

        /// The RFC 3164 header reads as `%b %e %H:%M:%S` would write it.
        #[test]
        fn rfc3164_header_matches_strftime(ms in -62_000_000_000_000i64..253_000_000_000_000) {
            let f = fmt(SyslogFormat::Rfc3164, 65536);
            let mut r = row("{}");
            r.created = ms;
            let mut head = String::new();
            f.header3164(&r, &mut head);
            let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
            prop_assert_eq!(head, format!("<166>{} host-1 opsera-shipper[42]: ", t.format("%b %e %H:%M:%S")));
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
