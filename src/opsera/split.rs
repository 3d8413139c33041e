//! One pass over a page's text that validates it as JSON, splits `data`
//! into its records and finds each record's top-level `_id` and
//! `createdAt`: the common case of [`super::parse_page`], without a second
//! pass per record.
//!
//! It accepts only text that serde_json accepts, and answers what serde
//! would. Whenever that is not plain (an escaped or repeated key, a `data`
//! that is not an array of objects), it gives up with `None` and the
//! caller parses the page with serde instead, which decides and explains.

/// A page split into its records.
pub(super) struct Split<'a> {
    /// The raw `count` value; `None` when absent or `null`.
    pub count: Option<&'a str>,
    pub records: Vec<Item<'a>>,
}

/// One record of `data`: its whole text and the raw text of its top-level
/// `_id` and `createdAt` values (`None` when absent or `null`).
pub(super) struct Item<'a> {
    pub text: &'a str,
    pub id: Option<&'a str>,
    pub created: Option<&'a str>,
}

/// Split `text` (one JSON object with a `data` array of objects), or `None`.
pub(super) fn split(text: &str) -> Option<Split<'_>> {
    let mut s = Scan { b: text.as_bytes(), i: 0, stack: Vec::new() };
    let (mut count, mut data) = (None, None);
    s.ws();
    s.eat(b'{')?;
    if !s.close(b'}') {
        loop {
            let key = s.key()?;
            match key {
                b"count" if count.is_none() => {
                    let start = s.i;
                    s.value()?;
                    count = Some(&text[start..s.i]);
                }
                b"data" if data.is_none() => data = Some(s.records(text)?),
                b"count" | b"data" => return None, // repeated
                _ => s.value()?,
            }
            if !s.next_member(b'}')? {
                break;
            }
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return None;
    }
    Some(Split { count: count.filter(|c| *c != "null"), records: data? })
}

