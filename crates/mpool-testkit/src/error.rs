//! The testkit's error: a message saying what failed, with what was seen (logs included).

use std::fmt;

/// Why something the testkit started or waited for failed. Its `Debug` is its message, so
/// `.expect("...")` in a test prints logs with their line breaks.
#[derive(Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }

    /// This error with `context: ` in front.
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error(format!("{context}: {}", self.0))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Error {
        Error(message.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error(e.to_string())
    }
}

/// Lets callers that report errors as strings (the benchmark scenarios) use `?`.
impl From<Error> for String {
    fn from(e: Error) -> String {
        e.0
    }
}

/// A result with the testkit's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
