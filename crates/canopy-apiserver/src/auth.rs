//! Who is asking (authentication) and whether they may (authorization).
//!
//! Authentication: a client certificate signed by Canopy's CA names the user (CN) and their
//! groups (O), as upstream's x509 authenticator; bearer tokens come from a static token file
//! or Keystone, or are service-account tokens this cluster signed. A request without credentials is anonymous; a request with credentials that
//! do not authenticate is refused with 401.
//!
//! Non-resource paths: members of `system:masters` may read everything; anyone may read the
//! public information endpoints (/healthz, /livez, /readyz, /version), like upstream's
//! `system:public-info-viewer` role. Resource requests are authorized in [`crate::authz`].

use canopy_api::ApiError;

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// Upstream's superuser group.
pub const MASTERS: &str = "system:masters";

impl User {
    /// The anonymous user.
    pub fn anonymous() -> Self {
        Self {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        }
    }

    /// Whether this is the anonymous user.
    pub fn is_anonymous(&self) -> bool {
        self.name == "system:anonymous"
    }

    /// Whether the user may do anything.
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }
}

/// The authentication chain: client certificates signed by Canopy's CA, then static
/// tokens, then service-account tokens, then Keystone tokens. The first that recognizes the credential wins; a credential
/// none recognizes is refused with 401, and no credential at all is the anonymous user.
#[derive(Default)]
pub struct Authenticator {
    /// Static tokens (`--token-auth-file`).
    pub tokens: Option<crate::tokenfile::TokenFile>,
    /// Keystone (`--keystone-url`).
    pub keystone: Option<std::sync::Arc<crate::keystone::Keystone>>,
    /// Service-account tokens this cluster signed.
    pub service_accounts: Option<crate::serviceaccount::TokenAuthenticator>,
}

/// The bearer token of an Authorization header (`Bearer` is case-insensitive, as upstream).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Authenticator {
    /// Authenticates a request from its TLS client identity and its Authorization header.
    pub async fn authenticate(
        &self,
        client_cert: Option<&User>,
        authorization: Option<&str>,
    ) -> Result<User, ApiError> {
        if let Some(user) = client_cert {
            let mut user = user.clone();
            if !user.groups.iter().any(|g| g == "system:authenticated") {
                user.groups.push("system:authenticated".into());
            }
            return Ok(user);
        }
        let Some(authorization) = authorization else {
            return Ok(User::anonymous());
        };
        // Tokens are never logged, whatever happens to them.
        let token = bearer(authorization).ok_or_else(ApiError::unauthorized)?;
        if let Some(user) = self.tokens.as_ref().and_then(|t| t.user(token)) {
            return Ok(user.clone());
        }
        if let Some(service_accounts) = &self.service_accounts
            && let Some(user) = service_accounts.authenticate(token).await
        {
            return user;
        }
        if let Some(keystone) = &self.keystone
            && let Some(user) = keystone.authenticate(token).await
        {
            return Ok(user);
        }
        Err(ApiError::unauthorized())
    }
}

/// Paths anyone may read.
pub fn is_public(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/healthz" | "/livez" | "/readyz" | "/version"
    ) || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/")
}

/// Authorizes a request for a non-resource path.
pub fn authorize_path(user: &User, path: &str) -> Result<(), ApiError> {
    if is_public(path) || user.is_admin() {
        return Ok(());
    }
    if user.is_anonymous() {
        return Err(ApiError::unauthorized());
    }
    // Upstream's system:discovery role: every authenticated user may learn the API.
    let discovery = matches!(path, "/api" | "/apis" | "/openapi/v2")
        || ["/api/", "/apis/", "/openapi/"]
            .iter()
            .any(|prefix| path.starts_with(prefix));
    if discovery {
        return Ok(());
    }
    Err(ApiError::new(
        403,
        "Forbidden",
        format!("forbidden: User {:?} cannot get path {path:?}", user.name),
    ))
}

/// Applies impersonation headers (`Impersonate-User`, `Impersonate-Group`,
/// `Impersonate-Uid`, `Impersonate-Extra-*`): only cluster admins may act as someone else.
pub fn impersonate(user: User, headers: &http::HeaderMap) -> Result<User, ApiError> {
    let mut name = None;
    let mut groups = Vec::new();
    let mut other = false;
    for (header, value) in headers {
        let header = header.as_str();
        if !header.starts_with("impersonate-") {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request(format!("invalid {header} header")))?;
        match header {
            "impersonate-user" => name = Some(value.to_string()),
            "impersonate-group" => groups.push(value.to_string()),
            _ => other = true,
        }
    }
    if name.is_none() && groups.is_empty() && !other {
        return Ok(user);
    }
    if !user.is_admin() {
        if user.is_anonymous() {
            return Err(ApiError::unauthorized());
        }
        let (resource, what) = match &name {
            Some(n) => ("users", n.clone()),
            None => ("groups", groups.first().cloned().unwrap_or_default()),
        };
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "{resource} {what:?} is forbidden: User {:?} cannot impersonate resource {resource:?} in API group \"\" at the cluster scope",
                user.name
            ),
        ));
    }
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request(
            "requested impersonation of groups, uid or extra without impersonating a user",
        ));
    };
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".into());
    }
    Ok(User { name, groups })
}
