//! A TOML settings file as command-line flags: `--config FILE` after a subcommand is
//! replaced by the file's settings (keys are the flags' long names, with `-` or `_`),
//! placed before the command line's own flags so that, with clap's
//! `args_override_self`, the command line wins. One mechanism for `fedshield-host serve`
//! and `fedshield-edge run`, so a packaged `/etc/fedshield/*.toml` and a flag mean the same.
//!
//! | TOML | flag |
//! |---|---|
//! | `key = "v"`, `key = 3`, `key = 0.5` | `--key v`, `--key 3`, `--key 0.5` |
//! | `key = true` / `false` | `--key` / nothing |
//! | `key = ["a", "b"]` | `--key a,b` |

use crate::{StoreError, read_existing};
use std::ffi::OsString;
use std::io::{Error, ErrorKind};
use std::path::{Path, PathBuf};

/// `argv` with the `--config FILE` of one of `subcommands` (the first argument after the
/// program) expanded; other command lines are returned as they are.
pub fn expand_config(
    argv: Vec<OsString>,
    subcommands: &[&str],
) -> Result<Vec<OsString>, StoreError> {
    if argv
        .get(1)
        .is_none_or(|a| !subcommands.iter().any(|s| a == *s))
    {
        return Ok(argv);
    }
    let mut path = None;
    let mut rest = Vec::new();
    let mut it = argv.into_iter();
    let head: Vec<OsString> = it.by_ref().take(2).collect();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            let file = it
                .next()
                .ok_or_else(|| invalid(Path::new("--config"), "needs a file".into()))?;
            path = Some(PathBuf::from(file));
        } else if let Some(p) = s.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        } else {
            rest.push(a);
        }
    }
    let Some(path) = path else {
        return Ok(head.into_iter().chain(rest).collect());
    };
    let bytes = read_existing(&path)?.ok_or_else(|| StoreError {
        what: "reading",
        path: path.clone(),
        source: ErrorKind::NotFound.into(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| invalid(&path, e.to_string()))?;
    let mut args = head;
    args.extend(flags(&text).map_err(|why| invalid(&path, why))?);
    args.extend(rest);
    Ok(args)
}

/// The flags of a settings file's text.
pub fn flags(text: &str) -> Result<Vec<OsString>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let value = match value {
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            toml::Value::String(s) => Some(s),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Array(items) => Some(
                items
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s.clone()),
                        other => Err(format!("{key}: {other} is not a string")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
            ),
            other => {
                return Err(format!(
                    "{key} = {other}: expected a string, number, boolean or list of strings"
                ));
            }
        };
        args.push(flag.into());
        args.extend(value.map(OsString::from));
    }
    Ok(args)
}

fn invalid(path: &Path, why: String) -> StoreError {
    StoreError {
        what: "parsing",
        path: path.to_path_buf(),
        source: Error::new(ErrorKind::InvalidData, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn settings_become_flags_before_the_command_lines_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(
            &file,
            "fleet = \"plant-a\"\nclient = 3\nlr = 0.005\nno_pacing = true\nrig = false\n\
             targets = [\"q_proj\", \"v_proj\"]\n",
        )
        .unwrap();
        let argv = os(&[
            "edge",
            "run",
            "--config",
            file.to_str().unwrap(),
            "--client",
            "4",
        ]);
        let got = expand_config(argv, &["run"]).unwrap();
        assert_eq!(
            got,
            os(&[
                "edge",
                "run",
                "--client",
                "3",
                "--fleet",
                "plant-a",
                "--lr",
                "0.005",
                "--no-pacing",
                "--targets",
                "q_proj,v_proj",
                "--client",
                "4"
            ])
        );
        // Another subcommand, or none: untouched.
        let other = os(&["edge", "doctor", "--config", "x"]);
        assert_eq!(expand_config(other.clone(), &["run"]).unwrap(), other);
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "rounds = { a = 1 }\n").unwrap();
        let argv = os(&["host", "serve", "--config", file.to_str().unwrap()]);
        let e = expand_config(argv, &["serve"]).unwrap_err();
        let text = format!("{e}: {}", e.source);
        assert!(
            text.contains("bad.toml") && text.contains("rounds"),
            "{text}"
        );
        let missing = os(&["host", "serve", "--config", "/nonexistent/x.toml"]);
        assert!(expand_config(missing, &["serve"]).is_err());
        std::fs::write(&file, "not toml at all [").unwrap();
        let argv = os(&["host", "serve", "--config=".to_string().as_str()]);
        assert!(expand_config(argv, &["serve"]).is_err());
    }
}
