//! TLS of the PostgreSQL backend: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! options over rustls (ring), through `tokio-postgres-rustls`.
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as in libpq) | if the server offers it | no |
//! | `require` | always | no; with `sslrootcert`, its chain (as `verify-ca`, as in libpq) |
//! | `verify-ca` | always | its chain, against `sslrootcert` (else the Mozilla roots) |
//! | `verify-full` | always | its chain, and that it names the host connected to |

use crate::backends::sql_url;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS options of a PostgreSQL URL, which the client library does not take itself.
pub(crate) const OPTIONS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without checking its certificate.
    Prefer,
    /// TLS always; the certificate is checked only if `sslrootcert` is given.
    Require,
    /// TLS always, with a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS always, with a certificate signed by a trusted CA that names the host.
    VerifyFull,
}

impl PgSslMode {
    fn parse(text: &str) -> Option<PgSslMode> {
        Some(match text {
            "disable" => PgSslMode::Disable,
            "prefer" => PgSslMode::Prefer,
            "require" => PgSslMode::Require,
            "verify-ca" => PgSslMode::VerifyCa,
            "verify-full" => PgSslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The mode's name in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            PgSslMode::Disable => "disable",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS side of a PostgreSQL backend: the mode, and the connector every connection
/// (the sessions, the shared one, the listener) is opened with.
#[derive(Clone)]
pub struct PgTls {
    mode: PgSslMode,
    connector: MakeRustlsConnect,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

impl PgTls {
    /// The `sslmode` in force.
    pub fn mode(&self) -> PgSslMode {
        self.mode
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether it must have it.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            PgSslMode::Disable => SslMode::Disable,
            PgSslMode::Prefer => SslMode::Prefer,
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector to open connections with (it is never used under `disable`).
    pub(crate) fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    /// Reads the TLS options of `url` (`option` gives an option's value); the reason of
    /// a bad one is the error.
    pub(crate) fn from_options(
        option: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<PgTls, String> {
        let mode = match option("sslmode") {
            None => PgSslMode::Prefer,
            Some(text) => PgSslMode::parse(&text).ok_or_else(|| {
                format!("unknown sslmode {text:?}; expected sslmode=disable, prefer (the default), require, verify-ca or verify-full")
            })?,
        };
        let root = option("sslrootcert");
        let (cert, key) = (option("sslcert"), option("sslkey"));
        if mode == PgSslMode::Disable && (root.is_some() || cert.is_some() || key.is_some()) {
            return Err(
                "sslrootcert, sslcert and sslkey need TLS, which sslmode=disable turns off"
                    .to_owned(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &root {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in sql_url::read_certs(path, "sslrootcert")? {
                    roots.add(cert).map_err(|err| {
                        format!("sslrootcert={path}: a bad CA certificate: {err}")
                    })?;
                }
                roots
            }
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let check = match mode {
            PgSslMode::Disable | PgSslMode::Prefer => Check::Nothing,
            PgSslMode::Require if root.is_none() => Check::Nothing,
            PgSslMode::Require | PgSslMode::VerifyCa => Check::Chain,
            PgSslMode::VerifyFull => Check::ChainAndName,
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|err| format!("cannot use the CA certificates: {err}"))?;
        let verifier = Arc::new(Verifier {
            check,
            webpki,
            provider: provider.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("cannot set up TLS: {err}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (cert, key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    sql_url::read_certs(&cert, "sslcert")?,
                    sql_url::read_key(&key, "sslkey")?,
                )
                .map_err(|err| format!("sslcert={cert} and sslkey={key} do not fit: {err}"))?,
            _ => return Err("sslcert and sslkey go together: give both or neither".to_owned()),
        };
        Ok(PgTls {
            mode,
            connector: MakeRustlsConnect::new(config),
        })
    }
}

/// What the verifier checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing (`prefer`, `require` without a CA file): encryption without authentication.
    Nothing,
    /// The chain up to a trusted CA, not the name (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check == Check::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name last, after the chain: a name error means the chain
            // verified.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
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

    fn parse(query: &[(&str, &str)]) -> std::result::Result<PgTls, String> {
        PgTls::from_options(|name| {
            query
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn modes_and_their_errors() {
        assert_eq!(parse(&[]).unwrap().mode(), PgSslMode::Prefer);
        assert_eq!(parse(&[]).unwrap().ssl_mode(), SslMode::Prefer);
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::Require),
            ("verify-full", SslMode::Require),
        ] {
            let tls = parse(&[("sslmode", text)]).unwrap();
            assert_eq!(tls.mode().as_str(), text);
            assert_eq!(tls.ssl_mode(), mode);
        }
        let err = parse(&[("sslmode", "verify_full")]).unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        let err = parse(&[("sslmode", "disable"), ("sslrootcert", "/x")]).unwrap_err();
        assert!(err.contains("sslmode=disable"), "{err}");
        let err = parse(&[("sslcert", "/x")]).unwrap_err();
        assert!(err.contains("give both"), "{err}");
        let err = parse(&[
            ("sslmode", "verify-full"),
            ("sslrootcert", "/no/such/ca.pem"),
        ])
        .unwrap_err();
        assert!(
            err.contains("cannot read sslrootcert=/no/such/ca.pem"),
            "{err}"
        );
    }
}
