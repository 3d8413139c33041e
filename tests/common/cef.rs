//! Parsing CEF back: header fields end at the seventh unescaped `|`;
//! extension pairs start at an unescaped `key=` after a space.
#![allow(dead_code)]

use std::collections::BTreeMap;

/// Undo CEF extension escaping.
pub fn cef_unescape(v: &str) -> String {
    let mut o = String::new();
    let mut it = v.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => o.push('\n'),
                Some('r') => o.push('\r'),
                Some(e) => o.push(e),
                None => o.push('\\'),
            }
        } else {
            o.push(c);
        }
    }
    o
}

/// Where a CEF line's extension starts: after the seventh unescaped `|`.
pub fn cef_ext_start(cef: &str) -> usize {
    let (mut pipes, mut escaped) = (0, false);
    for (i, c) in cef.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '|' => {
                pipes += 1;
                if pipes == 7 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("not a CEF line: {cef}");
}

/// CEF extension pairs, unescaped; keys are `[A-Za-z0-9]+` after a space
/// (or at the start) and before an unescaped `=`.
pub fn cef_ext(ext: &str) -> BTreeMap<String, String> {
    let b = ext.as_bytes();
    let mut starts = Vec::new(); // (key start, '=' index)
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == b'=' {
            let mut k = i;
            while k > 0 && b[k - 1].is_ascii_alphanumeric() {
                k -= 1;
            }
            if k < i && (k == 0 || b[k - 1] == b' ') {
                starts.push((k, i));
            }
        }
        i += 1;
    }
    let mut out = BTreeMap::new();
    for (n, (k, eq)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(ext.len(), |(k2, _)| k2 - 1);
        out.insert(ext[*k..*eq].to_string(), cef_unescape(&ext[eq + 1..end]));
    }
    out
}
