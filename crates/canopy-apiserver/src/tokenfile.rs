//! Static bearer tokens from a file, in upstream's `--token-auth-file` format: one
//! `token,user,uid[,"group1,group2"]` line per token. Only SHA-256 digests of the tokens are
//! kept in memory, so a lookup compares digests, never the secrets themselves.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};

use crate::auth::User;

/// The tokens of a token file.
#[derive(Default)]
pub struct TokenFile {
    users: HashMap<[u8; 32], User>,
}

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Splits one CSV record (double quotes group commas, `""` is a quote).
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(f) = out.last_mut() {
                    f.push('"');
                }
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => {
                if let Some(f) = out.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    out
}

impl TokenFile {
    /// Reads a token file.
    pub fn load(path: &Path) -> Result<TokenFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("token file {}", path.display()))
    }

    /// Parses a token file's text.
    pub fn parse(text: &str) -> Result<TokenFile> {
        let mut users = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f = fields(line);
            if f.len() < 3 || f[0].is_empty() || f[1].is_empty() {
                // The line holds a secret: say where, not what.
                bail!("line {}: expected token,user,uid[,\"groups\"]", number + 1);
            }
            let mut groups: Vec<String> = f
                .get(3)
                .map(|g| {
                    g.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            groups.push("system:authenticated".into());
            let user = User {
                name: f[1].clone(),
                groups,
            };
            if users.insert(digest(&f[0]), user).is_some() {
                bail!("line {}: duplicate token", number + 1);
            }
        }
        Ok(TokenFile { users })
    }

    /// The user of a token.
    pub fn user(&self, token: &str) -> Option<&User> {
        self.users.get(&digest(token))
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_format() {
        let file = TokenFile::parse(
            "# comment\nt1,alice,1,\"canopy:tenant:a,devs\"\nt2,bob,2\n\nt3,\"c,d\",3,ops\n",
        )
        .unwrap();
        assert_eq!(file.len(), 3);
        let alice = file.user("t1").unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(
            alice.groups,
            ["canopy:tenant:a", "devs", "system:authenticated"]
        );
        assert_eq!(file.user("t2").unwrap().groups, ["system:authenticated"]);
        assert_eq!(file.user("t3").unwrap().name, "c,d");
        assert!(file.user("t4").is_none());
    }

    #[test]
    fn rejects_bad_lines_without_echoing_them() {
        let err = TokenFile::parse("secret-token-value\n").err().unwrap();
        assert!(!format!("{err:#}").contains("secret-token-value"));
        assert!(TokenFile::parse("t,a,1\nt,b,2\n").is_err());
    }
}
