//! TLS of the MySQL backend: the MySQL client's `ssl-mode`, `ssl-ca`, `ssl-cert` and
//! `ssl-key` options, over mysql_async's rustls (ring).
//!
//! | `ssl-mode` | TLS | certificate checked |
//! |---|---|---|
//! | `DISABLED` | never | — |
//! | `PREFERRED` (the default, as in the MySQL client) | if the server offers it | no |
//! | `REQUIRED` | always | no (`ssl-ca` is refused: use `VERIFY_IDENTITY`) |
//! | `VERIFY_CA` | refused: use `VERIFY_IDENTITY` | — |
//! | `VERIFY_IDENTITY` | always | its chain, against `ssl-ca` (else the Mozilla roots), and that it names the host connected to |
//!
//! `VERIFY_CA` (the chain without the name) is refused: mysql_async 0.37's way to skip
//! the name check compares rustls's message with a text that rustls 0.23 no longer
//! writes, so it would fail every certificate whose names differ from the host, and it
//! offers no other way to plug in a verifier. A URL error says so instead.

use crate::backends::sql_url;
use mysql_async::{ClientIdentity, SslOpts};

/// The TLS options of a MySQL URL, which the client library does not take itself.
pub(crate) const OPTIONS: &[&str] = &["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key"];

/// mysql_async's own TLS options, which `ssl-mode` replaces.
pub(crate) const REPLACED: &[&str] = &[
    "require_ssl",
    "verify_ca",
    "verify_identity",
    "built_in_roots",
];

/// The MySQL client's `ssl-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MysqlSslMode {
    /// No TLS.
    Disabled,
    /// TLS if the server offers it, without checking its certificate.
    Preferred,
    /// TLS always, without checking the certificate.
    Required,
    /// TLS always, with a certificate signed by a trusted CA (refused, see the module).
    VerifyCa,
    /// TLS always, with a certificate signed by a trusted CA that names the host.
    VerifyIdentity,
}

impl MysqlSslMode {
    fn parse(text: &str) -> Option<MysqlSslMode> {
        Some(match text.to_ascii_uppercase().as_str() {
            "DISABLED" => MysqlSslMode::Disabled,
            "PREFERRED" => MysqlSslMode::Preferred,
            "REQUIRED" => MysqlSslMode::Required,
            "VERIFY_CA" => MysqlSslMode::VerifyCa,
            "VERIFY_IDENTITY" => MysqlSslMode::VerifyIdentity,
            _ => return None,
        })
    }

    /// The mode's name in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            MysqlSslMode::Disabled => "DISABLED",
            MysqlSslMode::Preferred => "PREFERRED",
            MysqlSslMode::Required => "REQUIRED",
            MysqlSslMode::VerifyCa => "VERIFY_CA",
            MysqlSslMode::VerifyIdentity => "VERIFY_IDENTITY",
        }
    }
}

/// The mode and the client library's TLS options (`None`: no TLS) of a URL's options
/// (`option` gives an option's value); the reason of a bad one is the error.
pub(crate) fn from_options(
    option: impl Fn(&str) -> Option<String>,
) -> std::result::Result<(MysqlSslMode, Option<SslOpts>), String> {
    if let Some(old) = REPLACED.iter().find(|name| option(name).is_some()) {
        return Err(format!(
            "option {old} is not taken; use ssl-mode=DISABLED|PREFERRED|REQUIRED|VERIFY_CA|VERIFY_IDENTITY (and ssl-ca=PATH)"
        ));
    }
    let mode = match option("ssl-mode") {
        None => MysqlSslMode::Preferred,
        Some(text) => MysqlSslMode::parse(&text).ok_or_else(|| {
            format!("unknown ssl-mode {text:?}; expected ssl-mode=DISABLED, PREFERRED (the default), REQUIRED, VERIFY_CA or VERIFY_IDENTITY")
        })?,
    };
    let ca = option("ssl-ca");
    let (cert, key) = (option("ssl-cert"), option("ssl-key"));
    if mode == MysqlSslMode::VerifyCa {
        return Err("ssl-mode=VERIFY_CA is not available on mysql:// (the client library cannot check a certificate's chain without its host name); use ssl-mode=VERIFY_IDENTITY with a host name the certificate names".to_owned());
    }
    if mode == MysqlSslMode::Required && ca.is_some() {
        return Err("ssl-ca with ssl-mode=REQUIRED would check the chain without the host name, which is not available on mysql://; use ssl-mode=VERIFY_IDENTITY, or REQUIRED without ssl-ca (no check)".to_owned());
    }
    if mode == MysqlSslMode::Disabled {
        if ca.is_some() || cert.is_some() || key.is_some() {
            return Err(
                "ssl-ca, ssl-cert and ssl-key need TLS, which ssl-mode=DISABLED turns off"
                    .to_owned(),
            );
        }
        return Ok((mode, None));
    }
    // The files are read now, so that a bad path is a URL error, not a failure of every
    // connection attempt.
    let mut opts = SslOpts::default();
    if let Some(path) = &ca {
        // Checked here (PEM certificates), handed over as read.
        sql_url::read_certs(path, "ssl-ca")?;
        let pem = std::fs::read(path).map_err(|err| format!("cannot read ssl-ca={path}: {err}"))?;
        opts = opts
            .with_root_certs(vec![pem.into()])
            .with_disable_built_in_roots(true);
    }
    // Only VERIFY_IDENTITY gets here with a check; the others check nothing.
    opts = opts.with_danger_accept_invalid_certs(mode != MysqlSslMode::VerifyIdentity);
    match (cert, key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            sql_url::read_certs(&cert, "ssl-cert")?;
            sql_url::read_key(&key, "ssl-key")?;
            opts = opts.with_client_identity(Some(ClientIdentity::new(
                std::path::PathBuf::from(cert).into(),
                std::path::PathBuf::from(key).into(),
            )));
        }
        _ => return Err("ssl-cert and ssl-key go together: give both or neither".to_owned()),
    }
    // mysql_async builds its rustls config on the process-wide provider; another part
    // of the program may have installed one already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok((mode, Some(opts)))
}
