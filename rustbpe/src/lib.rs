//! Byte-level BPE trainer and encoder for nanoctl (placeholder; filled in by the tokenizer work).
use pyo3::prelude::*;

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
