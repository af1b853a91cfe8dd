//! Candle's errors and panics, turned into one-line messages.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs a candle computation, turning its error, or a panic inside it, into a message.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        // One line: candle appends a backtrace when RUST_BACKTRACE is set.
        Ok(Err(e)) => Err(format!(
            "candle failed {what}: {}",
            e.to_string().lines().next().unwrap_or_default()
        )),
        Err(panic) => Err(format!(
            "candle panicked {what}: {}",
            panic_message(&*panic)
        )),
    }
}

/// A caught panic's message.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}
