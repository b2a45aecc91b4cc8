//! Turning an HTTP request into what it asks for: the route (upstream's RequestInfo), the
//! query options, and the media types of body and response.

use canopy_api::{ApiError, ApiResult, Registry, ResourceDef, Subresource};
use http::Method;

/// What a request path names.
#[derive(Debug)]
pub enum Route {
    /// `/version`.
    Version,
    /// `/healthz`, `/livez`, `/readyz` (with an optional check name).
    Health(HealthKind),
    /// `/metrics`.
    Metrics,
    /// `/openapi/v2`.
    OpenApiV2,
    /// `/openapi/v3`.
    OpenApiV3Root,
    /// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>`.
    OpenApiV3(String),
    /// `/api`.
    CoreVersions,
    /// `/apis`.
    Groups,
    /// `/apis/<group>`.
    Group(String),
    /// `/api/v1`, `/apis/<group>/<version>`.
    Resources(String, String),
    /// A resource path.
    Resource(ResourceRequest),
}

/// The health endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthKind {
    /// `/healthz`.
    Healthz,
    /// `/livez`.
    Livez,
    /// `/readyz`.
    Readyz,
}

/// A request for a resource (upstream's RequestInfo for resource requests).
#[derive(Clone, Debug)]
pub struct ResourceRequest {
    /// The resource.
    pub def: &'static ResourceDef,
    /// Namespace from the path (None: cluster scope or all namespaces).
    pub namespace: Option<String>,
    /// Object name, for item requests.
    pub name: Option<String>,
    /// Subresource.
    pub subresource: Option<Subresource>,
    /// The verb, as authorization sees it.
    pub verb: Verb,
}

/// Kubernetes verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET on an item.
    Get,
    /// GET on a collection.
    List,
    /// GET on a collection with `watch=true`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
    /// DELETE on an item.
    Delete,
    /// DELETE on a collection.
    DeleteCollection,
}

impl Verb {
    /// The verb's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }

    /// Whether the verb changes state.
    pub fn is_mutating(self) -> bool {
        !matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

/// Splits a path into percent-decoded segments. A decoded segment may not contain `/` or
/// be `.` or `..`: those would escape the object's place in the store's key space.
fn segments(path: &str) -> ApiResult<Vec<String>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let decoded = percent_decode(s)
                .ok_or_else(|| ApiError::bad_request(format!("invalid path segment {s:?}")))?;
            if decoded.contains('/') || decoded == "." || decoded == ".." {
                return Err(ApiError::bad_request(format!("invalid path segment {s:?}")));
            }
            Ok(decoded)
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Resolves a path and method to a route.
pub fn route(registry: &Registry, method: &Method, path: &str, query: &Query) -> ApiResult<Route> {
    let segs = segments(path)?;
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["healthz", ..] => return Ok(Route::Health(HealthKind::Healthz)),
        ["livez", ..] => return Ok(Route::Health(HealthKind::Livez)),
        ["readyz", ..] => return Ok(Route::Health(HealthKind::Readyz)),
        ["metrics"] => return Ok(Route::Metrics),
        ["openapi", "v2"] => return Ok(Route::OpenApiV2),
        ["openapi", "v3"] => return Ok(Route::OpenApiV3Root),
        ["openapi", "v3", rest @ ..] => return Ok(Route::OpenApiV3(rest.join("/"))),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["apis", group] => return Ok(Route::Group(group.to_string())),
        ["api", version] => return Ok(Route::Resources(String::new(), version.to_string())),
        ["apis", group, version] => {
            return Ok(Route::Resources(group.to_string(), version.to_string()));
        }
        _ => {}
    }
    let (group, version, rest) = match s.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route()),
    };
    let lookup = |plural: &str| registry.get(group, version, plural);
    // `namespaces/<ns>/<resource>...` names a namespaced resource; `namespaces/<name>[/sub]`
    // names the namespace itself.
    let (def, namespace, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|d| d.namespaced) => {
            let def = lookup(plural).ok_or_else(ApiError::no_route)?;
            match tail {
                [] => (def, Some(ns.to_string()), None, None),
                [name] => (def, Some(ns.to_string()), Some(name.to_string()), None),
                [name, sub] => (
                    def,
                    Some(ns.to_string()),
                    Some(name.to_string()),
                    Some(*sub),
                ),
                _ => return Err(ApiError::no_route()),
            }
        }
        [plural, tail @ ..] => {
            let def = lookup(plural).ok_or_else(ApiError::no_route)?;
            match tail {
                [] => (def, None, None, None),
                [name] if !def.namespaced => (def, None, Some(name.to_string()), None),
                [name, sub] if !def.namespaced => (def, None, Some(name.to_string()), Some(*sub)),
                _ => return Err(ApiError::no_route()),
            }
        }
        [] => return Err(ApiError::no_route()),
    };
    let subresource = match sub {
        None => None,
        Some(sub) => Some(
            def.subresources
                .iter()
                .copied()
                .find(|s| s.name() == sub)
                .ok_or_else(ApiError::no_route)?,
        ),
    };
    let verb = match (method, name.is_some()) {
        (&Method::GET, true) => Verb::Get,
        (&Method::GET, false) if query.flag("watch") => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::POST, false) => Verb::Create,
        // pods/<name>/binding is created with POST on the item's subresource.
        (&Method::POST, true)
            if matches!(subresource, Some(Subresource::Binding | Subresource::Token)) =>
        {
            Verb::Create
        }
        // Streams are opened with POST (kubectl) or GET (WebSocket clients).
        (&Method::POST, true) if subresource.is_some_and(Subresource::is_stream) => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        (&Method::DELETE, false) => Verb::DeleteCollection,
        _ => return Err(ApiError::method_not_allowed()),
    };
    Ok(Route::Resource(ResourceRequest {
        def,
        namespace,
        name,
        subresource,
        verb,
    }))
}

