//! Candle's errors and panics, turned into one-line messages.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs a candle computation, turning its error, or a panic inside it, into a message.
pub(crate) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        // One line: candle appends a backtrace when RUST_BACKTRACE is set;
        // and short: candle's messages may quote a value from the file.
        Ok(Err(e)) => Err(format!(
            "candle failed {what}: {}",
            first_line(&e.to_string())
        )),
        Err(panic) => Err(format!(
            "candle panicked {what}: {}",
            panic_message(&*panic)
        )),
    }
}

/// Most characters of candle's message a message keeps.
const MESSAGE_CHARS: usize = 300;

/// The first line of `text`, cut after [`MESSAGE_CHARS`] characters.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
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
