//! TLS toward targets: which trust anchors, which server name, and what a failed handshake
//! means in words an administrator can act on.
//!
//! This module owns the rustls client configurations of one target (one verifying, one not,
//! each built once) and the certificate verifiers behind them. It must never hand out the
//! non-verifying configuration by itself: the caller decides, from the local declaration *and*
//! the request, and only [`TlsConfigs::insecure`] returns it.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::OnceCell;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};

/// Why a target's TLS settings cannot be used at all (found when its dialer starts).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(
        "target `{target}`: extra root certificate #{index} is not a usable trust anchor \
         ({detail}); check that the PEM file holds a CA certificate"
    )]
    BadExtraRoot {
        target: String,
        index: usize,
        detail: String,
    },
    #[error("target `{target}`: cannot build the TLS client configuration: {detail}")]
    Config { target: String, detail: String },
}

/// The system's trust anchors, read once per process (reading them touches the file system).
static NATIVE_ROOTS: OnceCell<Arc<Vec<CertificateDer<'static>>>> = OnceCell::const_new();

async fn native_roots() -> Arc<Vec<CertificateDer<'static>>> {
    NATIVE_ROOTS
        .get_or_init(|| async {
            let loaded = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
                .await
                .map(|result| {
                    if let Some(first) = result.errors.first() {
                        tracing::warn!(
                            errors = result.errors.len(),
                            first_error = %first,
                            "some system trust anchors could not be read"
                        );
                    }
                    result.certs
                })
                .unwrap_or_default();
            tracing::debug!(count = loaded.len(), "loaded system trust anchors");
            Arc::new(loaded)
        })
        .await
        .clone()
}

/// The crypto provider used for every target connection (ring, as built).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client configurations of one target, each built at most once.
pub struct TlsConfigs {
    target: String,
    provider: Arc<CryptoProvider>,
    extra_roots: Vec<CertificateDer<'static>>,
    verified: OnceCell<Arc<ClientConfig>>,
    insecure: Arc<ClientConfig>,
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("target", &self.target)
            .field("extra_roots", &self.extra_roots.len())
            .finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// Checks the target's extra roots and prepares its configurations. The verifying one is
    /// completed on first use, when the system roots are read.
    pub fn new(
        target: &str,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsSetupError> {
        let mut probe = RootCertStore::empty();
        for (index, root) in extra_roots.iter().enumerate() {
            probe
                .add(root.clone())
                .map_err(|e| TlsSetupError::BadExtraRoot {
                    target: target.to_owned(),
                    index: index + 1,
                    detail: e.to_string(),
                })?;
        }
        let provider = provider();
        let insecure = client_config(
            provider.clone(),
            Arc::new(AcceptAnyCertificate {
                provider: provider.clone(),
            }),
        )
        .map_err(|e| TlsSetupError::Config {
            target: target.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(TlsConfigs {
            target: target.to_owned(),
            provider,
            extra_roots,
            verified: OnceCell::new(),
            insecure,
        })
    }

    /// The configuration that verifies certificates against the system roots plus the target's
    /// extra roots.
    pub async fn verified(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        self.verified
            .get_or_try_init(|| async {
                let mut roots = RootCertStore::empty();
                let (added, ignored) =
                    roots.add_parsable_certificates(native_roots().await.iter().cloned());
                for root in &self.extra_roots {
                    roots.add(root.clone())?;
                }
                tracing::debug!(
                    target_name = %self.target,
                    system_roots = added,
                    unusable_system_roots = ignored,
                    extra_roots = self.extra_roots.len(),
                    "built verifying TLS configuration"
                );
                let inner = if roots.is_empty() {
                    None
                } else {
                    Some(
                        WebPkiServerVerifier::builder_with_provider(
                            Arc::new(roots),
                            self.provider.clone(),
                        )
                        .build()
                        .map_err(|e| rustls::Error::General(e.to_string()))?,
                    )
                };
                client_config(
                    self.provider.clone(),
                    Arc::new(DiagnosingVerifier {
                        inner,
                        provider: self.provider.clone(),
                    }),
                )
            })
            .await
            .cloned()
    }

    /// The configuration that accepts any certificate. Only for requests where the hub asked to
    /// skip checks and the target was declared with `insecure_allow_skip_tls_check`.
    pub fn insecure(&self) -> Arc<ClientConfig> {
        self.insecure.clone()
    }
}

fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Marker carried inside a certificate error when the rejected certificate signed itself.
#[derive(Debug)]
struct SelfSigned;

impl fmt::Display for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("self-signed certificate")
    }
}

impl StdError for SelfSigned {}

/// WebPKI verification that tells a self-signed certificate apart from one signed by an unknown
/// CA, so the administrator is told which fix applies.
#[derive(Debug)]
struct DiagnosingVerifier {
    /// `None` when there is no trust anchor at all: every certificate is then of unknown issuer.
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl DiagnosingVerifier {
    /// True when `end_entity` verifies with itself as the only trust anchor, i.e. it signed
    /// itself. Name and validity problems do not matter for that question.
    fn is_self_signed(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        let mut roots = RootCertStore::empty();
        if roots.add(end_entity.clone().into_owned()).is_err() {
            return false;
        }
        let Ok(verifier) =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
        else {
            return false;
        };
        match verifier.verify_server_cert(end_entity, &[], server_name, &[], now) {
            Ok(_) => true,
            Err(rustls::Error::InvalidCertificate(e)) => matches!(
                e,
                CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. }
                    | CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. }
            ),
            Err(_) => false,
        }
    }
}

