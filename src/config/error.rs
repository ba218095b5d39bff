//! The one error type of loading: which file, which key, what is wrong — on one line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a config file was refused. `Display` is one line: `<file>: <key>: <problem>` (or
/// `<file>: <problem>` when no key is involved, as for an unreadable file).
///
/// The key is a path such as `providers[0].accounts[1].quota_limit`, or the name of the
/// `QUOTAGATE__…` variable at fault. Values of secrets never appear in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, as an absolute path.
    pub file: PathBuf,
    /// Where in the file (or which environment variable); empty when the whole file is at fault.
    pub key: String,
    /// What is wrong, in plain words.
    pub problem: String,
}

impl ConfigError {
    pub(super) fn new(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            // Messages from libraries occasionally span lines; the contract is one line.
            problem: one_line(&problem.into()),
        }
    }

    /// Turns an [`Issue`] into an error about `file`. When the key was set by a `QUOTAGATE__…`
    /// variable the problem says so, since the file then shows a different value.
    pub(super) fn from_issue(
        file: &Path,
        issue: Issue,
        overridden: &BTreeMap<String, String>,
    ) -> Self {
        let problem = match overridden.get(&issue.key) {
            Some(var) => format!("{} (set by {var})", issue.problem),
            None => issue.problem,
        };
        ConfigError::new(file, issue.key, problem)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A problem found while loading, before the file it belongs to is attached.
#[derive(Debug)]
pub(super) struct Issue {
    pub key: String,
    pub problem: String,
}

impl Issue {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Issue {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
