//! memattr: models of KVM's per-page memory attributes.
//!
//! The pure-Rust core (stores, hugepage tracking) lives in plain modules that
//! `cargo test` covers without Python. The PyO3 layer in `py/` only adapts
//! types and errors and is compiled only with the `python` feature.

pub mod frametable;
pub mod hostmem;
pub mod hugepage;
pub mod interrupt;
pub mod kvm;
pub mod locks;
pub mod mapletree;
pub mod prefetch;
pub mod rangetree;
pub mod store;
pub mod tdp;
pub mod xarray;

// The BTreeMap reference store: tests only (benches/stores.rs includes the
// same file by #[path]); not part of the shipped library.
#[cfg(test)]
mod simple_rangetree;

#[cfg(feature = "python")]
mod py;
