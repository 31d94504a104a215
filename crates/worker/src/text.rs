//! Token bytes to text that is always valid UTF-8.
//!
//! A token can end inside a multi-byte character (byte-level vocabularies split emoji
//! and CJK characters across tokens). The bytes of an unfinished character are held
//! until the character completes; bytes that can never form a character become U+FFFD;
//! an unfinished character left when generation ends is dropped, so every chunk a
//! client sees is whole text.

/// Turns a stream of byte pieces into valid UTF-8 text.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    held: Vec<u8>,
}

impl Utf8Stream {
    /// Feeds the bytes of one token; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.held.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.held;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // SAFETY-free: `valid` is valid UTF-8 by `valid_up_to`.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // Bytes that no continuation can repair.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.held.len() - keep;
        self.held.drain(..start);
        out
    }

    /// Ends the stream: an unfinished character is dropped. Returns whether one was.
    pub fn finish(&mut self) -> bool {
        let had = !self.held.is_empty();
        self.held.clear();
        had
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn characters_split_across_tokens_come_out_whole() {
        let smile = "😀".as_bytes(); // 4 bytes
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"hi "), "hi ");
        assert_eq!(s.push(&smile[..1]), "");
        assert_eq!(s.push(&smile[1..3]), "");
        assert_eq!(s.push(&[smile[3], b'!']), "😀!");
        assert!(!s.finish());
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_dropped_and_reported() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&"é".as_bytes()[..1]), "");
        assert!(s.finish());
        assert_eq!(s.push(b"x"), "x");
    }

    #[test]
    fn bytes_that_can_never_be_text_become_replacement_characters() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        // A lead byte followed by a non-continuation byte.
        assert_eq!(s.push(&[0xe2, b'c']), "\u{fffd}c");
    }
}
