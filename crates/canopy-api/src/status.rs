//! API errors as `metav1.Status`, with upstream's reasons, codes and message shapes.

use serde_json::{Value, json};

/// One reason an object is invalid (a `StatusCause`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// Machine-readable reason such as `FieldValueRequired`.
    pub reason: String,
    /// Human-readable description.
    pub message: String,
    /// The field path, e.g. `spec.containers[0].image`.
    pub field: String,
}

impl Cause {
    /// A cause with upstream's `field.Error` formatting (`<field>: <type>: <detail>`).
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason: reason.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// `Required value`.
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Self::new("FieldValueRequired", field, message)
    }

    /// `Invalid value: <value>: <detail>`.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            Value::Null => "null".to_string(),
            other => other.to_string(),
        };
        Self::new(
            "FieldValueInvalid",
            field,
            format!("Invalid value: {shown}: {detail}"),
        )
    }

    /// `Unsupported value: <value>: supported values: ...`.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self::new(
            "FieldValueNotSupported",
            field,
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        )
    }

    /// `Duplicate value: <value>`.
    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Self::new(
            "FieldValueDuplicate",
            field,
            format!("Duplicate value: {value}"),
        )
    }

    /// `Forbidden: <detail>`.
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Self::new("FieldValueForbidden", field, format!("Forbidden: {detail}"))
    }

    /// `Too long: may not be more than N bytes` and similar.
    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        Self::new(
            "FieldValueTooLong",
            field,
            format!("Too long: may not be more than {max} bytes"),
        )
    }
}

/// An API error: an HTTP status code, a `metav1.StatusReason`, a message and details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `metav1.StatusReason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details.name`.
    pub name: Option<String>,
    /// `details.group`.
    pub group: Option<String>,
    /// `details.kind` (a resource or a kind, as upstream does per reason).
    pub kind: Option<String>,
    /// `details.causes`.
    pub causes: Vec<Cause>,
    /// `details.retryAfterSeconds`, also sent as `Retry-After`.
    pub retry_after_seconds: Option<u32>,
    /// `metadata.continue` on an expired continue token: where an inconsistent list may go on.
    pub continue_token: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.reason, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// Results of API operations.
pub type ApiResult<T> = Result<T, ApiError>;

/// Identifies what an error is about: group, resource (plural) and name.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// API group ("" for core).
    pub group: &'a str,
    /// Resource (plural), possibly with a subresource: `pods/status`.
    pub resource: &'a str,
    /// Object name.
    pub name: &'a str,
}

impl Target<'_> {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

impl ApiError {
    /// A bare error with a code, reason and message.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
            retry_after_seconds: None,
            continue_token: None,
        }
    }

    fn about(mut self, target: Target<'_>) -> Self {
        self.name = (!target.name.is_empty()).then(|| target.name.to_string());
        self.group = (!target.group.is_empty()).then(|| target.group.to_string());
        self.kind = Some(target.resource.to_string());
        self
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403 Forbidden with upstream's message shape.
    pub fn forbidden(target: Target<'_>, detail: impl AsRef<str>) -> Self {
        let subject = if target.name.is_empty() {
            target.qualified()
        } else {
            format!("{} {:?}", target.qualified(), target.name)
        };
        Self::new(
            403,
            "Forbidden",
            format!("{subject} is forbidden: {}", detail.as_ref()),
        )
        .about(target)
    }

    /// 404 NotFound for an object.
    pub fn not_found(target: Target<'_>) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {:?} not found", target.qualified(), target.name),
        )
        .about(target)
    }

    /// 404 NotFound for a path the server does not serve.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 406 NotAcceptable.
    pub fn not_acceptable(accepted: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!("only the following media types are accepted: {accepted}"),
        )
    }

    /// 409 AlreadyExists.
    pub fn already_exists(target: Target<'_>) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {:?} already exists", target.qualified(), target.name),
        )
        .about(target)
    }

    /// 409 Conflict on a stale resourceVersion.
    pub fn conflict(target: Target<'_>, detail: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {:?}: {detail}",
                target.qualified(),
                target.name
            ),
        )
        .about(target)
    }

    /// The usual conflict detail.
    pub const MODIFIED: &'static str = "the object has been modified; please apply your changes to the latest version and try again";

    /// 410 Gone (a resource version too old to watch from).
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Gone", message)
    }

    /// 410 Expired (an expired continue token).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 413 RequestEntityTooLarge.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    /// 422 Invalid, with causes; `kind` is the object's kind.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let listed: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let summary = if listed.len() == 1 {
            listed[0].clone()
        } else {
            format!("[{}]", listed.join(", "))
        };
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{qualified} {name:?} is invalid: {summary}"),
        );
        err.name = Some(name.to_string());
        err.group = (!group.is_empty()).then(|| group.to_string());
        err.kind = Some(kind.to_string());
        err.causes = causes;
        err
    }

    /// 429 TooManyRequests.
    pub fn too_many_requests(retry_after: u32) -> Self {
        let mut err = Self::new(
            429,
            "TooManyRequests",
            "too many requests, please try again later",
        );
        err.retry_after_seconds = Some(retry_after);
        err
    }

    /// 500 InternalError. The message should not leak internals a client must not see.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", message.into()),
        )
    }

    /// 503 ServiceUnavailable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut err = Self::new(503, "ServiceUnavailable", message);
        err.retry_after_seconds = Some(1);
        err
    }

    /// 504 Timeout.
    pub fn timeout(message: impl Into<String>) -> Self {
        let mut err = Self::new(504, "Timeout", message);
        err.retry_after_seconds = Some(1);
        err
    }

    /// The error as a `metav1.Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(token) = &self.continue_token {
            status["metadata"]["continue"] = json!(token);
        }
        let mut details = serde_json::Map::new();
        if let Some(name) = &self.name {
            details.insert("name".into(), json!(name));
        }
        if let Some(group) = &self.group {
            details.insert("group".into(), json!(group));
        }
        if let Some(kind) = &self.kind {
            details.insert("kind".into(), json!(kind));
        }
        if !self.causes.is_empty() {
            details.insert(
                "causes".into(),
                Value::Array(
                    self.causes
                        .iter()
                        .map(
                            |c| json!({"reason": c.reason, "message": c.message, "field": c.field}),
                        )
                        .collect(),
                ),
            );
        }
        if let Some(secs) = self.retry_after_seconds {
            details.insert("retryAfterSeconds".into(), json!(secs));
        }
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// A `Status` of success, as returned by some deletes.
pub fn success_status(target: Target<'_>, uid: Option<&str>) -> Value {
    let mut details = json!({"name": target.name, "kind": target.resource});
    if !target.group.is_empty() {
        details["group"] = json!(target.group);
    }
    if let Some(uid) = uid {
        details["uid"] = json!(uid);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_message_shapes() {
        let t = Target {
            group: "apps",
            resource: "deployments",
            name: "web",
        };
        assert_eq!(
            ApiError::not_found(t).message,
            "deployments.apps \"web\" not found"
        );
        let invalid = ApiError::invalid(
            "",
            "Pod",
            "p",
            vec![Cause::required("spec.containers[0].image", "")],
        );
        assert_eq!(
            invalid.message,
            "Pod \"p\" is invalid: spec.containers[0].image: Required value"
        );
        let status = invalid.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueRequired"
        );
    }
}
