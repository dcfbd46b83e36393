//! Byte-level BPE trainer and encoder for nanoctl, exposed to Python as `nanoctl._rustbpe`.
//!
//! Training pulls strings from a Python iterator in batches while a worker thread (GIL released)
//! splits and counts the previous batch with rayon, then runs the merge loop without the GIL.
//! The result exports as tiktoken mergeable ranks + pattern; `encode`/`batch_encode` are
//! token-identical to tiktoken on the same ranks.
//!
//! Being the package's only native extension, it also carries one CPU kernel for the model's fused
//! loss (`softcap`), so that no C++ toolchain is needed at run time.
pub mod argmax;
pub mod decode_attention;
pub mod packed_matmul;
pub mod encode;
pub mod keys;
pub mod softcap;
pub mod split;
pub mod train;
mod unicode_tables;

use std::time::Instant;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use encode::Encoder;
use split::{Splitter, GPT4_PATTERN_N2};
use train::{token_bytes, train_merges, Pair, PieceCounts};

/// Flush a batch to the counting worker at this many bytes even if `buffer_size` docs aren't reached.
const BATCH_BYTES: usize = 16 << 20;

#[derive(Clone, Default)]
struct TrainStats {
    docs: u64,
    chars: u64,
    bytes: u64,
    pieces: u64,
    unique_pieces: usize,
    unique_words: usize,
    initial_pairs: usize,
    count_seconds: f64,
    merge_seconds: f64,
}

/// A byte-level BPE tokenizer: train from text, export tiktoken ranks, encode and decode.
#[pyclass(module = "nanoctl._rustbpe")]
struct Tokenizer {
    pattern: String,
    merges: Vec<Pair>,
    encoder: Option<Encoder>,
    stats: TrainStats,
}

fn value_err(e: String) -> PyErr {
    PyValueError::new_err(e)
}

impl Tokenizer {
    fn enc(&self) -> PyResult<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| {
            PyValueError::new_err("tokenizer is empty: train it or build it with from_ranks()")
        })
    }
}

