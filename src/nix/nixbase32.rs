//! Nix's base32: a custom alphabet (no `e`, `o`, `u`, `t`) and a bit order
//! that starts from the *last* 5-bit group, so it is not RFC 4648 base32.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nixbase32 string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Nixbase32Error {
    #[error("invalid nixbase32 character {:?} at position {position}", char::from(*.byte))]
    InvalidChar { byte: u8, position: usize },
    #[error("{len} is not a valid nixbase32 string length")]
    InvalidLength { len: usize },
    #[error("expected {expected} nixbase32 characters, got {actual}")]
    WrongLength { expected: usize, actual: usize },
    #[error("nixbase32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Number of characters needed to encode `n` bytes.
pub fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Encodes `bytes` the way Nix prints hashes and store path digests.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        // u16 arithmetic so the `<< 8` for j == 0 cannot overflow.
        let lo = u16::from(bytes.get(i).copied().unwrap_or(0)) >> j;
        let hi = u16::from(bytes.get(i + 1).copied().unwrap_or(0)) << (8 - j);
        out.push(char::from(ALPHABET[usize::from((lo | hi) & 0x1f)]));
    }
    out
}

fn digit(byte: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == byte).map(|p| p as u8)
}

/// Decodes a nixbase32 string into `s.len() * 5 / 8` bytes.
///
/// Lengths that `encode` can never produce and set bits beyond the last byte
/// are rejected so every byte string has exactly one accepted encoding.
pub fn decode(s: &[u8]) -> Result<Vec<u8>, Nixbase32Error> {
    let out_len = s.len() * 5 / 8;
    if encoded_len(out_len) != s.len() {
        return Err(Nixbase32Error::InvalidLength { len: s.len() });
    }
    let mut out = vec![0u8; out_len];
    for (position, &byte) in s.iter().enumerate() {
        let d = u16::from(digit(byte).ok_or(Nixbase32Error::InvalidChar { byte, position })?);
        // The first character holds the highest bits.
        let n = s.len() - 1 - position;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let shifted = d << j;
        match out.get_mut(i) {
            Some(o) => *o |= (shifted & 0xff) as u8,
            None => return Err(Nixbase32Error::NonZeroPadding),
        }
        let carry = (shifted >> 8) as u8;
        if carry != 0 {
            match out.get_mut(i + 1) {
                Some(o) => *o |= carry,
                None => return Err(Nixbase32Error::NonZeroPadding),
            }
        }
    }
    Ok(out)
}

/// Decodes into a fixed-size array, e.g. a 20-byte store path digest.
pub fn decode_fixed<const N: usize>(s: &[u8]) -> Result<[u8; N], Nixbase32Error> {
    let expected = encoded_len(N);
    if s.len() != expected {
        return Err(Nixbase32Error::WrongLength {
            expected,
            actual: s.len(),
        });
    }
    let v = decode(s)?;
    v.try_into().map_err(|_| Nixbase32Error::WrongLength {
        expected,
        actual: s.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use data_encoding::HEXLOWER;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SHA256_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

    #[test]
    fn encodes_known_vectors() {
        let digest = HEXLOWER.decode(EMPTY_SHA256.as_bytes()).unwrap();
        assert_eq!(encode(&digest), EMPTY_SHA256_NIX32);
        assert_eq!(encode(&[0u8; 20]), "0".repeat(32));
        assert_eq!(encode(&[]), "");
        // sha256("test\n") as printed by nix-hash --base32.
        let test = HEXLOWER
            .decode(b"f2ca1bb6c7e907d06dafe4687e579fce76b37e4e93b7605022da52e6ccc26fd2")
            .unwrap();
        assert_eq!(
            encode(&test),
            "1lkgqb6fclns49861dwk9rzb6xnfkxbpws74mxnx01z9qyv1pjpj"
        );
    }

    #[test]
    fn decodes_known_vectors() {
        let digest: [u8; 32] = decode_fixed(EMPTY_SHA256_NIX32.as_bytes()).unwrap();
        assert_eq!(HEXLOWER.encode(&digest), EMPTY_SHA256);
        assert_eq!(decode(&[b'0'; 32]).unwrap(), vec![0u8; 20]);
        assert_eq!(decode(b"").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
    }

    #[test]
    fn roundtrips_all_small_lengths() {
        for n in 0..=70usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(151) ^ 0xa5).collect();
            let enc = encode(&bytes);
            assert_eq!(enc.len(), encoded_len(n));
            assert_eq!(decode(enc.as_bytes()).unwrap(), bytes, "n={n}");
            let ff = vec![0xffu8; n];
            assert_eq!(decode(encode(&ff).as_bytes()).unwrap(), ff);
        }
    }

    #[test]
    fn rejects_invalid_char() {
        let mut s = EMPTY_SHA256_NIX32.as_bytes().to_vec();
        s[3] = b'e';
        assert_eq!(
            decode(&s),
            Err(Nixbase32Error::InvalidChar {
                byte: b'e',
                position: 3
            })
        );
        assert!(decode("0000000000000000000000000000000é".as_bytes()).is_err());
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(decode(b"0"), Err(Nixbase32Error::InvalidLength { len: 1 }));
        assert_eq!(
            decode(&[b'0'; 33]),
            Err(Nixbase32Error::InvalidLength { len: 33 })
        );
        assert_eq!(
            decode_fixed::<20>(&[b'0'; 31]),
            Err(Nixbase32Error::WrongLength {
                expected: 32,
                actual: 31
            })
        );
    }

    #[test]
    fn rejects_nonzero_padding() {
        // 52 chars carry 260 bits for 256: the first char may only be 0 or 1.
        let mut s = EMPTY_SHA256_NIX32.as_bytes().to_vec();
        s[0] = b'z';
        assert_eq!(decode(&s), Err(Nixbase32Error::NonZeroPadding));
        assert_eq!(decode(b"z0"), Err(Nixbase32Error::NonZeroPadding));
    }

    #[test]
    fn never_panics_on_garbage() {
        for len in 0..120usize {
            for fill in [b'z', b'0', b'e', 0xff] {
                let _ = decode(&vec![fill; len]);
                let _ = decode_fixed::<32>(&vec![fill; len]);
            }
        }
    }
}