impl ServerCertVerifier for DiagnosingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = match &self.inner {
            Some(inner) => {
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        };
        match result {
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
                if intermediates.is_empty()
                    && self.is_self_signed(end_entity, server_name, now) =>
            {
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(SelfSigned)),
                )))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// Accepts any certificate chain, but still checks that the peer holds the key of the
/// certificate it presented (handshake signatures), so the session keys are not forged.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// The TLS server name for a base-URL host: the port and IPv6 brackets are stripped, an IP
/// literal becomes [`ServerName::IpAddress`]. `None` when the host is neither a DNS name nor an
/// IP address.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']')?.0
    } else if host.parse::<IpAddr>().is_ok() {
        host
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_owned()).ok()
}

/// What the caller knows about certificate checks for the failed request, to name the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipContext {
    /// The hub did not ask to skip checks, and the target does not allow it either.
    NotRequested,
    /// The target allows skipping checks, but the hub did not ask for it.
    AllowedNotRequested,
    /// The hub asked, but the target was not declared with `-insecure-allow-skip-tls-check`.
    RequestedNotAllowed,
    /// Checks were skipped (so a failure is not about the certificate chain).
    Skipped,
}

/// One line describing a failed handshake with target `target`, naming the reason and the fix.
pub fn describe_handshake_error(err: &io::Error, target: &str, skip: SkipContext) -> String {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls_error) = rustls_error else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => format!(
                "the target closed the connection during the handshake ({err}); check that it \
                 serves TLS on this port, or declare target `{target}` with -no-tls"
            ),
            _ => format!("handshake interrupted: {err}"),
        };
    };
    let rustls::Error::InvalidCertificate(cert_error) = rustls_error else {
        return match rustls_error {
            rustls::Error::InvalidMessage(_) => format!(
                "the target does not speak TLS on this port ({rustls_error}); if it serves \
                 plain HTTP, declare target `{target}` with -no-tls"
            ),
            rustls::Error::AlertReceived(alert) => {
                format!("the target refused the handshake (TLS alert {alert:?})")
            }
            other => other.to_string(),
        };
    };
    let reason = match cert_error {
        CertificateError::Other(other) if other.0.downcast_ref::<SelfSigned>().is_some() => {
            "self-signed certificate: the target's certificate is not signed by a trusted CA"
                .to_owned()
        }
        CertificateError::UnknownIssuer => {
            "unknown issuer: the target's certificate is signed by a CA this agent does not trust"
                .to_owned()
        }
        CertificateError::NotValidForName => {
            return "certificate is not valid for the base URL's host; use a host name the \
                    certificate carries in the application's base URL, or have the certificate \
                    issued for that host"
                .to_owned()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let names: Vec<&str> = presented.iter().map(|p| bare_name(p)).collect();
            return format!(
                "certificate is not valid for host {:?} (it names {}); use one of those names \
                 in the application's base URL (the agent still connects to the target's \
                 address), or have the certificate issued for {:?}",
                expected.to_str(),
                names.join(", "),
                expected.to_str()
            );
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate has expired".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate is not valid yet (check the clocks)".to_owned()
        }
        CertificateError::Revoked => "certificate has been revoked".to_owned(),
        other => format!("certificate rejected: {other:?}"),
    };
    let fix = match skip {
        SkipContext::RequestedNotAllowed => format!(
            "the application asks to skip certificate checks, but target `{target}` was not \
             declared with -insecure-allow-skip-tls-check"
        ),
        SkipContext::AllowedNotRequested => format!(
            "target `{target}` allows skipping certificate checks, but the application does \
             not ask for it: enable skip_tls_check on the application, or trust its CA with \
             `ca = <PEM file>` on the target"
        ),
        SkipContext::NotRequested | SkipContext::Skipped => format!(
            "trust its CA with `ca = <PEM file>` on target `{target}` (connect set-target \
             -ca), or declare the target with -insecure-allow-skip-tls-check and enable \
             skip_tls_check on the application"
        ),
    };
    format!("{reason}; {fix}")
}