/// Borrow the UTF-8 text of a Python str, or say which item was not a valid one.
fn text_of<'a>(item: &'a Bound<'_, PyAny>, what: &str, idx: u64) -> PyResult<&'a str> {
    let s = item.downcast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} {idx} is a {}, expected str",
            item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
        ))
    })?;
    s.to_str().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} {idx} is not valid Unicode (it holds a lone surrogate, e.g. from undecodable bytes)"
        ))
    })
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer {
            pattern: GPT4_PATTERN_N2.to_string(),
            merges: Vec::new(),
            encoder: None,
            stats: TrainStats::default(),
        }
    }

    /// Train on the strings of `iterator` until `vocab_size` tokens (256 bytes + merges) exist or no
    /// pair is left. `progress(stage, done, total)` is called with ("read", docs, chars) per batch and
    /// ("merge", merges_done, merges_total) about every 1%; an exception it raises aborts training.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None, progress=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: u32,
        buffer_size: usize,
        pattern: Option<String>,
        progress: Option<PyObject>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!("vocab_size must be at least 256, got {vocab_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN_N2.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_err)?;
        let buffer_size = buffer_size.max(1);
        let mut stats = TrainStats::default();
        let t0 = Instant::now();

        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<String>>(2);
        let counted: PyResult<PieceCounts> = std::thread::scope(|scope| {
            let splitter_ref = &splitter;
            let worker = scope.spawn(move || -> Result<PieceCounts, String> {
                let mut pc = PieceCounts::new();
                for batch in rx {
                    pc.add_batch(splitter_ref, &batch)?;
                }
                Ok(pc)
            });
            let pulled = (|| -> PyResult<()> {
                let mut buf: Vec<String> = Vec::with_capacity(buffer_size);
                let mut buf_bytes = 0usize;
                let send = |py: Python<'_>, buf: Vec<String>, stats: &TrainStats| -> PyResult<bool> {
                    // A closed channel means the worker failed; its error is reported after join.
                    let ok = py.allow_threads(|| tx.send(buf).is_ok());
                    py.check_signals()?;
                    if let Some(cb) = &progress {
                        cb.call1(py, ("read", stats.docs, stats.chars))?;
                    }
                    Ok(ok)
                };
                for item in iterator.try_iter()? {
                    let item = item?;
                    let text = text_of(&item, "document", stats.docs)?;
                    stats.docs += 1;
                    stats.chars += item.len()? as u64;
                    stats.bytes += text.len() as u64;
                    buf_bytes += text.len();
                    buf.push(text.to_owned());
                    if buf.len() >= buffer_size || buf_bytes >= BATCH_BYTES {
                        let full = std::mem::replace(&mut buf, Vec::with_capacity(buffer_size));
                        buf_bytes = 0;
                        if !send(py, full, &stats)? {
                            return Ok(());
                        }
                    }
                }
                if !buf.is_empty() {
                    send(py, buf, &stats)?;
                }
                Ok(())
            })();
            drop(tx);
            let joined = py.allow_threads(|| worker.join());
            let pc = match joined {
                Ok(r) => r.map_err(value_err),
                Err(_) => Err(PyValueError::new_err("BPE counting worker panicked")),
            };
            pulled?;
            pc
        });
        let counts = counted?;
        stats.pieces = counts.pieces;
        stats.unique_pieces = counts.unique();
        stats.count_seconds = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let num_merges = (vocab_size - 256) as usize;
        let progress_ref = &progress;
        let (merges, mstats) = py.allow_threads(|| {
            train_merges(counts, num_merges, |done, total| {
                Python::with_gil(|py| -> PyResult<()> {
                    py.check_signals()?;
                    if let Some(cb) = progress_ref {
                        cb.call1(py, ("merge", done, total))?;
                    }
                    Ok(())
                })
            })
        })?;
        stats.merge_seconds = t1.elapsed().as_secs_f64();
        stats.unique_words = mstats.unique_words;
        stats.initial_pairs = mstats.initial_pairs;

        self.encoder = Some(Encoder::new(token_bytes(&merges), Splitter::new(&pattern).map_err(value_err)?));
        self.merges = merges;
        self.pattern = pattern;
        self.stats = stats;
        Ok(())
    }

    /// Build an encoder from tiktoken-style ranks ({bytes: rank} or [(bytes, rank)], ranks 0..n-1).
    #[staticmethod]
    #[pyo3(signature = (mergeable_ranks, pattern=None))]
    fn from_ranks(mergeable_ranks: &Bound<'_, PyAny>, pattern: Option<String>) -> PyResult<Tokenizer> {
        let items: Vec<(Vec<u8>, u32)> = if let Ok(d) = mergeable_ranks.downcast::<PyDict>() {
            d.iter().map(|(k, v)| Ok((k.extract()?, v.extract()?))).collect::<PyResult<_>>()?
        } else {
            mergeable_ranks.extract()?
        };
        let mut tokens: Vec<Option<Vec<u8>>> = vec![None; items.len()];
        for (b, r) in items {
            let slot = tokens.get_mut(r as usize).ok_or_else(|| {
                PyValueError::new_err(format!("rank {r} is out of range: ranks must be 0..n-1"))
            })?;
            if slot.is_some() {
                return Err(PyValueError::new_err(format!("rank {r} appears twice")));
            }
            *slot = Some(b);
        }
        let tokens: Vec<Vec<u8>> =
            tokens.into_iter().map(|t| t.expect("n ranks in 0..n, no duplicates")).collect();
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN_N2.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_err)?;
        Ok(Tokenizer {
            pattern,
            merges: Vec::new(),
            encoder: Some(Encoder::new(tokens, splitter)),
            stats: TrainStats::default(),
        })
    }

    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, rank)] in rank order: the 256 bytes, then one entry per merge.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let enc = self.enc()?;
        let items = enc.tokens().iter().enumerate().map(|(i, t)| (PyBytes::new(py, t), i as u32));
        PyList::new(py, items)
    }

    /// The learned merges: merge i joins (left id, right id) into id 256 + i (empty for from_ranks).
    fn get_merges(&self) -> Vec<Pair> {
        self.merges.clone()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.encoder.as_ref().map_or(256, |e| e.vocab_size())
    }

    /// Whether the pattern is split by the hand-written GPT-4 scanner (else fancy-regex).
    fn uses_fast_splitter(&self) -> bool {
        self.encoder.as_ref().is_some_and(|e| e.splitter.is_hand_written())
            || (self.encoder.is_none() && Splitter::new(&self.pattern).is_ok_and(|s| s.is_hand_written()))
    }

    /// Counters and timings of the last training run.
    fn train_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.stats;
        let d = PyDict::new(py);
        d.set_item("docs", s.docs)?;
        d.set_item("chars", s.chars)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("pieces", s.pieces)?;
        d.set_item("unique_pieces", s.unique_pieces)?;
        d.set_item("unique_words", s.unique_words)?;
        d.set_item("initial_pairs", s.initial_pairs)?;
        d.set_item("merges", self.merges.len())?;
        d.set_item("count_seconds", s.count_seconds)?;
        d.set_item("merge_seconds", s.merge_seconds)?;
        Ok(d)
    }

    /// Encode one text (no special tokens), single-threaded, GIL released.
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let enc = self.enc()?;
        let t = text_of(text, "text", 0)?;
        py.allow_threads(|| enc.encode(t)).map_err(value_err)
    }

    /// Encode many texts in parallel (rayon, GIL released); `num_threads` limits the pool.
    #[pyo3(signature = (texts, num_threads=None))]
    fn batch_encode(
        &self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let enc = self.enc()?;
        let items: Vec<Bound<'_, PyAny>> = texts.try_iter()?.collect::<PyResult<_>>()?;
        let strs: Vec<&str> =
            items.iter().enumerate().map(|(i, it)| text_of(it, "text", i as u64)).collect::<PyResult<_>>()?;
        let run = || enc.batch_encode(&strs);
        let res = match num_threads {
            Some(n) if n > 0 => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                py.allow_threads(|| pool.install(run))
            }
            _ => py.allow_threads(run),
        };
        res.map_err(value_err)
    }

    /// Bytes of the given ids concatenated.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let b = self
            .enc()?
            .decode_bytes(&ids)
            .map_err(|id| PyValueError::new_err(format!("unknown token id {id}")))?;
        Ok(PyBytes::new(py, &b))
    }

    /// Text of the given ids (invalid UTF-8 becomes U+FFFD, as tiktoken's decode).
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let b = self
            .enc()?
            .decode_bytes(&ids)
            .map_err(|id| PyValueError::new_err(format!("unknown token id {id}")))?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}

