//! Timing of training phases on a file of NUL-separated documents. Usage: train_bench FILE [VOCAB]
use std::time::Instant;

use _rustbpe::split::{Splitter, GPT4_PATTERN_N2};
use _rustbpe::train::{train_merges, PieceCounts};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let vocab: usize = args.get(2).map_or(32768, |v| v.parse().unwrap());
    let docs: Vec<&str> = text.split('\0').collect();
    let sp = Splitter::new(GPT4_PATTERN_N2).unwrap();
    let t = Instant::now();
    let mut pc = PieceCounts::new();
    pc.add_batch(&sp, &docs).unwrap();
    println!("count: {} unique, {:.3}s", pc.unique(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (m, st) = train_merges::<()>(pc, vocab - 256, |_, _| Ok(())).unwrap();
    println!("merge: {} merges, {} words, {:.3}s", m.len(), st.unique_words, t.elapsed().as_secs_f64());
}
