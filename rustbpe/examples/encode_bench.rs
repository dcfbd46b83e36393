//! Timing of single-threaded encoding. Usage: encode_bench RANKS_FILE TEXT_FILE
//! RANKS_FILE: for each rank in order, a little-endian u32 length then the token bytes.
use std::time::Instant;

use _rustbpe::encode::Encoder;
use _rustbpe::split::{Splitter, GPT4_PATTERN_N2};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let raw = std::fs::read(&args[1]).unwrap();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let n = u32::from_le_bytes(raw[i..i + 4].try_into().unwrap()) as usize;
        tokens.push(raw[i + 4..i + 4 + n].to_vec());
        i += 4 + n;
    }
    let text = std::fs::read_to_string(&args[2]).unwrap();
    let docs: Vec<&str> = text.split('\0').collect();
    let enc = Encoder::new(tokens, Splitter::new(GPT4_PATTERN_N2).unwrap());
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0;
        for d in &docs {
            n += enc.encode(d).unwrap().len();
        }
        let dt = t.elapsed().as_secs_f64();
        println!("encode per doc: {n} tokens, {:.3}s, {:.1} MB/s", dt, text.len() as f64 / dt / 1e6);
    }
}
