//! What a limit is: its kind, its size, its window and, for a fixed window, its reset schedule.
//!
//! These are the shared vocabulary of the config file, the store and (later) the account actors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Requests admitted in a window.
    Requests,
    /// Tokens (prompt + completion) admitted in a window.
    Tokens,
    /// Requests in flight at once (no window).
    Concurrent,
}

impl LimitKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrent => "concurrent",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LimitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "requests" => Ok(LimitKind::Requests),
            "tokens" => Ok(LimitKind::Tokens),
            "concurrent" => Ok(LimitKind::Concurrent),
            other => Err(format!(
                "unknown limit kind `{other}` (expected requests, tokens or concurrent)"
            )),
        }
    }
}

/// The seed's named limit types (`rpm`, `rph`, `rpd`, `tpm`, `tpd`, `concurrent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamedLimit {
    Rpm,
    Rph,
    Rpd,
    Tpm,
    Tpd,
    Concurrent,
}

impl NamedLimit {
    pub const ALL: [NamedLimit; 6] = [
        NamedLimit::Rpm,
        NamedLimit::Rph,
        NamedLimit::Rpd,
        NamedLimit::Tpm,
        NamedLimit::Tpd,
        NamedLimit::Concurrent,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            NamedLimit::Rpm => "rpm",
            NamedLimit::Rph => "rph",
            NamedLimit::Rpd => "rpd",
            NamedLimit::Tpm => "tpm",
            NamedLimit::Tpd => "tpd",
            NamedLimit::Concurrent => "concurrent",
        }
    }

    pub const fn kind(self) -> LimitKind {
        match self {
            NamedLimit::Rpm | NamedLimit::Rph | NamedLimit::Rpd => LimitKind::Requests,
            NamedLimit::Tpm | NamedLimit::Tpd => LimitKind::Tokens,
            NamedLimit::Concurrent => LimitKind::Concurrent,
        }
    }

    /// The window length; `None` for `concurrent`.
    pub const fn per(self) -> Option<Duration> {
        match self {
            NamedLimit::Rpm | NamedLimit::Tpm => Some(Duration::from_secs(60)),
            NamedLimit::Rph => Some(Duration::from_secs(3600)),
            NamedLimit::Rpd | NamedLimit::Tpd => Some(Duration::from_secs(86_400)),
            NamedLimit::Concurrent => None,
        }
    }

    /// The name of a (kind, window) pair when it is one of the seed's types.
    pub fn from_parts(kind: LimitKind, per: Option<Duration>) -> Option<NamedLimit> {
        NamedLimit::ALL
            .into_iter()
            .find(|n| n.kind() == kind && n.per() == per)
    }
}

impl fmt::Display for NamedLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a limit applies. Every limit is counted per account; a model scope narrows it to one model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitScope {
    /// The provider's limit, applied to each of its accounts across all models.
    Provider,
    /// A provider's per-model limit, applied per account and model.
    Model(String),
}

/// A fixed window resets on a schedule (a cron expression in a timezone) instead of sliding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FixedReset {
    /// Five-field cron expression, e.g. `0 0 * * *`.
    pub cron: String,
    /// IANA timezone name, e.g. `America/Los_Angeles`.
    pub timezone: String,
}

/// One limit: `limit` units of `kind` per `per` (sliding unless `reset` is set).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LimitSpec {
    pub kind: LimitKind,
    pub limit: u64,
    /// Window length; `None` only for `concurrent`.
    pub per: Option<Duration>,
    /// Set for a fixed window with its own reset schedule.
    pub reset: Option<FixedReset>,
}

impl LimitSpec {
    /// The seed's name for this limit when it has one (`rpm`, `tpd`, …), else `requests/2s`-style;
    /// a fixed window adds `:fixed` (so a sliding and a fixed window never share a name).
    pub fn label(&self) -> String {
        let base = match NamedLimit::from_parts(self.kind, self.per) {
            Some(named) => named.as_str().to_string(),
            None => match self.per {
                Some(per) => format!("{}/{}", self.kind, humantime::format_duration(per)),
                None => self.kind.to_string(),
            },
        };
        if self.reset.is_some() {
            format!("{base}:fixed")
        } else {
            base
        }
    }
}

