//! Parsing one API response into records, trusting nothing.
//!
//! A page is accepted whole or not at all: a body that is not JSON, a
//! `data` that is not an array, a record that is not an object, lacks a
//! string `_id` or carries an unparsable `createdAt`, or a `count` that
//! contradicts `data` rejects the page with a reason. Each accepted record
//! keeps its exact original JSON text.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::text::Text;
use crate::window::parse_timestamp;

/// One audit record: its dedup key, its creation time and its original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: Text,
    /// `createdAt` in epoch ms.
    pub created: i64,
    /// The record's JSON text exactly as the API sent it (a slice of the response).
    pub body: Text,
}

/// One parsed response.
#[derive(Debug, Clone)]
pub struct Page {
    /// The response's `count`, when it sent one.
    pub count: Option<u64>,
    pub records: Vec<Record>,
}

/// How `count` relates to `data` on an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountMeaning {
    /// v2: the total matching the query, across all pages (so `>= data.len()`).
    Total,
    /// v1: the number of records in this response.
    Returned,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    count: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct FastEnvelope<'a> {
    #[serde(default, borrow)]
    count: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "_id", default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(rename = "createdAt", default, borrow)]
    created: Option<&'a RawValue>,
}

/// Longest `_id` accepted; ObjectIds are 24 characters.
const MAX_ID_LEN: usize = 128;

/// Parse a response body. Errors say what was wrong, without the URL (the
/// caller adds it). Records are slices of `body`: no copy per record.
pub fn parse_page(body: &Bytes, meaning: CountMeaning) -> Result<Page, String> {
    // Fast path: one pass splits `data` into its records' raw text.
    // Validating UTF-8 once up front lets serde_json skip it per record.
    let fast = std::str::from_utf8(body).ok().and_then(|text| serde_json::from_str::<FastEnvelope>(text).ok());
    let (count, items) = match fast {
        Some(FastEnvelope { count, data: Some(items) }) => (count, items),
        // Anything else takes the slow path, for a precise message.
        _ => {
            let env: Envelope = serde_json::from_slice(body).map_err(|e| {
                format!("response is not a JSON object with count and data ({e}); body starts with {}", snippet(body))
            })?;
            let data = env.data.ok_or("response has no \"data\" field")?;
            let items: Vec<&RawValue> =
                serde_json::from_str(data.get()).map_err(|_| "\"data\" is not an array".to_string())?;
            (env.count, items)
        }
    };
    let count = match count {
        None => None,
        Some(c) => match serde_json::from_str::<u64>(c.get()) {
            Ok(n) => Some(n),
            Err(_) => {
                return Err(format!("\"count\" is {} , not a non-negative integer", c.get()));
            }
        },
    };
    if let Some(n) = count {
        let len = items.len() as u64;
        match meaning {
            CountMeaning::Total if n < len => {
                return Err(format!(
                    "\"count\" is {n} but \"data\" holds {len} records (count is the total, so it cannot be smaller)"
                ));
            }
            CountMeaning::Returned if n != len => {
                return Err(format!("\"count\" is {n} but \"data\" holds {len} records"));
            }
            _ => {}
        }
    }
    let mut records = Vec::with_capacity(items.len());
    for (i, raw) in items.into_iter().enumerate() {
        records.push(parse_record(body, raw).map_err(|m| format!("record {i} of \"data\": {m}"))?);
    }
    Ok(Page { count, records })
}

/// One record of `page` (whose text `raw` borrows from).
fn parse_record(page: &Bytes, raw: &RawValue) -> Result<Record, String> {
    let text = raw.get();
    if !text.starts_with('{') {
        return Err(format!("not a JSON object: {}", snippet(text.as_bytes())));
    }
    let (id, created) = match scan_head(text) {
        Some(found) => found,
        None => {
            let head: Head = serde_json::from_str(text).map_err(|e| format!("unreadable record ({e})"))?;
            (head.id.map(RawValue::get), head.created.map(RawValue::get))
        }
    };
    let id = id.and_then(json_str).ok_or("\"_id\" is missing or not a string")?;
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!("\"_id\" {:?} is empty, too long or holds control characters", truncate(&id, 40)));
    }
    let created_text =
        created.and_then(json_str).ok_or_else(|| format!("record {id}: \"createdAt\" is missing or not a string"))?;
    let created = parse_timestamp(&created_text).ok_or_else(|| {
        format!("record {id}: \"createdAt\" {:?} is not an ISO-8601 timestamp", truncate(&created_text, 40))
    })?;
    let id = match id {
        std::borrow::Cow::Borrowed(id) => Text::slice_of(page, id),
        std::borrow::Cow::Owned(id) => Text::from(id),
    };
    Ok(Record { id, created, body: Text::slice_of(page, text) })
}

/// The text of a JSON string value (borrowed when it has no escapes).
fn json_str(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(std::borrow::Cow::Owned)
}

