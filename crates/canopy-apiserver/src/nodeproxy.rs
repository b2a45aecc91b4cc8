//! Requests from the API server to node agents (`pods/log`, and the upgraded streams of
//! `pods/exec` and `pods/portforward`), as upstream's apiserver
//! calls kubelets.
//!
//! The API server authenticates with its own client certificate (an administrator of the
//! cluster CA, which the agent requires). It authenticates the agent by pinning: an agent
//! serves with a self-signed certificate whose SHA-256 it publishes in its own Node's
//! annotation [`SERVING_CERT_ANNOTATION`], which only that node (or an administrator) can
//! write. Upstream's default is weaker: without `--kubelet-certificate-authority` it does not
//! verify kubelets at all.

use std::{sync::Arc, time::Duration};

use canopy_api::{ApiError, ApiResult, meta};
use http_body_util::Empty;
use hyper::body::Incoming;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use canopy_api::AGENT_SERVING_CERT_ANNOTATION as SERVING_CERT_ANNOTATION;

/// The API server's credential towards node agents.
pub struct NodeClient {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl NodeClient {
    /// From a PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
            .ok_or_else(|| anyhow::anyhow!("no private key in the node client key"))?;
        Ok(NodeClient {
            certs,
            key,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// GETs `path_and_query` from the agent of `node` (a Node object) and returns its
    /// response, whose body streams.
    pub async fn get(
        &self,
        node: &Value,
        path_and_query: &str,
    ) -> ApiResult<http::Response<Incoming>> {
        self.send(node, path_and_query, &http::HeaderMap::new())
            .await
    }

    /// Asks the agent of `node` to upgrade `path_and_query` with the client's upgrade
    /// headers; on 101 the response's upgrade is the agent's end of the stream.
    pub async fn upgrade(
        &self,
        node: &Value,
        path_and_query: &str,
        upgrade_headers: &http::HeaderMap,
    ) -> ApiResult<http::Response<Incoming>> {
        self.send(node, path_and_query, upgrade_headers).await
    }

    async fn send(
        &self,
        node: &Value,
        path_and_query: &str,
        headers: &http::HeaderMap,
    ) -> ApiResult<http::Response<Incoming>> {
        let name = meta::name(node).to_string();
        let unavailable = |why: String| ApiError::unavailable(why);
        let address = meta::path(node, "status.addresses")
            .and_then(Value::as_array)
            .and_then(|addresses| {
                ["InternalIP", "ExternalIP", "Hostname"]
                    .iter()
                    .find_map(|kind| {
                        addresses.iter().find_map(|a| {
                            (a.get("type").and_then(Value::as_str) == Some(kind))
                                .then(|| a.get("address").and_then(Value::as_str))
                                .flatten()
                        })
                    })
            })
            .ok_or_else(|| unavailable(format!("node {name:?} reports no address")))?
            .to_string();
        let port = meta::path(node, "status.daemonEndpoints.kubeletEndpoint.Port")
            .and_then(Value::as_u64)
            .filter(|p| *p > 0 && *p <= u16::MAX as u64)
            .ok_or_else(|| unavailable(format!("the agent of node {name:?} serves no API")))?
            as u16;
        let pin = meta::path(node, "metadata.annotations")
            .and_then(|a| a.get(SERVING_CERT_ANNOTATION))
            .and_then(Value::as_str)
            .and_then(decode_hex)
            .ok_or_else(|| {
                unavailable(format!(
                    "node {name:?} has not published its agent's certificate ({SERVING_CERT_ANNOTATION})"
                ))
            })?;
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ApiError::internal(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                sha256: pin,
                node: name.clone(),
                provider: self.provider.clone(),
            }))
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let target = format!("{address}:{port}");
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            // Relayed streams (exec, port-forward) carry small interactive writes.
            tcp.set_nodelay(true)?;
            let server_name = ServerName::try_from(address.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            connector.connect(server_name, tcp).await
        };
        let tls = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| {
                unavailable(format!(
                    "connecting to the agent of node {name:?} at {target} timed out"
                ))
            })?
            .map_err(|e| {
                unavailable(format!(
                    "connecting to the agent of node {name:?} at {target}: {e}"
                ))
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| unavailable(format!("the agent of node {name:?}: {e}")))?;
        tokio::spawn(connection.with_upgrades());
        let mut request = http::Request::get(path_and_query)
            .header(http::header::HOST, target.as_str())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        request.headers_mut().extend(headers.clone());
        // A node is its tenant's machine: it must not hold the API server's requests open.
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .map_err(|_| unavailable(format!("the agent of node {name:?} did not answer in time")))?
            .map_err(|e| unavailable(format!("the agent of node {name:?}: {e}")))
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Accepts exactly the certificate whose SHA-256 the node published, and only if it names
/// that node: a node cannot send the API server to another node's agent by publishing that
/// agent's address and certificate. The handshake's signatures are still verified with it.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    node: String,
    provider: Arc<CryptoProvider>,
}

/// Whether a certificate's subject alternative names include `node`.
fn names_node(der: &[u8], node: &str) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return false;
    };
    sans.value.general_names.iter().any(
        |name| matches!(name, x509_parser::extensions::GeneralName::DNSName(dns) if *dns == node),
    )
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.sha256 && names_node(end_entity.as_ref(), &self.node) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_from_hex() {
        let hex = "00ff".repeat(16);
        let pin = decode_hex(&hex).unwrap();
        assert_eq!(pin[0], 0);
        assert_eq!(pin[1], 0xff);
        assert!(decode_hex("abc").is_none());
        assert!(decode_hex(&"zz".repeat(32)).is_none());
    }
}
