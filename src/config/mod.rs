//! Configuration: the YAML schema ([`schema`]), human-friendly value types ([`units`]), the
//! legal range of every number, duration and size ([`ranges`]) and whole-file validation
//! ([`load`]), which turns a file into an immutable, checked [`Config`].
//!
//! Nothing opens a socket until [`load`] (or [`parse`]) has accepted the whole file: every error
//! names the file, the key path and what is wrong.

mod load;
mod ranges;
mod resilience;
mod schema;
mod units;

pub(crate) use load::validate;
pub use load::{load, parse, ConfigError, DEFAULT_CONFIG_YAML};
pub use resilience::*;
pub use schema::*;
pub use units::{ByteSize, Seconds};