/// `DnsName("scim.test")` → `scim.test`: rustls reports presented names in their debug form.
fn bare_name(presented: &str) -> &str {
    match (presented.find('"'), presented.rfind('"')) {
        (Some(start), Some(end)) if end > start => &presented[start + 1..end],
        _ => presented,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_strips_port_and_brackets() {
        let dns = |s: &str| ServerName::try_from(s.to_owned()).unwrap();
        assert_eq!(
            server_name("scim.example.com"),
            Some(dns("scim.example.com"))
        );
        assert_eq!(
            server_name("scim.example.com:8443"),
            Some(dns("scim.example.com"))
        );
        let ip = |s: &str| Some(ServerName::IpAddress(s.parse::<IpAddr>().unwrap().into()));
        assert_eq!(server_name("127.0.0.1:443"), ip("127.0.0.1"));
        assert_eq!(server_name("127.0.0.1"), ip("127.0.0.1"));
        assert_eq!(server_name("[::1]:8443"), ip("::1"));
        assert_eq!(server_name("[::1]"), ip("::1"));
        assert_eq!(server_name("::1"), ip("::1"));
        assert_eq!(server_name("bad name:80"), None);
        assert_eq!(server_name("[::1"), None);
    }

    fn tls_error(e: CertificateError) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(e),
        )
    }

    #[test]
    fn each_skip_context_names_its_own_fix() {
        let unknown = || tls_error(CertificateError::UnknownIssuer);
        let m = describe_handshake_error(&unknown(), "crm", SkipContext::NotRequested);
        assert!(
            m.starts_with("unknown issuer") && m.contains("`ca = <PEM file>` on target `crm`"),
            "{m}"
        );
        assert!(
            m.contains("-insecure-allow-skip-tls-check and enable skip_tls_check"),
            "{m}"
        );
        let m = describe_handshake_error(&unknown(), "crm", SkipContext::AllowedNotRequested);
        assert!(
            m.contains("target `crm` allows skipping certificate checks, but the application does not ask for it"),
            "{m}"
        );
        let m = describe_handshake_error(&unknown(), "crm", SkipContext::RequestedNotAllowed);
        assert!(
            m.contains("the application asks to skip certificate checks, but target `crm` was not declared"),
            "{m}"
        );
    }

    #[test]
    fn a_name_mismatch_shows_plain_names_and_its_own_fix() {
        let e = tls_error(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("other.test").unwrap(),
            presented: vec![
                "DnsName(\"scim.test\")".into(),
                "IpAddress(127.0.0.1)".into(),
            ],
        });
        let m = describe_handshake_error(&e, "crm", SkipContext::NotRequested);
        assert!(
            m.starts_with(
                "certificate is not valid for host \"other.test\" (it names scim.test, IpAddress(127.0.0.1)); use one of those names in the application's base URL"
            ),
            "{m}"
        );
        assert!(!m.contains("DnsName"), "{m}");
    }

    #[test]
    fn bad_extra_root_is_named() {
        let err = TlsConfigs::new("app", vec![CertificateDer::from(vec![1, 2, 3])]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("target `app`") && text.contains("#1"),
            "{text}"
        );
    }
}
