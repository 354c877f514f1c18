//! Certificate generation for `connect demo` and the tests: a throw-away certificate authority,
//! leaf certificates it issues for DNS names and IP literals, and self-signed leaves.
//!
//! This module owns key and certificate *creation* only. It must never be used to produce the
//! certificates of a real deployment (keys live in memory and in the files the caller asks for,
//! nothing here rotates or protects them), must never log or Display private key material, and
//! does no TLS itself: callers load the PEM it returns into their own rustls configuration.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM encoded (`CERTIFICATE` and PKCS#8 `PRIVATE KEY`).
///
/// `Debug` shows the certificate only: the key is a secret.
#[derive(Clone)]
pub struct Pem {
    /// The certificate, one `-----BEGIN CERTIFICATE-----` block.
    pub cert: String,
    /// The private key, one `-----BEGIN PRIVATE KEY-----` block (PKCS#8).
    pub key: String,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A certificate needs at least one subject alternative name to be useful for TLS.
    #[error("no names given for the certificate: pass at least one DNS name or IP address, e.g. \"localhost\" or \"127.0.0.1\"")]
    NoNames,
    /// A name is neither an IP literal nor something that fits in a DNS subject alternative name.
    #[error("\"{name}\" cannot be a certificate name: use a DNS name (ASCII, e.g. \"localhost\") or an IP address (e.g. \"127.0.0.1\"): {source}")]
    BadName {
        /// The offending name, as given.
        name: String,
        /// What rcgen objected to.
        #[source]
        source: rcgen::Error,
    },
    /// Key generation or signing failed inside rcgen.
    #[error("could not {what}: {source}")]
    Generate {
        /// The step that failed, e.g. "sign the leaf certificate for [\"localhost\"]".
        what: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
}

/// A throw-away certificate authority that issues leaf certificates for loopback tests and the
/// demo. Its private key never leaves memory.
pub struct TestCa {
    common_name: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// Creates a new CA with a fresh ECDSA P-256 key and a self-signed certificate whose subject
    /// common name is `common_name`.
    pub fn new(common_name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: format!("generate the key of CA \"{common_name}\""),
            source,
        })?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: format!("self-sign the certificate of CA \"{common_name}\""),
                source,
            })?;
        Ok(TestCa {
            common_name: common_name.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM, to be written where a client expects its trust anchor
    /// (e.g. `hub_ca`).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// Issues a server/client leaf certificate valid for every entry of `names`; each entry is an
    /// IP literal (`"127.0.0.1"`, `"::1"`) or a DNS name (`"localhost"`). The first name is also
    /// the subject common name.
    pub fn issue(&self, names: &[&str]) -> Result<Pem, CertError> {
        let params = leaf_params(names)?;
        let key = generate_key(names)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate {
                what: format!(
                    "sign the leaf certificate for {names:?} with CA \"{}\"",
                    self.common_name
                ),
                source,
            })?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Makes a self-signed leaf certificate (not a CA) for `names`, as an administrator would for a
/// target that nobody else vouches for. Clients that check certificates must reject it.
pub fn self_signed(names: &[&str]) -> Result<Pem, CertError> {
    let params = leaf_params(names)?;
    let key = generate_key(names)?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate {
            what: format!("self-sign the certificate for {names:?}"),
            source,
        })?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (creating `dir` if needed) and returns their
/// paths. On Unix the key file is created with mode 0600, and an existing one is narrowed to it.
pub fn write_pem_files(dir: &Path, stem: &str, pem: &Pem) -> std::io::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    fs::write(&cert_path, &pem.cert)?;

    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut key_file = options.open(&key_path)?;
    // `mode` applies only when the file is created; an older key file may be wider.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        key_file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    key_file.write_all(pem.key.as_bytes())?;
    key_file.sync_all()?;
    Ok((cert_path, key_path))
}

fn leaf_params(names: &[&str]) -> Result<CertificateParams, CertError> {
    let first = names.first().ok_or(CertError::NoNames)?;
    let mut params = CertificateParams::default();
    // One name at a time, so the error can say which name was refused.
    for name in names {
        let parsed = CertificateParams::new(vec![(*name).to_owned()]).map_err(|source| {
            CertError::BadName {
                name: (*name).to_owned(),
                source,
            }
        })?;
        params.subject_alt_names.extend(parsed.subject_alt_names);
    }
    params.distinguished_name.push(DnType::CommonName, *first);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn generate_key(names: &[&str]) -> Result<KeyPair, CertError> {
    KeyPair::generate().map_err(|source| CertError::Generate {
        what: format!("generate the key for {names:?}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    use tokio_rustls::rustls::client::WebPkiServerVerifier;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{crypto::ring, Error as TlsError, RootCertStore};

    fn der(pem: &str) -> CertificateDer<'static> {
        let mut reader = pem.as_bytes();
        let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
            .collect::<Result<_, _>>()
            .expect("PEM parses");
        assert_eq!(certs.len(), 1, "exactly one certificate in {pem}");
        certs.into_iter().next().expect("one certificate")
    }

    fn verifier_rooted_at(ca_pem: &str) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        roots
            .add(der(ca_pem))
            .expect("CA certificate is a usable root");
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(ring::default_provider()),
        )
        .build()
        .expect("verifier builds")
    }

    fn verify(verifier: &WebPkiServerVerifier, leaf_pem: &str, name: &str) -> Result<(), TlsError> {
        let server_name = ServerName::try_from(name.to_owned()).expect("valid server name");
        verifier
            .verify_server_cert(&der(leaf_pem), &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn leaf_issued_by_ca_verifies_for_each_name() {
        let ca = TestCa::new("scim-connect test CA").unwrap();
        let leaf = ca.issue(&["localhost", "127.0.0.1", "::1"]).unwrap();
        let verifier = verifier_rooted_at(&ca.cert_pem());
        for name in ["localhost", "127.0.0.1", "::1"] {
            verify(&verifier, &leaf.cert, name)
                .unwrap_or_else(|e| panic!("leaf should verify for {name}: {e}"));
        }
    }

    #[test]
    fn leaf_is_rejected_for_a_name_it_does_not_carry() {
        let ca = TestCa::new("scim-connect test CA").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let verifier = verifier_rooted_at(&ca.cert_pem());
        let err = verify(&verifier, &leaf.cert, "example.test").unwrap_err();
        assert!(
            matches!(err, TlsError::InvalidCertificate(_)),
            "unexpected error {err:?}"
        );
        assert!(verify(&verifier, &leaf.cert, "127.0.0.1").is_err());
    }

    #[test]
    fn self_signed_leaf_does_not_verify() {
        let ca = TestCa::new("scim-connect test CA").unwrap();
        let verifier = verifier_rooted_at(&ca.cert_pem());
        let own = self_signed(&["localhost", "127.0.0.1"]).unwrap();
        let err = verify(&verifier, &own.cert, "localhost").unwrap_err();
        assert!(
            matches!(err, TlsError::InvalidCertificate(_)),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn leaf_from_another_ca_does_not_verify() {
        let trusted = TestCa::new("trusted").unwrap();
        let other = TestCa::new("other").unwrap();
        let leaf = other.issue(&["localhost"]).unwrap();
        assert!(verify(
            &verifier_rooted_at(&trusted.cert_pem()),
            &leaf.cert,
            "localhost"
        )
        .is_err());
    }

    #[test]
    fn key_matches_certificate_and_loads_into_rustls() {
        let ca = TestCa::new("ca").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let key = rustls_pemfile::private_key(&mut leaf.key.as_bytes())
            .expect("key PEM parses")
            .expect("one key");
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der(&leaf.cert)], key);
        assert!(
            config.is_ok(),
            "rustls refused the pair: {:?}",
            config.err()
        );
    }

    #[test]
    fn empty_and_bad_names_are_refused_with_the_value() {
        let ca = TestCa::new("ca").unwrap();
        assert!(matches!(ca.issue(&[]), Err(CertError::NoNames)));
        assert!(matches!(self_signed(&[]), Err(CertError::NoNames)));
        let err = ca.issue(&["localhost", "bad\u{e9}name"]).unwrap_err();
        assert!(err.to_string().contains("bad\u{e9}name"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let pem = self_signed(&["localhost"]).unwrap();
        let shown = format!("{pem:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("CERTIFICATE"));
    }

    #[test]
    fn write_pem_files_writes_both_and_restricts_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let pem = self_signed(&["localhost"]).unwrap();
        let target = dir.path().join("nested");
        // An older, world-readable key file must be narrowed, not kept as it was.
        fs::create_dir_all(&target).unwrap();
        fs::write(target.join("server.key"), "old").unwrap();
        let (cert, key) = write_pem_files(&target, "server", &pem).unwrap();
        assert_eq!(cert, target.join("server.crt"));
        assert_eq!(key, target.join("server.key"));
        assert_eq!(fs::read_to_string(&cert).unwrap(), pem.cert);
        assert_eq!(fs::read_to_string(&key).unwrap(), pem.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "key mode is {mode:o}");
        }
    }
}