/// Split `text` into pre-tokenization pieces with `pattern` (default: nanochat's GPT-4 pattern).
/// `force_regex=True` uses fancy-regex even for the GPT-4 patterns (for testing the fast path).
#[pyfunction]
#[pyo3(signature = (text, pattern=None, force_regex=false))]
fn split_text(text: &Bound<'_, PyAny>, pattern: Option<String>, force_regex: bool) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN_N2.to_string());
    let sp = if force_regex { Splitter::new_regex(&pattern) } else { Splitter::new(&pattern) }
        .map_err(value_err)?;
    let t = text_of(text, "text", 0)?;
    Ok(sp.split(t).map_err(value_err)?.into_iter().map(str::to_owned).collect())
}

/// Whether `pattern` gets the hand-written splitter (else fancy-regex).
#[pyfunction]
fn is_fast_pattern(pattern: &str) -> bool {
    Splitter::new(pattern).is_ok_and(|s| s.is_hand_written())
}

/// In place over a contiguous fp32 (rows x cols) buffer holding logits / softcap: z = tanh(u),
/// e = exp(softcap z); adds e's column sums to the fp32 `sums` (cols) and leaves e (1 - z^2) in the buffer.
///
/// Takes raw addresses (`tensor.data_ptr()`): the caller guarantees both are live, contiguous, fp32,
/// of the given sizes, and not aliased. `nanoctl.model.kernels` is the only caller.
#[pyfunction]
fn softcap_exp_grad(
    py: Python<'_>,
    buf_addr: usize,
    rows: usize,
    cols: usize,
    softcap: f32,
    sums_addr: usize,
    threads: usize,
) -> PyResult<()> {
    if buf_addr == 0 || sums_addr == 0 || cols == 0 {
        return Err(PyValueError::new_err("softcap_exp_grad: null buffer or zero columns"));
    }
    py.allow_threads(|| {
        // SAFETY: the caller's contract above (live, contiguous, fp32, sizes as given, disjoint).
        let buf = unsafe { std::slice::from_raw_parts_mut(buf_addr as *mut f32, rows * cols) };
        let sums = unsafe { std::slice::from_raw_parts_mut(sums_addr as *mut f32, cols) };
        softcap::softcap_exp_grad(buf, cols, softcap, sums, threads);
    });
    Ok(())
}

