//! A certificate authority of the test kit (rcgen, nothing from outside): it signs the
//! certificates of the private TLS servers and of their clients. Its files live in a
//! temporary directory removed when the test process exits.

use crate::process::temp_dir_until_exit;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A test CA: its certificate in a PEM file, and its key to sign with.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    ca_file: PathBuf,
}

/// A certificate issued by a [`TestCa`], and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_file: PathBuf,
    /// Its private key (mode 0600).
    pub key_file: PathBuf,
}

impl TestCa {
    /// A new CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> TestCa {
        let dir = temp_dir_until_exit("dlock-ca-").to_path_buf();
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("the CA certificate");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("cannot write the CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            dir,
            ca_file,
        }
    }

    /// The CA's certificate (PEM), for `sslrootcert=` / `ssl-ca=`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A certificate for `common_name`, valid for the host `names` (DNS names, or IP
    /// addresses such as `127.0.0.1`), for servers and clients alike; its files are
    /// `<stem>.pem` and `<stem>.key` beside the CA's.
    pub fn issue(&self, stem: &str, common_name: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a signed certificate");
        let issued = Issued {
            cert_file: self.dir.join(format!("{stem}.pem")),
            key_file: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&issued.cert_file, cert.pem()).expect("cannot write a certificate");
        write_private(&issued.key_file, &key.serialize_pem());
        issued
    }
}

/// Writes `text` to `path`, readable by its owner only (servers insist on that for keys).
pub(crate) fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
        .expect("cannot write a private key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("cannot set a key's mode");
}
