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

use super::split;
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
    // Fast path: one pass validates the page, splits `data` and finds each
    // record's head. Anything unusual takes serde's path, which decides
    // exactly as the fast path would and says precisely what is wrong.
    let (count, items) = match std::str::from_utf8(body).ok().and_then(split::split) {
        Some(split::Split { count, records }) => (count, records),
        None => slow_split(body)?,
    };
    let count = match count {
        None => None,
        Some(c) => match serde_json::from_str::<u64>(c) {
            Ok(n) => Some(n),
            Err(_) => {
                return Err(format!("\"count\" is {c} , not a non-negative integer"));
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
    for (i, item) in items.into_iter().enumerate() {
        records.push(parse_record(body, item).map_err(|m| format!("record {i} of \"data\": {m}"))?);
    }
    Ok(Page { count, records })
}

/// The page as serde reads it: its raw `count` and its records with their heads.
fn slow_split(body: &[u8]) -> Result<(Option<&str>, Vec<split::Item<'_>>), String> {
    let env: Envelope = serde_json::from_slice(body).map_err(|e| {
        format!("response is not a JSON object with count and data ({e}); body starts with {}", snippet(body))
    })?;
    let data = env.data.ok_or("response has no \"data\" field")?;
    let raws: Vec<&RawValue> = serde_json::from_str(data.get()).map_err(|_| "\"data\" is not an array".to_string())?;
    let mut items = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(format!("record {i} of \"data\": not a JSON object: {}", snippet(text.as_bytes())));
        }
        let head: Head =
            serde_json::from_str(text).map_err(|e| format!("record {i} of \"data\": unreadable record ({e})"))?;
        items.push(split::Item { text, id: head.id.map(RawValue::get), created: head.created.map(RawValue::get) });
    }
    Ok((env.count.map(RawValue::get).filter(|c| *c != "null"), items))
}

/// One record of `page` (whose text `item` borrows from).
fn parse_record(page: &Bytes, item: split::Item<'_>) -> Result<Record, String> {
    let id = item.id.and_then(json_str).ok_or("\"_id\" is missing or not a string")?;
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!("\"_id\" {:?} is empty, too long or holds control characters", truncate(&id, 40)));
    }
    let created_text = item
        .created
        .and_then(json_str)
        .ok_or_else(|| format!("record {id}: \"createdAt\" is missing or not a string"))?;
    let created = parse_timestamp(&created_text).ok_or_else(|| {
        format!("record {id}: \"createdAt\" {:?} is not an ISO-8601 timestamp", truncate(&created_text, 40))
    })?;
    let id = match id {
        std::borrow::Cow::Borrowed(id) => Text::slice_of(page, id),
        std::borrow::Cow::Owned(id) => Text::from(id),
    };
    Ok(Record { id, created, body: Text::slice_of(page, item.text) })
}

