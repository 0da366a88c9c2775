//! The conformance suite, one test binary: every backend compiled in (features `ndarray`,
//! `flex`, `wgpu`) is checked against the f64 dense reference built from the token
//! predicate; layout builders against a brute-force scan; bad input against typed errors.

// burn-ndarray is deprecated upstream (0.22) but is our default backend.
#![allow(deprecated)]

mod bad_input;
mod common;
mod decode;
mod fuzz;
mod half;
mod layouts;
mod matrix;
mod modifiers;
mod options;
mod parity;