/// The raw values of the top-level `_id` and `createdAt` of a record,
/// found without deserializing it. The text must be one JSON object that
/// has already been validated (the page's first pass did). `None` when a
/// key is escaped or repeated, or anything looks off: the caller then
/// deserializes the record, which decides exactly as before.
fn scan_head<'a>(text: &'a str) -> Option<(Option<&'a str>, Option<&'a str>)> {
    let b = text.as_bytes();
    let ws = |mut i: usize| {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    };
    // The end of the string starting at `i` (a quote), after its closing quote.
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        loop {
            i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
            if b[i] == b'"' {
                return Some(i + 1);
            }
            i += 2;
        }
    };
    let value_end = |mut i: usize| -> Option<usize> {
        match *b.get(i)? {
            b'"' => string_end(i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *b.get(i)? {
                        b'"' => {
                            i = string_end(i)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(i + 1);
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {
                while i < b.len() && !matches!(b[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                Some(i)
            }
        }
    };
    let (mut id, mut created) = (None, None);
    let mut i = ws(1);
    if b.get(i) == Some(&b'}') {
        return Some((None, None));
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(i)?;
        let key = &b[i + 1..key_end - 1];
        if key.contains(&b'\\') {
            return None;
        }
        i = ws(key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = ws(i + 1);
        let end = value_end(start)?;
        let slot = match key {
            b"_id" => &mut id,
            b"createdAt" => &mut created,
            _ => &mut None,
        };
        if slot.is_some() {
            return None; // a repeated key: let serde reject it
        }
        *slot = Some(text.get(start..end)?);
        i = ws(end);
        match b.get(i) {
            Some(b',') => i = ws(i + 1),
            Some(b'}') => {
                // `null` reads as absent, as it does for serde's `Option`.
                let some = |v: Option<&'a str>| v.filter(|v| *v != "null");
                return (ws(i + 1) == b.len()).then_some((some(id), some(created)));
            }
            _ => return None,
        }
    }
}

/// The first bytes of a body, printable, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]);
    let cleaned: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if body.len() > 120 { format!("{cleaned:?}…") } else { format!("{cleaned:?}") }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REC: &str = r#"{"_id":"61042540e1d666c9ded178c4","createdAt":"2021-07-30T16:13:52.109Z","x":1.50,"__v":0}"#;

    #[test]
    fn keeps_original_text() {
        let body = format!(r#"{{"count":1,"data":[ {REC} ]}}"#);
        let p = parse_page(&bytes::Bytes::copy_from_slice(body.as_bytes()), CountMeaning::Total).unwrap();
        assert_eq!(p.records[0].body, REC);
        assert_eq!(p.records[0].id, "61042540e1d666c9ded178c4");
        assert_eq!(p.count, Some(1));
    }

    #[test]
    fn rejects_untrustworthy_pages() {
        let cases = [
            ("<html>oops</html>", "not a JSON object"),
            (r#"{"count":1}"#, "no \"data\""),
            (r#"{"count":1,"data":{}}"#, "not an array"),
            (r#"{"count":-1,"data":[]}"#, "\"count\""),
            (r#"{"count":0,"data":[{"_id":"a","createdAt":"2021-07-30T16:13:52.109Z"}]}"#, "cannot be smaller"),
            (r#"{"count":1,"data":[{"createdAt":"2021-07-30T16:13:52.109Z"}]}"#, "\"_id\" is missing"),
            (
                r#"{"count":1,"data":[{"_id":5,"createdAt":"2021-07-30T16:13:52.109Z"}]}"#,
                "\"_id\" is missing or not a string",
            ),
            (r#"{"count":1,"data":[{"_id":"a","createdAt":"last tuesday"}]}"#, "not an ISO-8601"),
            (r#"{"count":1,"data":[7]}"#, "not a JSON object"),
        ];
        for (body, want) in cases {
            let e = parse_page(&bytes::Bytes::copy_from_slice(body.as_bytes()), CountMeaning::Total).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse_page(
            &bytes::Bytes::copy_from_slice(format!(r#"{{"count":2,"data":[{REC}]}}"#).as_bytes()),
            CountMeaning::Returned,
        )
        .unwrap_err();
        assert!(e.contains("holds 1"), "{e}");
    }

    #[test]
    fn the_head_scanner_agrees_with_serde() {
        let cases = [
            REC,
            r#"{}"#,
            r#" { "a" : [1, {"_id": "inner"}, "x\"y"] , "_id" : "o\u0041" , "createdAt":"t" } "#,
            r#"{"createdAt":null,"_id":5,"n":-1.5e3,"t":true,"z":{"createdAt":"no"}}"#,
            r#"{"_\u0069d":"escaped key"}"#,
            r#"{"_id":"a","_id":"b"}"#,
            r#"{"s":"a\\","_id":"after an escaped backslash"}"#,
        ];
        for text in cases {
            let serde: Result<Head, _> = serde_json::from_str(text);
            match scan_head(text) {
                Some((id, created)) => {
                    let head = serde.unwrap_or_else(|e| panic!("{text}: scanner accepted, serde: {e}"));
                    assert_eq!(id, head.id.map(RawValue::get), "{text}");
                    assert_eq!(created, head.created.map(RawValue::get), "{text}");
                }
                // Unsure: serde decides (escaped or repeated keys).
                None => assert!(text.contains("\\u0069") || text.matches("\"_id\"").count() > 1, "{text}"),
            }
        }
    }

    #[test]
    fn count_may_be_absent() {
        let p = parse_page(
            &bytes::Bytes::copy_from_slice(format!(r#"{{"data":[{REC}]}}"#).as_bytes()),
            CountMeaning::Returned,
        )
        .unwrap();
        assert_eq!(p.count, None);
        assert_eq!(p.records.len(), 1);
    }
}
