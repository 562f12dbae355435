//! Integration tests of `kiln-dockerfile`, one module per topic, driven by data files under
//! `tests/data/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dockerignore;
mod instructions;
mod plan;