/// Decoded query parameters.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses a query string (kube-rs starts it with `&`, which is fine).
    pub fn parse(query: Option<&str>) -> Self {
        Self {
            pairs: query
                .map(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .filter(|(k, _)| !k.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The first value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a parameter.
    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean flag (`true`/`1`; absent is false).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1" | "True"))
    }

    /// An optional boolean, rejecting garbage.
    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some("true" | "1" | "True") => Ok(Some(true)),
            Some("false" | "0" | "False") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value {other:?} for {name}: must be true or false"
            ))),
        }
    }

    /// An optional non-negative integer, rejecting garbage.
    pub fn int(&self, name: &str) -> ApiResult<Option<i64>> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value {v:?} for {name}: not an integer"))
            }),
        }
    }
}

/// What a client accepts in a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Plain JSON.
    Json,
    /// YAML.
    Yaml,
    /// `meta.k8s.io/v1` Table.
    Table,
    /// `meta.k8s.io/v1` PartialObjectMetadata(List).
    Metadata,
}

/// Chooses the response representation from an Accept header.
pub fn negotiate(accept: Option<&str>) -> ApiResult<Output> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Output::Json);
    };
    for entry in accept.split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut as_ = None;
        let mut group = None;
        for param in parts {
            match param.split_once('=') {
                Some(("as", v)) => as_ = Some(v.to_string()),
                Some(("g", v)) => group = Some(v.to_string()),
                _ => {}
            }
        }
        let json_like = matches!(media.as_str(), "application/json" | "*/*" | "application/*");
        match (as_.as_deref(), group.as_deref()) {
            (Some("Table"), Some("meta.k8s.io")) if json_like => return Ok(Output::Table),
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io"))
                if json_like =>
            {
                return Ok(Output::Metadata);
            }
            // A representation we do not serve: try the next entry.
            (Some(_), _) => continue,
            (None, _) => {}
        }
        if json_like {
            return Ok(Output::Json);
        }
        if media == "application/yaml" {
            return Ok(Output::Yaml);
        }
    }
    Err(ApiError::not_acceptable(
        "application/json, application/yaml, application/json;as=Table;v=v1;g=meta.k8s.io",
    ))
}

