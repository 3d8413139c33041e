//! [`Text`]: UTF-8 text that shares the buffer it was read into.
//!
//! A record's `_id` and JSON body are slices of the response (when polled)
//! or of the journal page read back (when delivered): one buffer per page,
//! no allocation or copy per record.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// Cheaply clonable, immutable UTF-8 text.
#[derive(Clone, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    /// `part` (which must lie inside `whole`'s text) as a slice of `whole`'s buffer.
    pub fn slice_of(whole: &Bytes, part: &str) -> Text {
        Text(whole.slice_ref(part.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: a `Text` is only ever built from a `&str` or a `String`
        // (`slice_of`, `From`), so its bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(Bytes::from(s))
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl rusqlite::ToSql for Text {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_the_buffer() {
        let whole = Bytes::from(String::from(r#"{"_id":"héllo"}"#));
        let text = std::str::from_utf8(&whole).unwrap();
        let id = Text::slice_of(&whole, &text[8..14]);
        assert_eq!(id, "héllo");
        assert_eq!(id.as_ptr(), whole[8..].as_ptr(), "a slice, not a copy");
        assert_eq!(Text::from("a".to_string()), Text::from("a"));
    }
}
