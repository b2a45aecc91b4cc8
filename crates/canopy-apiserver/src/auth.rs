//! Who is asking (authentication) and whether they may (authorization).
//!
//! Authentication: a client certificate signed by Canopy's CA names the user (CN) and their
//! groups (O), as upstream's x509 authenticator. A request without credentials is anonymous;
//! a request with credentials that do not authenticate is refused with 401.
//!
//! Authorization: members of `system:masters` may do everything; anyone may read the public
//! information endpoints (/healthz, /livez, /readyz, /version), like upstream's
//! `system:public-info-viewer` role; everything else is refused with 403.

use canopy_api::{ApiError, Target};

use crate::request::ResourceRequest;

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

/// Authenticates a request from its TLS client identity and its Authorization header.
pub fn authenticate(
    client_cert: Option<&User>,
    authorization: Option<&str>,
) -> Result<User, ApiError> {
    if authorization.is_some() {
        // No token authenticator is configured: a presented token cannot be valid. The
        // token itself is never logged.
        return Err(ApiError::unauthorized());
    }
    if let Some(user) = client_cert {
        let mut user = user.clone();
        if !user.groups.iter().any(|g| g == "system:authenticated") {
            user.groups.push("system:authenticated".into());
        }
        return Ok(user);
    }
    Ok(User::anonymous())
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
    Err(ApiError::new(
        403,
        "Forbidden",
        format!("forbidden: User {:?} cannot get path {path:?}", user.name),
    ))
}

/// Authorizes a resource request.
pub fn authorize(user: &User, req: &ResourceRequest) -> Result<(), ApiError> {
    if user.is_admin() {
        return Ok(());
    }
    if user.is_anonymous() {
        return Err(ApiError::unauthorized());
    }
    let resource = match req.subresource {
        Some(sub) => format!("{}/{}", req.def.plural, sub.name()),
        None => req.def.plural.to_string(),
    };
    let verb = req.verb.as_str();
    let scope = match &req.namespace {
        Some(ns) => format!(" in the namespace {ns:?}"),
        None => " at the cluster scope".to_string(),
    };
    Err(ApiError::forbidden(
        Target {
            group: req.def.group,
            resource: &resource,
            name: req.name.as_deref().unwrap_or(""),
        },
        format!(
            "User {:?} cannot {verb} resource {:?} in API group {:?}{scope}",
            user.name, resource, req.def.group
        ),
    ))
}
