//! Credentials from files or the environment, never from a command line (argv is visible to every
//! user in `ps`): the one reader every binary uses.

use std::path::Path;

use crate::limits::TOKEN_LEN_MAX;

/// A credential that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(pub String);

/// Shortest token a server accepts as its admin or join token.
pub const SERVER_TOKEN_LEN_MIN: usize = 16;

/// The secret `what` from `file` if given, else from the environment variable `env`; `None` when
/// neither is set (or the variable is empty). Surrounding whitespace (a trailing newline) is dropped.
pub fn read(what: &str, file: Option<&Path>, env: &str) -> Result<Option<String>, SecretError> {
    let (value, from) = match file {
        Some(f) => {
            let raw = std::fs::read_to_string(f)
                .map_err(|e| SecretError(format!("cannot read the {what} from {}: {e}", f.display())))?;
            (raw, f.display().to_string())
        }
        None => match std::env::var(env) {
            Ok(v) => (v, env.to_owned()),
            Err(_) => return Ok(None),
        },
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return match file {
            Some(_) => Err(SecretError(format!("the {what} in {from} is empty"))),
            None => Ok(None),
        };
    }
    if value.len() > TOKEN_LEN_MAX {
        return Err(SecretError(format!("the {what} in {from} is longer than {TOKEN_LEN_MAX} bytes")));
    }
    Ok(Some(value))
}

/// [`read`] for a token the server will accept: refuses placeholders (`deploy/secret.yaml` ships
/// one) and tokens too short to resist guessing, with a message that says how to make one.
pub fn read_server_token(what: &str, file: Option<&Path>, env: &str) -> Result<Option<String>, SecretError> {
    let Some(token) = read(what, file, env)? else { return Ok(None) };
    let lower = token.to_ascii_lowercase();
    let placeholder =
        ["change-me", "changeme", "placeholder", "replace-me"].iter().any(|p| lower.contains(p));
    if placeholder || token.len() < SERVER_TOKEN_LEN_MIN {
        return Err(SecretError(format!(
            "refusing the {what} from {}: {}; make one with `openssl rand -hex 32`",
            file.map_or_else(|| env.to_owned(), |f| f.display().to_string()),
            if placeholder {
                "it is a placeholder".to_owned()
            } else {
                format!("it has fewer than {SERVER_TOKEN_LEN_MIN} characters")
            }
        )));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_env_and_placeholders() {
        let dir = std::env::temp_dir().join(format!("ferrovol-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        assert_eq!(
            read_server_token("t", Some(&f), "UNSET_X").unwrap().as_deref(),
            Some("0123456789abcdef0123")
        );
        std::fs::write(&f, "change-me-before-deploying\n").unwrap();
        assert!(read_server_token("t", Some(&f), "UNSET_X").unwrap_err().0.contains("placeholder"));
        std::fs::write(&f, "short").unwrap();
        assert!(read_server_token("t", Some(&f), "UNSET_X").unwrap_err().0.contains("fewer than"));
        assert_eq!(
            read("t", Some(&f), "UNSET_X").unwrap().as_deref(),
            Some("short"),
            "clients present anything"
        );
        std::fs::write(&f, "\n").unwrap();
        assert!(read("t", Some(&f), "UNSET_X").is_err(), "an empty file is a mistake, not 'no token'");
        assert!(read("t", Some(&dir.join("missing")), "UNSET_X").is_err());
        assert_eq!(read("t", None, "FERROVOL_SURELY_UNSET_VARIABLE").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
