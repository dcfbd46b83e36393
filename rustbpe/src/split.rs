//! Pre-tokenization: cut text into the pieces BPE works within.
//!
//! The default (GPT-4 style) patterns are split by a hand-written scanner that reproduces the
//! backtracking regex's leftmost-first semantics alternative by alternative; it is several times faster
//! than running the pattern through `fancy-regex`, and the split-and-count pass dominates training time.
//! Any other pattern goes through `fancy-regex` (the engine tiktoken uses).

use std::sync::OnceLock;

use crate::unicode_tables::{LETTER, NUMBER, WHITE_SPACE};

/// nanochat's split pattern: GPT-4's with numbers grouped by at most 2 digits.
pub const GPT4_PATTERN_N2: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// The same with GPT-4's original `\p{N}{1,3}`.
pub const GPT4_PATTERN_N3: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const L: u8 = 1;
const N: u8 = 2;
const W: u8 = 4;

/// Character class bits for the Basic Multilingual Plane (one byte per code point, built once).
fn bmp_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![0u8; 0x10000];
        for (bit, ranges) in [(L, LETTER), (N, NUMBER), (W, WHITE_SPACE)] {
            for &(a, b) in ranges {
                if a > 0xFFFF {
                    break;
                }
                for cp in a..=b.min(0xFFFF) {
                    t[cp as usize] |= bit;
                }
            }
        }
        t
    })
}

