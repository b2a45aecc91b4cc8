//! Service-account tokens: what `serviceaccounts/<name>/token` (TokenRequest) issues and the
//! authenticator accepts.
//!
//! Tokens are upstream's bound service-account JWTs: ES256, signed with one key per cluster
//! (`--service-account-signing-key-file`, by default generated beside the CA so that every
//! API server sharing the PKI directory signs and verifies alike), with upstream's claims
//! (`iss`, `sub` = `system:serviceaccount:<ns>:<name>`, `aud`, `exp`/`iat`/`nbf`, `jti` and the
//! `kubernetes.io` object references). A token bound to a pod stops authenticating once that
//! pod is deleted or replaced by another of the same name, and every token stops with its
//! service account: the authenticator checks both against the watch cache on every request.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use canopy_api::{ApiError, ApiResult, meta};
use serde_json::Value;

use crate::{auth::User, rest::Context};

/// Upstream's user name prefix of service accounts.
pub const USER_PREFIX: &str = "system:serviceaccount:";
/// Upstream's group of every service account.
pub const ALL_GROUP: &str = "system:serviceaccounts";

/// An object a token names (`kubernetes.io.pod`, `.serviceaccount`, `.node`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// The `kubernetes.io` claim.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub serviceaccount: ObjectRef,
    /// The pod the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    /// The node of that pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
}

/// A token's claims.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Token id (a credential id in audit logs; never the token itself).
    pub jti: String,
    /// What the token is for.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

impl Claims {
    /// The user a valid token authenticates as, as upstream names it.
    pub fn user(&self) -> User {
        let namespace = &self.kubernetes.namespace;
        User {
            name: format!(
                "{USER_PREFIX}{namespace}:{}",
                self.kubernetes.serviceaccount.name
            ),
            groups: vec![
                ALL_GROUP.to_string(),
                format!("{ALL_GROUP}:{namespace}"),
                "system:authenticated".to_string(),
            ],
        }
    }
}

/// Signs and verifies service-account tokens.
pub struct TokenSigner {
    issuer: String,
    audiences: Vec<String>,
    key_id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("issuer", &self.issuer)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Upstream's default and smallest token lifetimes.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Tokens shorter than ten minutes are refused, as upstream.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

impl TokenSigner {
    /// A signer from a PEM ECDSA P-256 private key (PKCS#8), as `--service-account-signing-key-file`.
    pub fn from_pem(pem: &str, issuer: &str, audiences: &[String]) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::from_pem(pem).context("reading the service-account key")?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            anyhow::bail!("the service-account signing key must be an ECDSA P-256 key");
        }
        let encoding = EncodingKey::from_ec_pem(pem.as_bytes())
            .context("loading the service-account signing key")?;
        // Upstream's key id: the unpadded base64url SHA-256 of the public key's DER.
        use base64::Engine;
        let key_id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        ));
        Ok(Self {
            issuer: issuer.to_string(),
            audiences: if audiences.is_empty() {
                vec![issuer.to_string()]
            } else {
                audiences.to_vec()
            },
            key_id,
            encoding,
            decoding: DecodingKey::from_ec_der(key.public_key_raw()),
        })
    }

    /// Loads the key at `path`, generating it (mode 0600) when missing.
    pub fn load_or_generate(
        path: &Path,
        issuer: &str,
        audiences: &[String],
    ) -> anyhow::Result<Self> {
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate().context("generating a service-account key")?;
                let pem = key.serialize_pem();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                crate::pki::write_private(path, pem.as_bytes())?;
                pem
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        Self::from_pem(&pem, issuer, audiences)
            .with_context(|| format!("service-account key {}", path.display()))
    }

    /// The issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audiences a token gets when its request names none (`--api-audiences`).
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("signing a token")
    }

    /// Whether a bearer token claims to be one of ours (a JWT from our issuer), without
    /// checking anything else: other tokens go on to the next authenticator.
    pub fn claims_ours(&self, token: &str) -> bool {
        if token.split('.').count() != 3 {
            return false;
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.insecure_disable_signature_validation();
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        #[derive(Deserialize)]
        struct Issuer {
            iss: Option<String>,
        }
        jsonwebtoken::decode::<Issuer>(token, &DecodingKey::from_secret(&[]), &validation)
            .ok()
            .and_then(|t| t.claims.iss)
            .is_some_and(|iss| iss == self.issuer)
    }

    /// The claims of a token this signer issued that is within its lifetime and meant for
    /// one of the API's audiences; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 60;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()?
            .claims;
        let expected = format!(
            "{USER_PREFIX}{}:{}",
            claims.kubernetes.namespace, claims.kubernetes.serviceaccount.name
        );
        (claims.sub == expected).then_some(claims)
    }
}

/// Authenticates service-account tokens this cluster signed.
pub struct TokenAuthenticator {
    /// The signer whose tokens are accepted.
    pub signer: Arc<TokenSigner>,
    /// Where the tokens' service accounts and pods are looked up.
    pub ctx: Arc<Context>,
}

