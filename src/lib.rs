#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use donate_host;
pub use donate_proto;
pub use donate_std;