/// Body media types the server decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    /// `application/json`.
    Json,
    /// `application/yaml`.
    Yaml,
    /// `application/json-patch+json`.
    JsonPatch,
    /// `application/merge-patch+json`.
    MergePatch,
    /// `application/strategic-merge-patch+json`.
    StrategicMergePatch,
    /// `application/apply-patch+yaml` (server-side apply; JSON is YAML).
    ApplyPatch,
    /// `application/vnd.kubernetes.protobuf` (what kubectl's typed clients send).
    Protobuf,
}

/// Media types accepted for create and update.
pub const OBJECT_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/vnd.kubernetes.protobuf",
];
/// Media types accepted for patch.
pub const PATCH_TYPES: &[&str] = &[
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
];

/// Parses a Content-Type header.
pub fn body_type(content_type: Option<&str>) -> Option<BodyType> {
    let media = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    Some(match media.as_str() {
        "application/json" => BodyType::Json,
        "application/yaml" | "application/x-yaml" | "text/yaml" => BodyType::Yaml,
        "application/json-patch+json" => BodyType::JsonPatch,
        "application/merge-patch+json" => BodyType::MergePatch,
        "application/strategic-merge-patch+json" => BodyType::StrategicMergePatch,
        "application/apply-patch+yaml" | "application/apply-patch+json" => BodyType::ApplyPatch,
        "application/vnd.kubernetes.protobuf" => BodyType::Protobuf,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: Method, path: &str, query: &str) -> ApiResult<Route> {
        let registry = Registry::builtin();
        route(&registry, &method, path, &Query::parse(Some(query)))
    }

    #[test]
    fn resource_paths() {
        let Route::Resource(req) =
            r(Method::GET, "/api/v1/namespaces/ns1/pods/p/status", "").unwrap()
        else {
            panic!()
        };
        assert_eq!(req.def.plural, "pods");
        assert_eq!(req.namespace.as_deref(), Some("ns1"));
        assert_eq!(req.name.as_deref(), Some("p"));
        assert_eq!(req.subresource, Some(Subresource::Status));
        assert_eq!(req.verb, Verb::Get);
        let Route::Resource(req) = r(Method::GET, "/api/v1/namespaces/ns1", "").unwrap() else {
            panic!()
        };
        assert_eq!(req.def.plural, "namespaces");
        assert_eq!(req.name.as_deref(), Some("ns1"));
        let Route::Resource(req) = r(Method::PUT, "/api/v1/namespaces/ns1/finalize", "").unwrap()
        else {
            panic!()
        };
        assert_eq!(req.subresource, Some(Subresource::Finalize));
        let Route::Resource(req) =
            r(Method::GET, "/apis/apps/v1/deployments", "&watch=true").unwrap()
        else {
            panic!()
        };
        assert_eq!(req.verb, Verb::Watch);
        assert!(req.namespace.is_none());
        assert!(
            r(Method::GET, "/api/v1/pods/x", "").is_err(),
            "namespaced item needs a namespace"
        );
        assert_eq!(
            r(Method::POST, "/api/v1/namespaces/a/pods/x", "")
                .unwrap_err()
                .code,
            405
        );
        assert_eq!(
            r(Method::GET, "/api/v1/namespaces/a/pods/x/bogus", "")
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(
            r(Method::GET, "/api/v1/namespaces/a/pods/%2e%2e", "")
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn negotiation() {
        assert_eq!(
            negotiate(Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json")).unwrap(),
            Output::Table
        );
        assert_eq!(negotiate(None).unwrap(), Output::Json);
        assert_eq!(
            negotiate(Some("application/vnd.kubernetes.protobuf, */*")).unwrap(),
            Output::Json
        );
        assert_eq!(negotiate(Some("text/html")).unwrap_err().code, 406);
    }
}
