//! Running a benchmark cell so that a panic inside it (a backend refusing an allocation,
//! raised when a result is read back) becomes the cell's failure instead of ending the run.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// `f()`, with a panic inside it turned into `Err(its message)`.
pub fn caught<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string()))
    })
}
