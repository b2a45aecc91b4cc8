//! Canopy's certificates: a cluster CA, the API server's serving certificate and client
//! certificates (the admin's, and later components'), all ECDSA P-256, created on first start
//! and reused afterwards. Private keys are written with mode 0600.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the files the PKI keeps in `<data-dir>/pki`.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

/// A certificate and key in PEM.
#[derive(Clone)]
pub struct CertPair {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair").finish_non_exhaustive()
    }
}

impl Pki {
    /// The PKI under `<data_dir>/pki`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }

    /// The directory of the cluster's keys and certificates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate's path.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the CA if it does not exist yet; returns it.
    pub fn ensure_ca(&self) -> Result<CertPair> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if let Some(pair) = self.load("ca")? {
            return Ok(pair);
        }
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name("canopy-ca", &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let pair = CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        self.store("ca", &pair)?;
        Ok(pair)
    }

    /// Returns the serving certificate, (re)issuing it when it is missing or does not cover
    /// every name in `sans`.
    pub fn ensure_serving(&self, sans: &[String]) -> Result<CertPair> {
        let ca = self.ensure_ca()?;
        if let Some(pair) = self.load("server")? {
            if covers(&pair.cert_pem, sans) {
                return Ok(pair);
            }
            tracing::info!("serving certificate lacks a requested name; issuing a new one");
        }
        let pair = self.issue(
            &ca,
            "canopy-apiserver",
            &[],
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        self.store("server", &pair)?;
        Ok(pair)
    }

    /// Returns the client certificate of `user` in `groups`, issuing it on first use.
    pub fn ensure_client(&self, file: &str, user: &str, groups: &[&str]) -> Result<CertPair> {
        let ca = self.ensure_ca()?;
        if let Some(pair) = self.load(file)? {
            return Ok(pair);
        }
        let pair = self.issue(&ca, user, groups, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        self.store(file, &pair)?;
        Ok(pair)
    }

    /// Issues a client certificate without storing it (`canopy kubeconfig`).
    pub fn issue_client(&self, user: &str, groups: &[&str]) -> Result<CertPair> {
        let ca = self.ensure_ca()?;
        self.issue(&ca, user, groups, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        ca: &CertPair,
        common_name: &str,
        organizations: &[&str],
        sans: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertPair> {
        let ca_key = KeyPair::from_pem(&ca.key_pem).context("parsing CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("parsing CA certificate")?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        // rcgen keeps one value per attribute type; a second O goes under O's raw OID (a
        // distinct key to rcgen, the same attribute to every reader), so a certificate
        // names at most two groups: enough for a node and its tenant.
        if organizations.len() > 2 {
            anyhow::bail!(
                "a client certificate can carry at most two groups, got {organizations:?}"
            );
        }
        params.distinguished_name = name(common_name, organizations);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn load(&self, name: &str) -> Result<Option<CertPair>> {
        let cert = self.path(&format!("{name}.crt"));
        let key = self.path(&format!("{name}.key"));
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        Ok(Some(CertPair {
            cert_pem: std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?,
        }))
    }

    fn store(&self, name: &str, pair: &CertPair) -> Result<()> {
        write_private(&self.path(&format!("{name}.key")), pair.key_pem.as_bytes())?;
        let cert = self.path(&format!("{name}.crt"));
        std::fs::write(&cert, &pair.cert_pem).with_context(|| format!("writing {}", cert.display()))
    }
}

/// The OID of the organizationName attribute (X.520).
const ORGANIZATION_OID: [u64; 4] = [2, 5, 4, 10];

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(first) = organizations.first() {
        dn.push(DnType::OrganizationName, *first);
    }
    if let Some(second) = organizations.get(1) {
        dn.push(DnType::CustomDnType(ORGANIZATION_OID.to_vec()), *second);
    }
    dn
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Whether the certificate's subject alternative names include every name in `sans`.
fn covers(cert_pem: &str, sans: &[String]) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    let Ok(cert) = pem.parse_x509() else {
        return false;
    };
    let mut present: Vec<String> = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => present.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    present.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    sans.iter().all(|s| {
        let normalized = s
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|_| s.clone());
        present.contains(&normalized)
    })
}

/// The identity in a client certificate: CN is the user, each O a group (as upstream).
pub fn identity_of(cert_der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some((user, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_reuses_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let first = pki.ensure_serving(&sans).unwrap();
        let again = pki.ensure_serving(&sans).unwrap();
        assert_eq!(
            first.cert_pem, again.cert_pem,
            "reused when it covers the names"
        );
        let more = vec!["10.0.0.1".to_string()];
        let reissued = pki.ensure_serving(&more).unwrap();
        assert_ne!(first.cert_pem, reissued.cert_pem);
        let admin = pki
            .ensure_client("admin", "canopy-admin", &["system:masters"])
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(admin.cert_pem.as_bytes()).unwrap();
        let (user, groups) = identity_of(&pem.contents).unwrap();
        assert_eq!(user, "canopy-admin");
        assert_eq!(groups, vec!["system:masters"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("pki/admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_certificate_names_up_to_two_groups() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let pair = pki
            .issue_client("system:node:n1", &["system:nodes", "canopy:tenant:acme"])
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(pair.cert_pem.as_bytes()).unwrap();
        let (user, groups) = identity_of(&pem.contents).unwrap();
        assert_eq!(user, "system:node:n1");
        assert_eq!(groups, vec!["system:nodes", "canopy:tenant:acme"]);
        assert!(pki.issue_client("u", &["a", "b", "c"]).is_err());
    }
}
