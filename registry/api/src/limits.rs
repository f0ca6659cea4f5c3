//! Consul-shaped bounds on what a registration may carry (`[api]`'s
//! `max_meta_*`, `max_tag*`, `check_output_max_size`): metadata and tags past
//! a limit are refused with the limit named; check output and notes are cut.
//! Applied to every command a client's write becomes, before it reaches the
//! registry, so a refused write changes nothing.

use switchyard_catalog::{clip, clip_point, Check, Endpoint, Node};
use switchyard_registry::Command;

use crate::config::ApiConfig;

/// At most this much of a client's own text goes back in an error.
const ECHO: usize = 64;

/// `text`, cut to a length fit to quote in an error.
pub(crate) fn shown(text: &str) -> String {
    if text.len() <= ECHO {
        return text.to_string();
    }
    format!(
        "{}… ({} bytes)",
        &text[..clip_point(text, ECHO)],
        text.len()
    )
}

/// Checks and trims `command` against the API's limits.
pub(crate) fn apply(config: &ApiConfig, command: &mut Command) -> Result<(), String> {
    match command {
        Command::RegisterService {
            endpoint, checks, ..
        } => {
            endpoint_ok(config, endpoint)?;
            for check in checks {
                check_trimmed(config, &mut check.check)?;
            }
        }
        Command::RegisterCheck { check } => check_trimmed(config, &mut check.check)?,
        Command::UpdateCheck {
            output: Some(output),
            ..
        } => clip(output, config.check_output_max_size),
        Command::CatalogRegister {
            node,
            endpoint,
            checks,
            ..
        } => {
            node_ok(config, node)?;
            if let Some(endpoint) = endpoint {
                endpoint_ok(config, endpoint)?;
            }
            for check in checks {
                check_trimmed(config, check)?;
            }
        }
        Command::Batch(batch) => {
            for node in &batch.nodes {
                node_ok(config, node)?;
            }
            for (endpoint, checks) in &mut batch.endpoints {
                endpoint_ok(config, endpoint)?;
                for check in checks {
                    check_trimmed(config, &mut check.check)?;
                }
            }
            for check in &mut batch.node_checks {
                check_trimmed(config, &mut check.check)?;
            }
        }
        Command::Heartbeat(beats) => {
            for (_, _, _, output) in beats {
                if let Some(output) = output {
                    clip(output, config.check_output_max_size);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn meta_ok<'a>(
    config: &ApiConfig,
    owner: &str,
    meta: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    if meta.len() > config.max_meta_keys {
        return Err(format!(
            "{owner} has {} Meta keys: at most {} (api.max_meta_keys)",
            meta.len(),
            config.max_meta_keys
        ));
    }
    for (key, value) in meta {
        if key.len() > config.max_meta_key_length {
            return Err(format!(
                "{owner}: Meta key {:?} is longer than {} bytes (api.max_meta_key_length)",
                shown(key),
                config.max_meta_key_length
            ));
        }
        if value.len() > config.max_meta_value_length {
            return Err(format!(
                "{owner}: the value of Meta key {:?} is longer than {} bytes (api.max_meta_value_length)",
                shown(key),
                config.max_meta_value_length
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(format!(
                "{owner}: Meta key {:?} contains control characters",
                shown(key)
            ));
        }
    }
    Ok(())
}

fn endpoint_ok(config: &ApiConfig, endpoint: &Endpoint) -> Result<(), String> {
    let owner = format!("service {:?}", shown(&endpoint.id));
    meta_ok(config, &owner, endpoint.meta.iter())?;
    if endpoint.tags.len() > config.max_tags {
        return Err(format!(
            "{owner} has {} tags: at most {} (api.max_tags)",
            endpoint.tags.len(),
            config.max_tags
        ));
    }
    if let Some(tag) = endpoint
        .tags
        .iter()
        .find(|t| t.len() > config.max_tag_length)
    {
        return Err(format!(
            "{owner}: tag {:?} is longer than {} bytes (api.max_tag_length)",
            shown(tag),
            config.max_tag_length
        ));
    }
    Ok(())
}

fn node_ok(config: &ApiConfig, node: &Node) -> Result<(), String> {
    meta_ok(
        config,
        &format!("node {:?}", shown(&node.name)),
        node.meta.iter(),
    )
}

fn check_trimmed(config: &ApiConfig, check: &mut Check) -> Result<(), String> {
    if check.name.chars().any(char::is_control) {
        return Err(format!(
            "check {:?}: its name contains control characters",
            shown(&check.id)
        ));
    }
    clip(&mut check.output, config.check_output_max_size);
    clip(&mut check.notes, config.check_output_max_size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_input_is_bounded() {
        let long = "é".repeat(1000);
        let quoted = shown(&long);
        assert!(quoted.len() < 100, "{quoted}");
        assert!(quoted.ends_with("(2000 bytes)"), "{quoted}");
        assert_eq!(shown("short"), "short");
        let mut text = "ab".repeat(10);
        clip(&mut text, 5);
        assert_eq!(text, "ababa");
    }
}