fn in_ranges(ranges: &[(u32, u32)], cp: u32) -> bool {
    ranges
        .binary_search_by(|&(a, b)| {
            if b < cp {
                std::cmp::Ordering::Less
            } else if a > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Class bits (L, N, W) of a code point, as the `regex` module sees `\p{L}`, `\p{N}` and `\s`.
#[inline]
pub fn class_of(cp: u32) -> u8 {
    if cp < 0x10000 {
        bmp_table()[cp as usize]
    } else {
        let mut k = 0;
        if in_ranges(LETTER, cp) {
            k |= L;
        }
        if in_ranges(NUMBER, cp) {
            k |= N;
        }
        if in_ranges(WHITE_SPACE, cp) {
            k |= W;
        }
        k
    }
}

/// Decode the char starting at byte `i` of valid UTF-8: (code point, byte length).
#[inline(always)]
fn dec(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// Class of the char at byte `i`: (class bits, code point, byte length).
#[inline(always)]
fn cls(s: &[u8], i: usize) -> (u8, u32, usize) {
    let (c, l) = dec(s, i);
    (class_of(c), c, l)
}

#[inline(always)]
fn letters_end(s: &[u8], mut j: usize) -> usize {
    let n = s.len();
    while j < n {
        let b = s[j];
        if b < 0x80 {
            // ASCII fast path: letters are exactly [A-Za-z].
            if (b | 0x20).wrapping_sub(b'a') < 26 {
                j += 1;
                continue;
            }
            break;
        }
        let (k, _, l) = cls(s, j);
        if k & L == 0 {
            break;
        }
        j += l;
    }
    j
}

/// End (byte offset) of the piece starting at byte `i` under the GPT-4 pattern with
/// `\p{N}{1,max_digits}`. Each block mirrors one alternative, tried in the pattern's order.
#[inline]
fn gpt4_piece_end(s: &[u8], i: usize, max_digits: usize) -> usize {
    let n = s.len();
    let (k0, c0, l0) = cls(s, i);
    // 1. '(?i:[sdmt]|ll|ve|re)   (case-insensitive `s` also matches U+017F LATIN SMALL LETTER LONG S)
    if c0 == '\'' as u32 && i + 1 < n {
        match s[i + 1] {
            b's' | b'S' | b'd' | b'D' | b'm' | b'M' | b't' | b'T' => return i + 2,
            0xC5 if i + 2 < n && s[i + 2] == 0xBF => return i + 3, // U+017F
            _ => {}
        }
        if i + 2 < n {
            let (a, b) = (s[i + 1] | 0x20, s[i + 2] | 0x20);
            if s[i + 1] < 0x80
                && s[i + 2] < 0x80
                && matches!((a, b), (b'l', b'l') | (b'v', b'e') | (b'r', b'e'))
            {
                return i + 3;
            }
        }
    }
    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+   (the optional prefix is possessive: no retry without it)
    if k0 & L != 0 {
        return letters_end(s, i + l0);
    }
    if k0 & N == 0 && c0 != '\r' as u32 && c0 != '\n' as u32 && i + l0 < n {
        let (k1, _, l1) = cls(s, i + l0);
        if k1 & L != 0 {
            return letters_end(s, i + l0 + l1);
        }
    }
    // 3. \p{N}{1,max_digits}
    if k0 & N != 0 {
        let mut j = i + l0;
        let mut count = 1;
        while count < max_digits && j < n {
            let (k, _, l) = cls(s, j);
            if k & N == 0 {
                break;
            }
            j += l;
            count += 1;
        }
        return j;
    }
    // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`
    {
        let mut j = if c0 == ' ' as u32 { i + 1 } else { i };
        if j < n {
            let (k, _, l) = cls(s, j);
            if k & (W | L | N) == 0 {
                j += l;
                while j < n {
                    let (k, _, l) = cls(s, j);
                    if k & (W | L | N) != 0 {
                        break;
                    }
                    j += l;
                }
                while j < n && (s[j] == b'\r' || s[j] == b'\n') {
                    j += 1;
                }
                return j;
            }
        }
    }
    // 5-7: c0 is whitespace here (every other class matched above).
    debug_assert!(k0 & W != 0);
    let mut e = i;
    let mut last_nl = 0;
    let mut last_start = i;
    while e < n {
        let (k, c, l) = cls(s, e);
        if k & W == 0 {
            break;
        }
        if c == '\r' as u32 || c == '\n' as u32 {
            last_nl = e + 1;
        }
        last_start = e;
        e += l;
    }
    // 5. \s*[\r\n]: the longest whitespace prefix that ends in a line break.
    if last_nl > 0 {
        return last_nl;
    }
    // 6. \s+(?!\S): the run, minus its last char when a non-space follows.
    if e == n {
        return e;
    }
    if last_start > i {
        return last_start;
    }
    // 7. \s+
    e
}

/// A pre-tokenizer: hand-written for the GPT-4 patterns, fancy-regex for anything else.
pub enum Splitter {
    Gpt4 { max_digits: usize },
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == GPT4_PATTERN_N2 {
            return Ok(Splitter::Gpt4 { max_digits: 2 });
        }
        if pattern == GPT4_PATTERN_N3 {
            return Ok(Splitter::Gpt4 { max_digits: 3 });
        }
        Self::new_regex(pattern)
    }

    /// Always use fancy-regex (tests compare the two paths).
    pub fn new_regex(pattern: &str) -> Result<Splitter, String> {
        fancy_regex::Regex::new(pattern)
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| format!("invalid split pattern: {e}"))
    }

    pub fn is_hand_written(&self) -> bool {
        matches!(self, Splitter::Gpt4 { .. })
    }

    /// Call `f` on each piece of `text`, in order. Errors only for regex engine failures
    /// (e.g. fancy-regex's backtrack limit on a pathological custom pattern).
    #[inline]
    pub fn for_each<'a, F: FnMut(&'a str)>(&self, text: &'a str, mut f: F) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => {
                let s = text.as_bytes();
                let mut i = 0;
                while i < s.len() {
                    let e = gpt4_piece_end(s, i, *max_digits);
                    // SAFETY: gpt4_piece_end only returns char boundaries of valid UTF-8 input.
                    f(unsafe { text.get_unchecked(i..e) });
                    i = e;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed: {e}"))?;
                    // Empty matches carry no bytes; regex.findall would report them, BPE ignores them.
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    pub fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>, String> {
        let mut v = Vec::new();
        self.for_each(text, |p| v.push(p))?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hand(t: &str) -> Vec<&str> {
        Splitter::new(GPT4_PATTERN_N2).unwrap().split(t).unwrap()
    }

    #[test]
    fn known_splits() {
        assert_eq!(hand("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            hand("I'm here, it's 12345!"),
            vec!["I", "'m", " here", ",", " it", "'s", " ", "12", "34", "5", "!"]
        );
        assert_eq!(hand("a  b"), vec!["a", " ", " b"]);
        assert_eq!(hand("x\n\n  y"), vec!["x", "\n\n", " ", " y"]);
        assert_eq!(hand("end  "), vec!["end", "  "]);
        assert_eq!(hand("?!\n\nok"), vec!["?!\n\n", "ok"]);
        assert_eq!(hand("'ſ 'LL 'Ve"), vec!["'ſ", " '", "LL", " '", "Ve"]);
        assert_eq!(hand(""), Vec::<&str>::new());
    }

    #[test]
    fn hand_written_is_detected() {
        assert!(Splitter::new(GPT4_PATTERN_N2).unwrap().is_hand_written());
        assert!(Splitter::new(GPT4_PATTERN_N3).unwrap().is_hand_written());
        assert!(!Splitter::new(r"\w+|\s+").unwrap().is_hand_written());
        assert!(Splitter::new(r"(unclosed").is_err());
    }

    /// Deterministic xorshift so the test needs no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn hand_written_matches_fancy_regex_on_random_text() {
        let alphabet: Vec<char> = "aZ'sStTdmMlLvVeErR 0123456789\t\n\r\u{a0}\u{3000}\u{2028}.,!?-_()ſé中文😀١٢①\u{85}\u{b}\u{c}\u{1c}#"
            .chars()
            .collect();
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for pat in [GPT4_PATTERN_N2, GPT4_PATTERN_N3] {
            let hand = Splitter::new(pat).unwrap();
            let re = Splitter::new_regex(pat).unwrap();
            for _ in 0..20000 {
                let len = (rng.next() % 24) as usize;
                let t: String =
                    (0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize]).collect();
                assert_eq!(hand.split(&t).unwrap(), re.split(&t).unwrap(), "text {t:?}");
            }
        }
    }

    #[test]
    fn classes_agree_with_fancy_regex_on_common_scripts() {
        // Over the BMP the `regex` module's tables (ours) and regex-syntax's should agree except for
        // code points assigned in different Unicode versions; require near-total agreement.
        let re_l = fancy_regex::Regex::new(r"^\p{L}$").unwrap();
        let re_n = fancy_regex::Regex::new(r"^\p{N}$").unwrap();
        let re_w = fancy_regex::Regex::new(r"^\s$").unwrap();
        let mut diffs = Vec::new();
        for cp in (0u32..0x30000).filter(|c| !(0xD800..=0xDFFF).contains(c)) {
            let ch = char::from_u32(cp).unwrap().to_string();
            let k = class_of(cp);
            let theirs = (re_l.is_match(&ch).unwrap() as u8) * L
                | (re_n.is_match(&ch).unwrap() as u8) * N
                | (re_w.is_match(&ch).unwrap() as u8) * W;
            if k != theirs {
                diffs.push(cp);
            }
        }
        assert!(
            diffs.len() < 2000,
            "{} class differences, first {:X?}",
            diffs.len(),
            &diffs[..diffs.len().min(20)]
        );
        eprintln!(
            "class differences vs regex-syntax: {} (first {:X?})",
            diffs.len(),
            &diffs[..diffs.len().min(20)]
        );
    }
}
