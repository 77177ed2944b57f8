//! The programs live in `main.rs` (built for the BPF target by aya-build);
//! this library target exists so cargo doesn't warn about a bin-only crate.
#![no_std]
