//! Consistent Overhead Byte Stuffing (Cheshire and Baker, 1999): encodes bytes so that no
//! zero remains, so a zero byte can end each frame and a receiver that starts mid-stream or
//! loses bytes finds the next frame at the next zero. For at most 254 input bytes the
//! encoding is exactly one byte longer.

use alloc::vec::Vec;

/// Appends the COBS encoding of `src` to `out` (without the terminating zero).
pub fn encode_into(src: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for (i, &b) in src.iter().enumerate() {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            // A full block of 254 bytes: a new block starts only if more bytes follow.
            if code == 0xff && i + 1 < src.len() {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

/// Decodes one COBS frame (without its terminator); `None` if it is not valid COBS (a zero
/// inside, or a code running past the end).
pub fn decode(src: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let code = src[i] as usize;
        if code == 0 || i + code > src.len() {
            return None;
        }
        let block = &src[i + 1..i + code];
        if block.contains(&0) {
            return None;
        }
        out.extend_from_slice(block);
        i += code;
        if code < 0xff && i < src.len() {
            out.push(0);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn encode(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(src, &mut out);
        out
    }

    #[test]
    fn known_encodings_from_the_paper_and_round_trips() {
        assert_eq!(encode(&[]), vec![1]);
        assert_eq!(encode(&[0]), vec![1, 1]);
        assert_eq!(encode(&[0, 0]), vec![1, 1, 1]);
        assert_eq!(
            encode(&[0x11, 0x22, 0x00, 0x33]),
            vec![3, 0x11, 0x22, 2, 0x33]
        );
        assert_eq!(encode(&[0x11, 0x00, 0x00, 0x00]), vec![2, 0x11, 1, 1, 1]);
        let long: Vec<u8> = (1..=254).collect();
        let e = encode(&long);
        assert_eq!((e[0], e.len()), (0xff, 255));
        for src in [
            vec![],
            vec![0],
            long.clone(),
            [long.clone(), vec![0, 7]].concat(),
        ] {
            let e = encode(&src);
            assert!(!e.contains(&0));
            assert_eq!(decode(&e).unwrap(), src);
        }
        assert_eq!(decode(&[0]), None);
        assert_eq!(decode(&[5, 1, 2]), None);
        assert_eq!(decode(&[3, 1, 0]), None);
    }
}