/// `base` with `overrides` applied: an override replaces the limit of the same kind and window
/// length (sliding or fixed alike); others are added. This is how an account's limits override its
/// provider's.
pub fn apply_overrides(mut base: Vec<LimitSpec>, overrides: &[LimitSpec]) -> Vec<LimitSpec> {
    for spec in overrides {
        match base
            .iter_mut()
            .find(|s| s.kind == spec.kind && s.per == spec.per)
        {
            Some(existing) => *existing = spec.clone(),
            None => base.push(spec.clone()),
        }
    }
    base
}

/// How a pool picks among accounts that have room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    #[default]
    LeastUsed,
    Random,
    Best,
}

impl Strategy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastUsed => "least_used",
            Strategy::Random => "random",
            Strategy::Best => "best",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" => Ok(Strategy::RoundRobin),
            "least_used" => Ok(Strategy::LeastUsed),
            "random" => Ok(Strategy::Random),
            "best" => Ok(Strategy::Best),
            other => Err(format!(
                "unknown strategy `{other}` (expected round_robin, least_used, random or best)"
            )),
        }
    }
}

/// How the prompt's size is estimated before a request is sent. Serialised in its text form
/// (`chars:3`, `bytes`, …), the same as in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// One token per `N` characters (rounded up).
    Chars(u32),
    /// One token per byte: a strict upper bound for every BPE tokenizer.
    Bytes,
    /// OpenAI's o200k_base vocabulary.
    O200k,
    /// OpenAI's cl100k_base vocabulary.
    Cl100k,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Tokenizer::Chars(3)
    }
}

impl fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tokenizer::Chars(n) => write!(f, "chars:{n}"),
            Tokenizer::Bytes => f.write_str("bytes"),
            Tokenizer::O200k => f.write_str("o200k"),
            Tokenizer::Cl100k => f.write_str("cl100k"),
        }
    }
}

impl FromStr for Tokenizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bytes" => Ok(Tokenizer::Bytes),
            "o200k" => Ok(Tokenizer::O200k),
            "cl100k" => Ok(Tokenizer::Cl100k),
            "chars" => Ok(Tokenizer::Chars(3)),
            other => match other.strip_prefix("chars:").map(str::parse::<u32>) {
                Some(Ok(n)) if n > 0 => Ok(Tokenizer::Chars(n)),
                _ => Err(format!(
                    "unknown tokenizer `{other}` (expected chars:N with N > 0, bytes, o200k or cl100k)"
                )),
            },
        }
    }
}

impl Serialize for Tokenizer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Tokenizer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_limits_round_trip_through_their_parts() {
        for named in NamedLimit::ALL {
            assert_eq!(
                NamedLimit::from_parts(named.kind(), named.per()),
                Some(named)
            );
        }
        assert_eq!(
            NamedLimit::from_parts(LimitKind::Requests, Some(Duration::from_secs(2))),
            None
        );
    }

    #[test]
    fn a_custom_window_is_labelled_by_kind_and_length() {
        let spec = LimitSpec {
            kind: LimitKind::Requests,
            limit: 5,
            per: Some(Duration::from_secs(2)),
            reset: None,
        };
        assert_eq!(spec.label(), "requests/2s");
    }

    #[test]
    fn tokenizers_parse_and_print_the_same() {
        for text in ["chars:3", "chars:4", "bytes", "o200k", "cl100k"] {
            assert_eq!(text.parse::<Tokenizer>().unwrap().to_string(), text);
        }
        assert!("chars:0".parse::<Tokenizer>().is_err());
        assert_eq!(
            serde_json::to_string(&Tokenizer::Chars(4)).unwrap(),
            "\"chars:4\""
        );
        assert!("words".parse::<Tokenizer>().is_err());
    }
}