impl TokenAuthenticator {
    /// `None` for a token that is not one of ours (the next authenticator may know it);
    /// otherwise the user, or 401 for a token that is ours but invalid, expired, for
    /// another audience, or whose service account or pod is gone.
    pub async fn authenticate(&self, token: &str) -> Option<ApiResult<User>> {
        if !self.signer.claims_ours(token) {
            return None;
        }
        let Some(claims) = self.signer.verify(token) else {
            return Some(Err(ApiError::unauthorized()));
        };
        Some(
            check_bound_objects(&self.ctx, &claims)
                .await
                .map(|()| claims.user()),
        )
    }
}

/// An object by kind and key, from the watch cache, or from the store when the cache does
/// not have it (yet).
pub(crate) async fn lookup(
    ctx: &Context,
    plural: &str,
    namespace: &str,
    name: &str,
) -> ApiResult<Option<Value>> {
    let Some(def) = ctx.registry.get("", "v1", plural) else {
        return Ok(None);
    };
    let cache_key = if def.namespaced {
        format!("{namespace}/{name}")
    } else {
        name.to_string()
    };
    if let Some(obj) = ctx.cache(def).get(&cache_key) {
        return Ok(Some(obj.value()));
    }
    Ok(ctx
        .read_stored(def, &def.key(namespace, name))
        .await?
        .map(|(value, _)| value))
}

/// Refuses a token whose service account or bound pod is gone, replaced (another UID) or,
/// for the pod, being deleted, as upstream's legacy-free token validator.
pub async fn check_bound_objects(ctx: &Context, claims: &Claims) -> ApiResult<()> {
    let k8s = &claims.kubernetes;
    let live = |obj: Option<Value>, uid: &str| {
        obj.is_some_and(|obj| meta::uid(&obj) == uid && !meta::is_deleting(&obj))
    };
    let account = lookup(
        ctx,
        "serviceaccounts",
        &k8s.namespace,
        &k8s.serviceaccount.name,
    )
    .await?;
    if !live(account, &k8s.serviceaccount.uid) {
        return Err(ApiError::unauthorized());
    }
    if let Some(pod) = &k8s.pod {
        let found = lookup(ctx, "pods", &k8s.namespace, &pod.name).await?;
        if !live(found, &pod.uid) {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_signer(dir: &Path) -> TokenSigner {
        TokenSigner::load_or_generate(
            &dir.join("sa.key"),
            "https://kubernetes.default.svc.cluster.local",
            &[],
        )
        .unwrap()
    }

    fn claims(now: i64, aud: &str) -> Claims {
        Claims {
            iss: "https://kubernetes.default.svc.cluster.local".into(),
            sub: "system:serviceaccount:acme:default".into(),
            aud: vec![aud.into()],
            exp: now + 3600,
            iat: now,
            nbf: now,
            jti: "id".into(),
            kubernetes: KubernetesClaims {
                namespace: "acme".into(),
                serviceaccount: ObjectRef {
                    name: "default".into(),
                    uid: "sa-uid".into(),
                },
                pod: Some(ObjectRef {
                    name: "web".into(),
                    uid: "pod-uid".into(),
                }),
                node: None,
            },
        }
    }

    #[test]
    fn issues_tokens_it_verifies_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let signer = new_signer(dir.path());
        let now = chrono::Utc::now().timestamp();
        let issuer = signer.issuer().to_string();
        let token = signer.sign(&claims(now, &issuer)).unwrap();
        assert!(signer.claims_ours(&token));
        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified, claims(now, &issuer));
        assert_eq!(verified.user().name, "system:serviceaccount:acme:default");
        assert_eq!(
            verified.user().groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:acme",
                "system:authenticated"
            ]
        );
        // The key persists: a second server on the same file verifies the first's tokens.
        assert!(new_signer(dir.path()).verify(&token).is_some());

        // Another audience, an expired token, a forged subject, a tampered signature and
        // another key's token are all refused.
        assert!(
            signer
                .verify(&signer.sign(&claims(now, "vault")).unwrap())
                .is_none()
        );
        let mut expired = claims(now - 7200, &issuer);
        expired.exp = now - 120;
        assert!(signer.verify(&signer.sign(&expired).unwrap()).is_none());
        let mut forged = claims(now, &issuer);
        forged.sub = "system:serviceaccount:kube-system:admin".into();
        assert!(signer.verify(&signer.sign(&forged).unwrap()).is_none());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(signer.verify(&tampered).is_none());
        let other = tempfile::tempdir().unwrap();
        let stranger = new_signer(other.path())
            .sign(&claims(now, &issuer))
            .unwrap();
        assert!(signer.claims_ours(&stranger));
        assert!(signer.verify(&stranger).is_none());
        assert!(!signer.claims_ours("gAAAAABfernet-looking-keystone-token"));
    }

    #[test]
    fn refuses_keys_it_cannot_sign_with() {
        let rsa_like = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(TokenSigner::from_pem(rsa_like, "i", &[]).is_err());
    }
}
