//! Hash-map keys for short byte strings stored by value.
//!
//! Most pieces and tokens are at most 15 bytes. Packing them into two u64s (bytes, then the length in
//! the last byte) means a lookup compares 16 bytes in the table itself instead of chasing a pointer
//! into the text or a heap `Vec`, which was the main cost (cache misses) of counting and encoding.

use std::hash::{Hash, Hasher};

use ahash::AHashMap;

/// Longest byte string a `ShortKey` holds.
pub const SHORT: usize = 15;

/// Two u64 halves (8-byte alignment) so a map entry with a u32 value takes 24 bytes, not 32.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortKey([u64; 2]);

impl Hash for ShortKey {
    #[inline(always)]
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.0[0] ^ self.0[1].rotate_left(29));
    }
}

impl ShortKey {
    /// `p.len()` must be <= SHORT.
    #[inline(always)]
    pub fn new(p: &[u8]) -> ShortKey {
        debug_assert!(p.len() <= SHORT);
        let mut b = [0u8; 16];
        b[..p.len()].copy_from_slice(p);
        b[15] = p.len() as u8;
        ShortKey([
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..].try_into().unwrap()),
        ])
    }

    /// The bytes back: (buffer, length).
    #[inline(always)]
    pub fn bytes(&self) -> ([u8; 16], usize) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.0[0].to_le_bytes());
        b[8..].copy_from_slice(&self.0[1].to_le_bytes());
        let n = b[15] as usize;
        (b, n)
    }
}

/// A map from byte strings to `V`: short keys by value, longer ones by their bytes.
pub struct BytesMap<V> {
    short: AHashMap<ShortKey, V>,
    long: AHashMap<Box<[u8]>, V>,
}

impl<V> Default for BytesMap<V> {
    fn default() -> Self {
        BytesMap { short: AHashMap::new(), long: AHashMap::new() }
    }
}

impl<V> BytesMap<V> {
    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    pub fn get(&self, k: &[u8]) -> Option<&V> {
        if k.len() <= SHORT {
            self.short.get(&ShortKey::new(k))
        } else {
            self.long.get(k)
        }
    }

    #[inline(always)]
    pub fn insert(&mut self, k: &[u8], v: V) {
        if k.len() <= SHORT {
            self.short.insert(ShortKey::new(k), v);
        } else {
            self.long.insert(k.into(), v);
        }
    }

    pub fn clear(&mut self) {
        self.short.clear();
        self.long.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_roundtrip_and_differ_by_length() {
        for p in [&b""[..], b"a", b"a\0", b"hello world!!!!", b"\0\0\0"] {
            let (b, n) = ShortKey::new(p).bytes();
            assert_eq!(&b[..n], p);
        }
        assert!(ShortKey::new(b"a") != ShortKey::new(b"a\0"));
        let mut m = BytesMap::default();
        m.insert(b"short", 1);
        m.insert(b"a much longer key than fifteen bytes", 2);
        assert_eq!(m.get(b"short"), Some(&1));
        assert_eq!(m.get(b"a much longer key than fifteen bytes"), Some(&2));
        assert_eq!(m.get(b"shor"), None);
        assert_eq!(m.len(), 2);
    }
}