/// Continuous-batching decode attention over raw fp32 addresses (`tensor.data_ptr()`):
/// `nanoctl.model.kernels.ragged_decode_attention` checks the shapes, strides and dtypes and is the
/// only caller. `k_strides`/`v_strides` are the (slot, position, kv head) element strides of one
/// layer's cache; its last axis is contiguous. q (B, heads, k_dim) and out (B, heads, v_dim) are
/// contiguous; `k_len`/`v_len` are the elements reachable from each cache address. The cache holds fp32
/// elements, or fp16 ones when `half` (q and out are fp32 either way).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ragged_decode_attention(
    py: Python<'_>,
    q_addr: usize,
    k_addr: usize,
    k_len: usize,
    k_strides: (usize, usize, usize),
    k_dim: usize,
    v_addr: usize,
    v_len: usize,
    v_strides: (usize, usize, usize),
    v_dim: usize,
    heads: usize,
    kv_heads: usize,
    slots: Vec<usize>,
    positions: Vec<usize>,
    window: i64,
    scale: f32,
    out_addr: usize,
    threads: usize,
    half: bool,
) -> PyResult<()> {
    if q_addr == 0 || k_addr == 0 || v_addr == 0 || out_addr == 0 {
        return Err(PyValueError::new_err("ragged_decode_attention: null buffer"));
    }
    if slots.len() != positions.len() || heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(PyValueError::new_err("ragged_decode_attention: bad rows or heads"));
    }
    let kl = decode_attention::Layout { slot: k_strides.0, pos: k_strides.1, head: k_strides.2, dim: k_dim };
    let vl = decode_attention::Layout { slot: v_strides.0, pos: v_strides.1, head: v_strides.2, dim: v_dim };
    for (&s, &p) in slots.iter().zip(&positions) {
        let last = |l: decode_attention::Layout| s * l.slot + p * l.pos + (kv_heads - 1) * l.head + l.dim;
        if last(kl) > k_len || last(vl) > v_len {
            return Err(PyValueError::new_err("ragged_decode_attention: a row reaches past its cache"));
        }
    }
    let batch = slots.len();
    py.allow_threads(|| {
        // SAFETY: the caller's contract above (live buffers of these sizes, the cache's elements fp16
        // when `half` else fp32, q/out fp32; out not aliased).
        let q = unsafe { std::slice::from_raw_parts(q_addr as *const f32, batch * heads * k_dim) };
        let out = unsafe { std::slice::from_raw_parts_mut(out_addr as *mut f32, batch * heads * v_dim) };
        macro_rules! attend {
            ($elem:ty) => {{
                let k = unsafe { std::slice::from_raw_parts(k_addr as *const $elem, k_len) };
                let v = unsafe { std::slice::from_raw_parts(v_addr as *const $elem, v_len) };
                let (slots, positions) = (&slots[..], &positions[..]);
                let b = decode_attention::Batch { q, k, v, kl, vl, heads, kv_heads, slots, positions, window, scale };
                decode_attention::ragged_decode_attention(&b, out, threads)
            }};
        }
        if half {
            attend!(decode_attention::F16)
        } else {
            attend!(f32)
        }
    });
    Ok(())
}

