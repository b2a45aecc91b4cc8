//! Docker image reference normalization, following `github.com/distribution/reference`
//! (`ParseNormalizedNamed` + `TagNameOnly`), so that a name typed by a user, written in a pod
//! spec or found in an archive resolves to the same key the kubelet and containerd would use.

use crate::ImageError;

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// A parsed, normalized reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reference {
    /// `domain/path`, e.g. `docker.io/library/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub(crate) fn domain(&self) -> &str {
        self.repository
            .split_once('/')
            .map_or(self.repository.as_str(), |(d, _)| d)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Normalizes a reference the way Docker does: `busybox` → `docker.io/library/busybox:latest`,
/// `foo/bar:1` → `docker.io/foo/bar:1`, `127.0.0.1:5000/x` → `127.0.0.1:5000/x:latest`;
/// digests are kept (and no `:latest` is added to a digest reference).
pub fn normalize(reference: &str) -> Result<String, ImageError> {
    parse_normalized(reference).map(|r| r.to_string())
}

fn invalid(reference: &str, reason: impl Into<String>) -> ImageError {
    ImageError::InvalidReference {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn parse_normalized(s: &str) -> Result<Reference, ImageError> {
    if s.is_empty() {
        return Err(invalid(s, "empty reference"));
    }
    if is_hex64(s) {
        return Err(invalid(
            s,
            "cannot specify 64-byte hexadecimal strings as a repository name",
        ));
    }
    let (domain, remainder) = split_docker_domain(s);
    let remote_name = remainder.split([':', '@']).next().unwrap_or_default();
    if remote_name.to_lowercase() != remote_name {
        return Err(invalid(
            s,
            format!("repository name ({remote_name}) must be lowercase"),
        ));
    }
    let mut r = parse_full(s, &domain, &remainder)?;
    if r.tag.is_none() && r.digest.is_none() {
        r.tag = Some("latest".to_string());
    }
    Ok(r)
}

fn split_docker_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.find('/') {
        Some(i) => {
            let first = &name[..i];
            if !first.contains(['.', ':']) && first != "localhost" && first.to_lowercase() == first
            {
                (DEFAULT_DOMAIN.to_string(), name.to_string())
            } else {
                (first.to_string(), name[i + 1..].to_string())
            }
        }
        None => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    if domain == LEGACY_DEFAULT_DOMAIN {
        domain = DEFAULT_DOMAIN.to_string();
    }
    if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        remainder = format!("{OFFICIAL_REPO_PREFIX}{remainder}");
    }
    (domain, remainder)
}

fn parse_full(original: &str, domain: &str, remainder: &str) -> Result<Reference, ImageError> {
    let (rest, digest) = match remainder.split_once('@') {
        Some((rest, digest)) => {
            validate_digest(digest).map_err(|reason| invalid(original, reason))?;
            (rest, Some(digest.to_string()))
        }
        None => (remainder, None),
    };
    let last_slash = rest.rfind('/');
    let (path, tag) = match rest.rfind(':') {
        Some(i) if last_slash.is_none_or(|s| i > s) => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag
        && !valid_tag(tag)
    {
        return Err(invalid(original, format!("invalid tag {tag:?}")));
    }
    if !valid_domain(domain) {
        return Err(invalid(
            original,
            format!("invalid registry host {domain:?}"),
        ));
    }
    if path.is_empty() {
        return Err(invalid(original, "missing repository name"));
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return Err(invalid(
                original,
                format!("invalid repository path component {component:?}"),
            ));
        }
    }
    let repository = format!("{domain}/{path}");
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(invalid(
            original,
            format!("repository name longer than {NAME_TOTAL_LENGTH_MAX} characters"),
        ));
    }
    Ok(Reference {
        repository,
        tag: tag.map(str::to_string),
        digest,
    })
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `algorithm ':' hex{32,}`, with sha256 pinned to exactly 64 lowercase hex digits.
pub(crate) fn validate_digest(d: &str) -> Result<(), String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!("invalid digest {d:?}: missing algorithm"));
    };
    let algo_ok = !algo.is_empty()
        && algo.split(['-', '_', '+', '.']).all(|part| {
            part.as_bytes()
                .first()
                .is_some_and(|b| b.is_ascii_alphabetic())
                && part.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    if !algo_ok {
        return Err(format!("invalid digest algorithm in {d:?}"));
    }
    if algo == "sha256" {
        if !is_hex64(hex) {
            return Err(format!(
                "invalid sha256 digest {d:?}: want 64 lowercase hex digits"
            ));
        }
    } else if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid digest {d:?}"));
    }
    Ok(())
}

fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && alnum(b[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < b.len() {
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // IPv6 literal: [addr](:port)?
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => return !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()),
                None => return false,
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

    #[test]
    fn normalize_table() {
        let ok = [
            ("busybox", "docker.io/library/busybox:latest".to_string()),
            ("busybox:1.36", "docker.io/library/busybox:1.36".to_string()),
            (
                "library/busybox",
                "docker.io/library/busybox:latest".to_string(),
            ),
            ("foo/bar:1", "docker.io/foo/bar:1".to_string()),
            (
                "docker.io/busybox",
                "docker.io/library/busybox:latest".to_string(),
            ),
            (
                "index.docker.io/foo/bar",
                "docker.io/foo/bar:latest".to_string(),
            ),
            ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest".to_string()),
            ("localhost/x:v1", "localhost/x:v1".to_string()),
            (
                "localhost:5000/a/b/c",
                "localhost:5000/a/b/c:latest".to_string(),
            ),
            (
                "quay.io/coreos/etcd:v3.5",
                "quay.io/coreos/etcd:v3.5".to_string(),
            ),
            (
                "registry.k8s.io/pause:3.10",
                "registry.k8s.io/pause:3.10".to_string(),
            ),
            ("[::1]:5000/x", "[::1]:5000/x:latest".to_string()),
            (
                "a__b/c-d--e.f",
                "docker.io/a__b/c-d--e.f:latest".to_string(),
            ),
            (
                "busybox:Tag_1.x-y",
                "docker.io/library/busybox:Tag_1.x-y".to_string(),
            ),
            (
                &format!("busybox@{D}"),
                format!("docker.io/library/busybox@{D}"),
            ),
            (
                &format!("busybox:1@{D}"),
                format!("docker.io/library/busybox:1@{D}"),
            ),
        ];
        for (input, want) in ok {
            assert_eq!(normalize(input).unwrap(), want, "normalize({input})");
        }
        let bad = [
            "",
            "Busybox",
            "foo/Bar",
            "busybox:",
            "busybox:-x",
            ":latest",
            "foo//bar",
            "foo/bar/",
            "-foo",
            "foo_/bar",
            "foo___bar",
            "busybox@sha256:abc",
            "busybox@sha256:A3ED95CAEB02FFE68CDD9FD84406680AE93D633CB16422D00E8A7C22955B46D4",
            "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4",
            "host:port/x",
            "-bad.host/x",
            "busybox latest",
        ];
        for input in bad {
            let err = normalize(input).expect_err(input);
            assert!(
                matches!(err, ImageError::InvalidReference { .. }),
                "{input}: {err}"
            );
        }
        let long = format!("x/{}", "a".repeat(300));
        assert!(normalize(&long).is_err());
        let tag129 = format!("x:{}", "a".repeat(129));
        assert!(normalize(&tag129).is_err());
    }

    #[test]
    fn upper_case_domain_is_a_domain() {
        assert_eq!(normalize("Foo/bar").unwrap(), "Foo/bar:latest");
    }
}
