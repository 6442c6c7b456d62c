//! A command's output bytes as the API's text events: valid UTF-8 strings, without breaking a
//! multi-byte character across two events.

/// Splits a byte stream into valid UTF-8 strings without breaking multi-byte characters across
/// chunks (an incomplete tail waits for the next chunk; invalid bytes become U+FFFD).
#[derive(Default)]
pub struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    /// Feeds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let cut = match std::str::from_utf8(&self.carry) {
            Ok(_) => self.carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.carry.len(),
        };
        let rest = self.carry.split_off(cut);
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry = rest;
        text
    }

    /// Bytes held back (the start of a character whose rest has not arrived).
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// Whatever is left (an incomplete character at the very end).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_survive_chunk_boundaries() {
        let text = "héllo wörld ✓";
        let bytes = text.as_bytes();
        let mut c = Utf8Chunks::default();
        let mut out = String::new();
        for b in bytes.chunks(1) {
            out.push_str(&c.push(b));
        }
        out.push_str(&c.finish());
        assert_eq!(out, text);
        let mut c = Utf8Chunks::default();
        assert_eq!(c.push(&[0x66, 0xff, 0x67]), "f\u{fffd}g");
    }
}