/// A decode step's few-rows product over raw fp32 addresses: out (rows x out_cols) = x (rows x dim) @ W^T with W packed
/// in panels of 16 weight rows, each (dim x 16) contiguous (`packed_len` elements, zero past the vocab).
/// `nanoctl.model.kernels.FewRowsMatmul` builds the packing, checks the tensors and is the only caller.
#[pyfunction]
#[pyo3(name = "packed_matmul")]
#[allow(clippy::too_many_arguments)]
fn py_packed_matmul(
    py: Python<'_>,
    x_addr: usize,
    rows: usize,
    dim: usize,
    packed_addr: usize,
    packed_len: usize,
    out_addr: usize,
    out_cols: usize,
    threads: usize,
) -> PyResult<()> {
    if x_addr == 0 || packed_addr == 0 || out_addr == 0 || dim == 0 {
        return Err(PyValueError::new_err("packed_matmul: null buffer or zero dim"));
    }
    if packed_len < out_cols.div_ceil(packed_matmul::PANEL) * dim * packed_matmul::PANEL {
        return Err(PyValueError::new_err("packed_matmul: the packed weight does not cover the output"));
    }
    py.allow_threads(|| {
        // SAFETY: the caller's contract above (live, contiguous fp32 buffers of these sizes).
        let x = unsafe { std::slice::from_raw_parts(x_addr as *const f32, rows * dim) };
        let packed = unsafe { std::slice::from_raw_parts(packed_addr as *const f32, packed_len) };
        let out = unsafe { std::slice::from_raw_parts_mut(out_addr as *mut f32, rows * out_cols) };
        packed_matmul::packed_matmul(x, rows, dim, packed, out, out_cols, threads);
    });
    Ok(())
}

/// Greedy decoding's argmax per row over raw addresses: out (rows,) int64 = argmax of each row of x
/// (rows x cols fp32, row-major), torch's tie and NaN rules. `nanoctl.model.kernels.argmax_rows`
/// checks the tensor and is the only caller.
#[pyfunction]
fn argmax_rows(py: Python<'_>, x_addr: usize, rows: usize, cols: usize, out_addr: usize) -> PyResult<()> {
    if x_addr == 0 || out_addr == 0 || cols == 0 {
        return Err(PyValueError::new_err("argmax_rows: null buffer or zero columns"));
    }
    py.allow_threads(|| {
        // SAFETY: the caller's contract above (a live contiguous fp32 tensor and an int64 output).
        let x = unsafe { std::slice::from_raw_parts(x_addr as *const f32, rows * cols) };
        let out = unsafe { std::slice::from_raw_parts_mut(out_addr as *mut i64, rows) };
        argmax::argmax_rows(x, cols, out);
    });
    Ok(())
}

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("GPT4_PATTERN", GPT4_PATTERN_N2)?;
    m.add("GPT4_PATTERN_N3", split::GPT4_PATTERN_N3)?;
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add_function(wrap_pyfunction!(is_fast_pattern, m)?)?;
    m.add_function(wrap_pyfunction!(softcap_exp_grad, m)?)?;
    m.add_function(wrap_pyfunction!(ragged_decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(py_packed_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(argmax_rows, m)?)?;
    Ok(())
}
