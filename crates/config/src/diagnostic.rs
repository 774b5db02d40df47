//! Errors that point into a configuration file.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A place in a configuration file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem: `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    /// Dotted key path (`components.hello.limits.memory`), or "" for the file.
    pub key: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(location: Location, key: String, message: String) -> Self {
        Diagnostic {
            location,
            key,
            message,
        }
    }

    /// A problem with the file as a whole (unreadable, missing).
    pub fn file(path: &Path, message: String) -> Self {
        Diagnostic {
            location: Location {
                file: path.to_path_buf(),
                line: 1,
                column: 1,
            },
            key: String::new(),
            message,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.key, self.message)
        }
    }
}

/// All problems found in one pass (we report every one, not just the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn one(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Maps byte offsets of one file to line and column.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(path: &'a Path, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source { path, line_starts }
    }

    pub fn location(&self, span: Option<Range<usize>>) -> Location {
        let offset = span.map(|s| s.start).unwrap_or(0);
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let column = offset - self.line_starts[line - 1] + 1;
        Location {
            file: self.path.to_path_buf(),
            line,
            column,
        }
    }

    pub fn at(&self, span: Option<Range<usize>>, key: &str, message: String) -> Diagnostic {
        Diagnostic::new(self.location(span), key.to_string(), message)
    }
}

/// toml's serde errors name the offending key in the message
/// (`unknown field `x``, `missing field `y``); surface it as the key.
pub(crate) fn key_from_message(message: &str) -> String {
    for prefix in ["unknown field `", "missing field `", "duplicate key `"] {
        if let Some(rest) = message.find(prefix).map(|i| &message[i + prefix.len()..])
            && let Some(end) = rest.find('`')
        {
            return rest[..end].to_string();
        }
    }
    String::new()
}