/// The text of a JSON string value (borrowed when it has no escapes).
fn json_str(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(std::borrow::Cow::Owned)
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
    use proptest::prelude::*;

    const REC: &str = r#"{"_id":"61042540e1d666c9ded178c4","createdAt":"2021-07-30T16:13:52.109Z","x":1.50,"__v":0}"#;

    fn parse(body: &str, meaning: CountMeaning) -> Result<Page, String> {
        parse_page(&Bytes::copy_from_slice(body.as_bytes()), meaning)
    }

    #[test]
    fn keeps_original_text() {
        let body = format!(r#"{{"count":1,"data":[ {REC} ]}}"#);
        let p = parse(&body, CountMeaning::Total).unwrap();
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
            let e = parse(body, CountMeaning::Total).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = parse(&format!(r#"{{"count":2,"data":[{REC}]}}"#), CountMeaning::Returned).unwrap_err();
        assert!(e.contains("holds 1"), "{e}");
    }

    /// What the fast splitter says of `text` must be what serde says: it
    /// may give up (`None`), never accept what serde refuses or differ.
    fn agrees(text: &str) -> Result<bool, String> {
        let Some(fast) = split::split(text) else { return Ok(false) };
        let (count, items) =
            slow_split(text.as_bytes()).map_err(|e| format!("{text:?}: split accepted, serde: {e}"))?;
        fn view<'a>(c: Option<&str>, items: &[split::Item<'a>]) -> (Option<String>, Vec<[Option<&'a str>; 3]>) {
            (c.map(str::to_string), items.iter().map(|i| [Some(i.text), i.id, i.created]).collect())
        }
        let (f, s) = (view(fast.count, &fast.records), view(count, &items));
        if f != s {
            return Err(format!("{text:?}: split {f:?}, serde {s:?}"));
        }
        Ok(true)
    }

    #[test]
    fn the_splitter_agrees_with_serde() {
        let page = |recs: &str| format!(r#"{{"count":3,"data":[{recs}]}}"#);
        let plain = [
            page(REC),
            page("{}"),
            format!(" {{ \"x\" : {{\"data\":[1]}}, \"data\" : [ {REC} , {{}} ] , \"count\" : null }} \n"),
            page(r#" { "a" : [1, {"_id": "inner"}, "x\"y", []] , "_id" : "o\u0041" , "createdAt":"t" } "#),
            page(
                r#"{"createdAt":null,"_id":5,"n":-1.5e3,"m":0,"k":-0.0E+1,"t":true,"f":false,"z":{"createdAt":"no"}}"#,
            ),
            page(r#"{"s":"a\\","_id":"after an escaped backslash","u":"\ud800 lone, as serde lets it be"}"#),
            page(&format!(r#"{{"deep":{}{}}}"#, "[".repeat(5000), "]".repeat(5000))),
            r#"{"data":[]}"#.to_string(),
        ];
        for text in &plain {
            assert_eq!(agrees(text), Ok(true), "{text:.200}");
        }
        // serde decides these (escaped or repeated keys, odd shapes), or refuses them.
        let unusual = [
            page(r#"{"_\u0069d":"escaped key"}"#),
            page(r#"{"_id":"a","_id":"b"}"#),
            page("7"),
            r#"{"data":[],"data":[]}"#.to_string(),
            r#"{"data":null}"#.to_string(),
            r#"{"count":1}"#.to_string(),
            page(r#"{"n":01}"#),
            page(r#"{"n":1.}"#),
            page(r#"{"n":-}"#),
            page(r#"{"n":.5}"#),
            page(r#"{"n":1e}"#),
            page(r#"{"s":"\q"}"#),
            page(r#"{"s":"\u12G4"}"#),
            page("{\"s\":\"tab\there\"}"),
            page(r#"{"t":tru}"#),
            page(r#"{"a":[1,]}"#),
            page(r#"{"a":1,}"#),
            page(r#"{"a" 1}"#),
            page(r#"{"a":[1}"#),
            format!("{} x", page("{}")),
            page("{}").trim_end_matches('}').to_string(),
        ];
        for text in &unusual {
            assert_eq!(agrees(text), Ok(false), "{text:.200}");
        }
    }

    /// A JSON-ish tree rendered by hand, so that objects may repeat or escape keys.
    fn tree() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
            "\"([a-z _é✓]|\\\\[\"\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4}){0,12}\"",
        ];
        let keys = prop_oneof![
            Just("\"_id\"".to_string()),
            Just("\"createdAt\"".to_string()),
            Just("\"count\"".to_string()),
            Just("\"data\"".to_string()),
            Just("\"_\\u0069d\"".to_string()),
            "\"[a-z]{0,3}\"",
        ];
        leaf.prop_recursive(4, 48, 5, move |inner| {
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..5), " ?").prop_map(|(v, w)| format!("[{w}{}]", v.join(","))),
                prop::collection::vec((keys.clone(), inner, "[ \n]?"), 0..5).prop_map(|m| {
                    let members: Vec<String> = m.into_iter().map(|(k, v, w)| format!("{w}{k}{w}:{v}")).collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    fn mutated_page() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            "0",
            "-",
            ".",
            "e",
            "n",
            " ",
            "\u{1}",
            "é",
            "\"_id\":\"x\",",
        ]);
        (prop::collection::vec(tree(), 0..4), "[0-9]{0,2}|null", prop::collection::vec((any::<usize>(), token), 0..3))
            .prop_map(|(recs, count, edits)| {
                let count = if count.is_empty() { String::new() } else { format!("\"count\":{count},") };
                let mut text = format!("{{{count}\"data\":[{}]}}", recs.join(","));
                for (at, tok) in edits {
                    let mut at = at % (text.len() + 1);
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    // Replace one character (or insert at the end).
                    let end = text[at..].chars().next().map_or(at, |c| at + c.len_utf8());
                    text.replace_range(at..end, tok);
                }
                text
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn the_splitter_never_disagrees_with_serde(text in mutated_page()) {
            prop_assert_eq!(agrees(&text).err(), None);
        }
    }

    #[test]
    fn count_may_be_absent() {
        let p = parse(&format!(r#"{{"data":[{REC}]}}"#), CountMeaning::Returned).unwrap();
        assert_eq!(p.count, None);
        assert_eq!(p.records.len(), 1);
    }
}
