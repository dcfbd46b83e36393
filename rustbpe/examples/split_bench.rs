//! Timing of the split and count passes on a file of NUL-separated documents.
//! Usage: cargo run --release --example split_bench -- FILE
use std::time::Instant;

use _rustbpe::split::{Splitter, GPT4_PATTERN_N2};
use _rustbpe::train::PieceCounts;

fn main() {
    let path = std::env::args().nth(1).expect("usage: split_bench FILE");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<&str> = text.split('\0').collect();
    let sp = Splitter::new(GPT4_PATTERN_N2).unwrap();
    let t = Instant::now();
    let mut n = 0usize;
    for d in &docs {
        sp.for_each(d, |_| n += 1).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    println!("split only: {n} pieces, {:.3}s, {:.1} MB/s", dt, text.len() as f64 / dt / 1e6);
    let t = Instant::now();
    let mut pc = PieceCounts::new();
    pc.add_batch(&sp, &docs).unwrap();
    let dt = t.elapsed().as_secs_f64();
    println!(
        "split+count parallel: {} unique, {:.3}s, {:.1} MB/s",
        pc.unique(),
        dt,
        text.len() as f64 / dt / 1e6
    );
    let re = Splitter::new_regex(GPT4_PATTERN_N2).unwrap();
    let t = Instant::now();
    let mut n2 = 0usize;
    for d in &docs {
        re.for_each(d, |_| n2 += 1).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    println!("fancy-regex split: {n2} pieces, {:.3}s, {:.1} MB/s", dt, text.len() as f64 / dt / 1e6);
}