/// The raw text of the values of `keys` at the top level of the object
/// `text` (of a repeated key, the last), each with whether it is a string
/// holding escapes; `None` when that is not plain (an escaped key, or text
/// that is not one JSON object), and serde must decide instead.
pub(crate) fn top_level<'a, const N: usize>(text: &'a str, keys: &[&str; N]) -> Option<[Option<(&'a str, bool)>; N]> {
    let mut s = Scan { b: text.as_bytes(), i: 0, stack: Vec::new() };
    let mut found = [None; N];
    s.ws();
    s.eat(b'{')?;
    if !s.close(b'}') {
        loop {
            let key = s.key()?;
            let at = s.i;
            let escaped = if s.peek()? == b'"' { s.string()? } else { s.value().map(|()| false)? };
            if let Some(k) = keys.iter().position(|k| k.as_bytes() == key) {
                found[k] = Some((&text[at..s.i], escaped));
            }
            if !s.next_member(b'}')? {
                break;
            }
        }
    }
    Some(found)
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// The closing bytes of the containers open inside the current value.
    stack: Vec<u8>,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// A bit per byte of `chunk` (16 bytes) that is `"`, `\\` or a control character.
#[cfg(target_arch = "x86_64")]
fn special16(chunk: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(chunk.len(), 16);
    // SAFETY: SSE2 is part of every x86-64 CPU; the load reads exactly the
    // 16 bytes of `chunk`, unaligned.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast());
        let hit = _mm_or_si128(
            _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)), _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8))),
            _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v), // v <= 0x1f
        );
        _mm_movemask_epi8(hit) as u32
    }
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Consume `c`, or fail.
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// After whitespace: consume `c` if it is next.
    fn close(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.peek() == Some(c);
        self.i += hit as usize;
        hit
    }

    /// After a member or element: `Some(true)` at a comma (another follows),
    /// `Some(false)` at `close`.
    fn next_member(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// An object key without escapes and its colon; the value comes next.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        if self.string()? {
            return None; // an escaped key may spell anything: serde decides
        }
        let key = &self.b[start..self.i - 1];
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(key)
    }

    /// Skip string bytes that need no attention (not `"`, `\` or a control
    /// character), sixteen at a time (SSE2, part of every x86-64), then
    /// eight at a time.
    fn skip_plain(&mut self) {
        #[cfg(target_arch = "x86_64")]
        while let Some(chunk) = self.b.get(self.i..self.i + 16) {
            let mask = special16(chunk);
            if mask != 0 {
                self.i += mask.trailing_zeros() as usize;
                return;
            }
            self.i += 16;
        }
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let v = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            let quote = v ^ (ONES * b'"' as u64);
            let slash = v ^ (ONES * b'\\' as u64);
            // The lowest flagged byte is exact (higher ones may be false).
            let hit = ((quote.wrapping_sub(ONES) & !quote)
                | (slash.wrapping_sub(ONES) & !slash)
                | (v.wrapping_sub(ONES * 0x20) & !v))
                & HIGH;
            if hit != 0 {
                self.i += (hit.trailing_zeros() / 8) as usize;
                return;
            }
            self.i += 8;
        }
    }

    /// A string at its opening quote; `Some(true)` when it holds escapes.
    fn string(&mut self) -> Option<bool> {
        self.i += 1;
        let mut escaped = false;
        loop {
            self.skip_plain();
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 6;
                        }
                        _ => return None,
                    }
                }
                0..0x20 => return None,
                _ => self.i += 1,
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => _ = self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            (self.digits() > 0).then_some(())?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            (self.digits() > 0).then_some(())?;
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    /// Any one value at `i`, nested to any depth (without recursion).
    fn value(&mut self) -> Option<()> {
        let base = self.stack.len();
        loop {
            self.ws();
            match self.peek()? {
                b'{' => {
                    self.i += 1;
                    if !self.close(b'}') {
                        self.stack.push(b'}');
                        self.key()?;
                        continue;
                    }
                }
                b'[' => {
                    self.i += 1;
                    if !self.close(b']') {
                        self.stack.push(b']');
                        continue;
                    }
                }
                b'"' => _ = self.string()?,
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return None,
            }
            // A value ended: close what it ended, up to the next one.
            loop {
                let Some(&close) = self.stack.get(base..).and_then(<[u8]>::last) else { return Some(()) };
                if self.next_member(close)? {
                    if close == b'}' {
                        self.key()?;
                    }
                    break;
                }
                self.stack.pop();
            }
        }
    }

    /// `data`: an array of objects, each with its `_id` and `createdAt`.
    fn records(&mut self, text: &'a str) -> Option<Vec<Item<'a>>> {
        self.eat(b'[')?;
        let mut items = Vec::new();
        if self.close(b']') {
            return Some(items);
        }
        loop {
            self.ws();
            let start = self.i;
            self.eat(b'{')?;
            let (mut id, mut created) = (None, None);
            if !self.close(b'}') {
                loop {
                    let key = self.key()?;
                    let at = self.i;
                    self.value()?;
                    let slot = match key {
                        b"_id" => &mut id,
                        b"createdAt" => &mut created,
                        _ => &mut None,
                    };
                    if slot.replace(&text[at..self.i]).is_some() {
                        return None; // repeated
                    }
                    if !self.next_member(b'}')? {
                        break;
                    }
                }
            }
            let some = |v: Option<&'a str>| v.filter(|v| *v != "null");
            items.push(Item { text: &text[start..self.i], id: some(id), created: some(created) });
            if !self.next_member(b']')? {
                return Some(items);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_runs_stop_exactly_at_the_first_byte_needing_attention() {
        for k in 0..40 {
            for (c, special) in [
                ("\"", true),
                ("\\", true),
                ("\u{1}", true),
                ("\u{1f}", true),
                (" ", false),
                ("é", false),
                ("\u{7f}", false),
            ] {
                let text = format!("{}{c}{}\"", "a".repeat(k), "b".repeat(20));
                let mut s = Scan { b: text.as_bytes(), i: 0, stack: Vec::new() };
                s.skip_plain();
                // It stops exactly at a special byte; it may stop short of
                // the closing quote (the string's byte loop goes on from there).
                if special {
                    assert_eq!(s.i, k, "{text:?}");
                } else {
                    assert!(s.i > k && s.i < text.len(), "{text:?}: {}", s.i);
                }
            }
        }
    }
}
