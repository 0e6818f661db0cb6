//! Nix's base-32 encoding ("nix32"): the alphabet without e, o, u, t, and the digits read from
//! the last byte backwards, so it is not RFC 4648 base32.

/// The 32 characters Nix uses, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Whether `c` is one of the 32 nix-base32 characters.
pub const fn is_base32_char(c: u8) -> bool {
    matches!(c, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

/// Length of the nix-base32 text for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes as Nix does (`printHash32`).
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = u16::from(bytes[i]) >> j;
        let high = if i + 1 < bytes.len() {
            u16::from(bytes[i + 1]) << (8 - j)
        } else {
            0
        };
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Error from [`decode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid nix-base32 character {0:?}")]
    InvalidChar(char),
    #[error("nix-base32 text of length {0} does not encode {1} bytes")]
    WrongLength(usize, usize),
    #[error("nix-base32 text has non-zero padding bits")]
    NonZeroPadding,
}

/// Decodes nix-base32 text into exactly `size` bytes.
pub fn decode(text: &str, size: usize) -> Result<Vec<u8>, DecodeError> {
    let text = text.as_bytes();
    if text.len() != encoded_len(size) {
        return Err(DecodeError::WrongLength(text.len(), size));
    }
    let mut out = vec![0u8; size];
    for (n, &c) in text.iter().rev().enumerate() {
        let digit = ALPHABET
            .iter()
            .position(|&a| a == c)
            .ok_or(DecodeError::InvalidChar(char::from(c)))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < size {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_predicate_matches_alphabet() {
        for c in 0..=255u8 {
            assert_eq!(is_base32_char(c), ALPHABET.contains(&c), "char {c}");
        }
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..=40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(text.len(), encoded_len(len));
            assert_eq!(decode(&text, len).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(decode("e", 0), Err(DecodeError::WrongLength(1, 0)));
        let bad = "e".repeat(52);
        assert_eq!(decode(&bad, 32), Err(DecodeError::InvalidChar('e')));
        // 52 characters carry 260 bits for 256: the top digit may only use 1 bit.
        let overflow = format!("z{}", "0".repeat(51));
        assert_eq!(decode(&overflow, 32), Err(DecodeError::NonZeroPadding));
    }
}
