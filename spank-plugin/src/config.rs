//! Plugin arguments from plugstack.conf (`key=value` words after the path).
//!
//! Strict on purpose: an unknown key, a repeated key or a malformed value
//! is an error that names the key, never something silently ignored.

use dask_spank_protocol::paths::DEFAULT_AGENT_DIR;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding the node agents' sockets (`agent-<node>.sock`).
    pub agent_dir: PathBuf,
    /// The `dask-spank` program on compute nodes; the job script the plugin
    /// supplies runs `<attach_cmd> attach`.
    pub attach_cmd: PathBuf,
    /// Directory for job logs, relative to the submit directory.
    pub log_dir: String,
    /// Bound on every call to the agent from slurmstepd.
    pub agent_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_dir: PathBuf::from(DEFAULT_AGENT_DIR),
            attach_cmd: PathBuf::from("/usr/bin/dask-spank"),
            log_dir: "log".to_string(),
            agent_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("plugstack.conf: argument '{0}' is not of the form key=value")]
    NotKeyValue(String),
    #[error("plugstack.conf: unknown key '{key}' (known keys: {known})")]
    UnknownKey { key: String, known: String },
    #[error("plugstack.conf: key '{0}' is given twice")]
    Repeated(String),
    #[error("plugstack.conf: {key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
}

const KEYS: &[&str] = &["agent_dir", "attach_cmd", "log_dir", "agent_timeout"];

fn bad(key: &str, value: &str, why: &str) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn absolute_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if !value.starts_with('/') {
        return Err(bad(key, value, "must be an absolute path"));
    }
    Ok(PathBuf::from(value))
}

fn relative_dir(key: &str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() || value.starts_with('/') || value.split('/').any(|c| c == "..") {
        return Err(bad(
            key,
            value,
            "must be a relative directory without '..' (it is created under the submit directory)",
        ));
    }
    if value.contains('%') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            key,
            value,
            "must not contain '%', spaces or control characters",
        ));
    }
    Ok(value.trim_end_matches('/').to_string())
}

fn seconds(key: &str, value: &str) -> Result<Duration, ConfigError> {
    match value.parse::<u64>() {
        Ok(s) if (1..=300).contains(&s) => Ok(Duration::from_secs(s)),
        _ => Err(bad(
            key,
            value,
            "must be a whole number of seconds from 1 to 300",
        )),
    }
}

impl Config {
    pub fn parse<'a, I: IntoIterator<Item = &'a str>>(args: I) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let mut seen: Vec<String> = Vec::new();
        for arg in args {
            let (key, value) = arg
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(arg.to_string()))?;
            if !KEYS.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    known: KEYS.join(", "),
                });
            }
            if seen.iter().any(|k| k == key) {
                return Err(ConfigError::Repeated(key.to_string()));
            }
            seen.push(key.to_string());
            match key {
                "agent_dir" => cfg.agent_dir = absolute_path(key, value)?,
                "attach_cmd" => cfg.attach_cmd = absolute_path(key, value)?,
                "log_dir" => cfg.log_dir = relative_dir(key, value)?,
                "agent_timeout" => cfg.agent_timeout = seconds(key, value)?,
                _ => unreachable!("every key in KEYS is handled"),
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_argument_list_gives_the_documented_defaults() {
        let c = Config::parse([]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.agent_dir, PathBuf::from("/run/dask-spank"));
        assert_eq!(c.log_dir, "log");
    }

    #[test]
    fn keys_are_applied() {
        let c = Config::parse([
            "agent_dir=/tmp/a",
            "attach_cmd=/opt/bin/dask-spank",
            "log_dir=logs/dask/",
            "agent_timeout=9",
        ])
        .unwrap();
        assert_eq!(c.agent_dir, PathBuf::from("/tmp/a"));
        assert_eq!(c.attach_cmd, PathBuf::from("/opt/bin/dask-spank"));
        assert_eq!(c.log_dir, "logs/dask");
        assert_eq!(c.agent_timeout, Duration::from_secs(9));
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&["bogus=1"], "plugstack.conf: unknown key 'bogus' (known keys: agent_dir, attach_cmd, log_dir, agent_timeout)"),
            (&["agent_dir"], "plugstack.conf: argument 'agent_dir' is not of the form key=value"),
            (&["agent_dir=rel"], "plugstack.conf: agent_dir=rel: must be an absolute path"),
            (&["log_dir=../x"], "plugstack.conf: log_dir=../x: must be a relative directory without '..' (it is created under the submit directory)"),
            (&["log_dir=a%j"], "plugstack.conf: log_dir=a%j: must not contain '%', spaces or control characters"),
            (&["agent_timeout=0"], "plugstack.conf: agent_timeout=0: must be a whole number of seconds from 1 to 300"),
            (&["log_dir=a", "log_dir=b"], "plugstack.conf: key 'log_dir' is given twice"),
        ];
        for (args, want) in cases {
            let got = Config::parse(args.iter().copied()).unwrap_err().to_string();
            assert_eq!(&got, want);
        }
    }
}
