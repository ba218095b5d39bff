//! Limits between the domain's specs (what the store keeps) and the config file's shape (what the
//! admin API shows and reads).

use crate::config::{LimitValue, RateLimitsConfig, WindowConfig};
use crate::domain::{LimitKind, LimitSpec, NamedLimit};

/// Domain limits back in the config file's shape: a window of a named length (`rpm` …) under its
/// name, `concurrent`, and every other window under `windows`. The inverse of
/// [`RateLimitsConfig::specs`].
pub fn limits_config(specs: &[LimitSpec]) -> RateLimitsConfig {
    let mut config = RateLimitsConfig::default();
    for spec in specs {
        if spec.kind == LimitKind::Concurrent {
            config.concurrent = Some(spec.limit);
            continue;
        }
        let value = match &spec.reset {
            None => LimitValue::Plain(spec.limit),
            Some(reset) => LimitValue::Detailed {
                limit: spec.limit,
                reset: Some(reset.cron.clone()),
                timezone: Some(reset.timezone.clone()),
            },
        };
        let named = NamedLimit::ALL
            .into_iter()
            .find(|n| n.kind() == spec.kind && n.per().is_some() && n.per() == spec.per);
        let slot = match named {
            Some(NamedLimit::Rpm) => &mut config.rpm,
            Some(NamedLimit::Rph) => &mut config.rph,
            Some(NamedLimit::Rpd) => &mut config.rpd,
            Some(NamedLimit::Tpm) => &mut config.tpm,
            Some(NamedLimit::Tpd) => &mut config.tpd,
            _ => {
                config.windows.push(window_config(spec));
                continue;
            }
        };
        if slot.is_none() {
            *slot = Some(value);
        } else {
            config.windows.push(window_config(spec));
        }
    }
    config
}

fn window_config(spec: &LimitSpec) -> WindowConfig {
    WindowConfig {
        kind: spec.kind,
        limit: spec.limit,
        per: spec.per.unwrap_or_default(),
        reset: spec.reset.as_ref().map(|r| r.cron.clone()),
        timezone: spec.reset.as_ref().map(|r| r.timezone.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_back_in_the_config_shape_are_the_limits_written() {
        let yaml = r#"
            rpm: 30
            rpd: { limit: 1000, reset: "0 0 * * *", timezone: America/Los_Angeles }
            tpm: 6000
            concurrent: 4
            windows:
              - { kind: requests, limit: 5, per: 2s }
              - { kind: tokens, limit: 900, per: 1h, reset: "0 * * * *", timezone: UTC }
        "#;
        let config: RateLimitsConfig = yaml_serde::from_str(yaml).unwrap();
        let back = limits_config(&config.specs());
        assert_eq!(back, config);
        assert_eq!(back.specs(), config.specs());
    }

    #[test]
    fn a_second_window_of_a_named_length_is_kept_as_a_window() {
        let minute = Some(std::time::Duration::from_secs(60));
        let specs = [
            LimitSpec {
                kind: LimitKind::Requests,
                limit: 30,
                per: minute,
                reset: None,
            },
            LimitSpec {
                kind: LimitKind::Requests,
                limit: 20,
                per: minute,
                reset: Some(crate::domain::FixedReset {
                    cron: "* * * * *".into(),
                    timezone: "UTC".into(),
                }),
            },
        ];
        let config = limits_config(&specs);
        assert_eq!(config.rpm, Some(LimitValue::Plain(30)));
        assert_eq!(config.windows.len(), 1);
        assert_eq!(config.specs(), specs);
    }
}
