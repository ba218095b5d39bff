//! The YAML value tree before it is typed: empty keys, `QUOTAGATE__…` overrides and `${VAR}`
//! expansion all happen here, so they work the same for every key and know nothing of the types.

use std::collections::BTreeMap;

use yaml_serde::{Mapping, Value};

use super::error::Issue;

/// Prefix of the variables that override a key: `QUOTAGATE__SECTION__KEY`.
const ENV_PREFIX: &str = "QUOTAGATE__";

/// Parses the file into its top-level mapping; an empty file (or one with only comments) is an
/// empty mapping. `<<` merge keys are applied so anchors can share settings between accounts.
pub(super) fn parse(text: &str) -> Result<Mapping, Issue> {
    let mut value: Value = yaml_serde::from_str(text).map_err(|e| {
        let message = e.to_string();
        match e.location() {
            // The location becomes the key, so it is not repeated inside the message.
            Some(at) => {
                let place = format!("line {} column {}", at.line(), at.column());
                let message = message.replacen(&format!(" at {place}"), "", 1);
                Issue::new(place, format!("invalid YAML: {message}"))
            }
            None => Issue::new("", format!("invalid YAML: {message}")),
        }
    })?;
    value
        .apply_merge()
        .map_err(|e| Issue::new("", format!("invalid YAML merge (<<): {e}")))?;
    match value {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(mapping) => Ok(mapping),
        _ => Err(Issue::new(
            "",
            "the file must be a mapping of sections (server:, database:, providers:, …)",
        )),
    }
}

/// Removes keys whose value is empty (`key:` or `key: null`), at every depth, so that they take
/// their default: a section whose keys are all commented out is then an empty section, not a
/// type error.
pub(super) fn drop_empty_keys(mapping: &mut Mapping) {
    mapping.retain(|_, v| !v.is_null());
    mapping.values_mut().for_each(drop_empty_keys_under);
}

fn drop_empty_keys_under(value: &mut Value) {
    match value {
        Value::Mapping(mapping) => drop_empty_keys(mapping),
        Value::Sequence(items) => items.iter_mut().for_each(drop_empty_keys_under),
        Value::Tagged(tagged) => drop_empty_keys_under(&mut tagged.value),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

/// Applies each `QUOTAGATE__SECTION__KEY` variable of `env` to `tree`. The name is matched without
/// regard to case; the key must be a scalar of `defaults` (the serialised defaults, i.e. every key
/// there is) outside `providers`. Returns the key each variable set (`server.port` →
/// `QUOTAGATE__SERVER__PORT`), so later errors about that key can name the variable.
pub(super) fn apply_env_overrides(
    tree: &mut Mapping,
    defaults: &Value,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Issue> {
    let mut overridden = BTreeMap::new();
    for (var, raw) in env {
        let upper = var.to_ascii_uppercase();
        let Some(rest) = upper.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let key = segments.join(".");
        if segments[0] == "providers" {
            return Err(Issue::new(
                var,
                "providers cannot be set from the environment: declare them in the file \
                 (their strings may use ${VAR})",
            ));
        }
        let mut default = defaults;
        for segment in &segments {
            default = default
                .as_mapping()
                .and_then(|m| m.get(segment.as_str()))
                .ok_or_else(|| {
                    Issue::new(var, format!("unknown variable: there is no key `{key}`"))
                })?;
        }
        if let Some(section) = default.as_mapping() {
            let keys: Vec<&str> = section.keys().filter_map(Value::as_str).collect();
            return Err(Issue::new(
                var,
                format!(
                    "`{key}` is a section: set one of its keys ({})",
                    keys.join(", ")
                ),
            ));
        }
        set(tree, &segments, override_value(raw, default))?;
        overridden.insert(key, var.clone());
    }
    Ok(overridden)
}

/// A variable's text as a YAML scalar of the right type. Where the key's default is a string the
/// text is kept verbatim: parsing it as YAML would turn a numeric password into a number, cut a
/// value at ` #`, or unquote it.
fn override_value(raw: &str, default: &Value) -> Value {
    if default.is_string() {
        return Value::String(raw.to_string());
    }
    match yaml_serde::from_str::<Value>(raw) {
        Ok(value @ (Value::Number(_) | Value::Bool(_))) => value,
        // Left as text, the typed step reports it against the key (e.g. "expected u16").
        _ => Value::String(raw.to_string()),
    }
}

fn set(tree: &mut Mapping, segments: &[String], value: Value) -> Result<(), Issue> {
    let Some((last, parents)) = segments.split_last() else {
        return Ok(());
    };
    let mut node = tree;
    for (depth, segment) in parents.iter().enumerate() {
        node = node
            .entry(Value::String(segment.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()))
            .as_mapping_mut()
            .ok_or_else(|| {
                Issue::new(
                    segments[..=depth].join("."),
                    "expected a section (a mapping of keys)",
                )
            })?;
    }
    node.insert(Value::String(last.clone()), value);
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}` in every string value under `value` (keys are left
/// alone), with `$$` for a literal `$`. `path` is the key of `value`, for messages.
pub(super) fn expand_vars(
    value: &mut Value,
    path: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), Issue> {
    match value {
        Value::String(text) => {
            if text.contains('$') {
                *text = expand(text, env).map_err(|problem| Issue::new(path, problem))?;
            }
        }
        Value::Mapping(mapping) => {
            for (key, child) in mapping.iter_mut() {
                let name = match key {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => "?".to_string(),
                };
                let child_path = if path.is_empty() {
                    name
                } else {
                    format!("{path}.{name}")
                };
                expand_vars(child, &child_path, env)?;
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                expand_vars(child, &format!("{path}[{i}]"), env)?;
            }
        }
        Value::Tagged(tagged) => expand_vars(&mut tagged.value, path, env)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// One string's expansion. Like the shell: `${VAR:-default}` also applies when `VAR` is set but
/// empty, and an expanded value is not expanded again. A `$` not followed by `{` or `$` is kept,
/// so passwords with a `$` need no escaping. Messages name variables, never their values.
fn expand(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or("unterminated `${` (close it with `}`, or write `$$` for a literal `$`)")?;
            let (name, default) = match tail[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&tail[..end], None),
            };
            if !is_variable_name(name) {
                return Err(format!(
                    "invalid variable reference `${{{name}…}}` (write ${{NAME}} or ${{NAME:-default}})"
                ));
            }
            if default.is_some_and(|d| d.contains("${")) {
                return Err(format!(
                    "the default of `${{{name}:-…}}` contains `${{`: nested references are not supported"
                ));
            }
            match (env.get(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{{name}:-}} to allow it to be empty)"
                    ))
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
