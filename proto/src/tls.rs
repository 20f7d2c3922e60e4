//! TLS for the one port (rustls, with ring): loading certificates and keys from PEM files, the
//! server and client configurations, and a small CA for `ferrovol up` and tests (rcgen).
//!
//! The server presents a certificate; with a client CA it also requires and verifies a client
//! certificate (mTLS). Clients verify the server against a CA and may present a certificate.
//! Identity stays the HELLO credential's (see PROTOCOL.md, "Identity"); TLS adds confidentiality,
//! integrity and server authentication on the wire.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A TLS setting that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read certificates from {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("bad certificate in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError(format!("cannot read a private key from {}: {e}", path.display())))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError(format!("bad CA certificate in {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The server's side: its certificate chain and key, and optionally the CA whose client
/// certificates it requires.
pub fn server_config(
    cert: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs(cert)?, key(key_file)?).map_err(|e| {
        TlsError(format!("certificate {} with key {}: {e}", cert.display(), key_file.display()))
    })?;
    Ok(Arc::new(config))
}

/// The client's side: the CA that signed the server's certificate, and optionally a client
/// certificate and key (for a server that requires them).
pub fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let config = match client {
        Some((cert, key_file)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_file)?)
            .map_err(|e| TlsError(format!("client certificate {}: {e}", cert.display())))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: the host part of `host:port`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError(format!("{host:?} is not a TLS server name: {e}")))
}

/// PEM files made by [`generate`].
#[derive(Debug, Clone)]
pub struct Generated {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Makes a CA, a server certificate for `names` (DNS names or IP addresses) and a client certificate
/// for `client`, all signed by that CA, as PEM files in `dir` (keys mode 0600). For `ferrovol up`
/// and tests; a deployment brings its own (cert-manager, say).
pub fn generate(dir: &Path, names: &[&str], client: &str) -> Result<Generated, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| TlsError(format!("cannot make certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "ferrovol CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(names).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) =
        leaf(names.iter().map(|s| (*s).to_owned()).collect(), names.first().copied().unwrap_or("ferrovol"))?;
    let (client_cert, client_key) = leaf(vec![client.to_owned()], client)?;
    std::fs::create_dir_all(dir).map_err(|e| TlsError(format!("{}: {e}", dir.display())))?;
    let write = |name: &str, pem: &str, private: bool| -> Result<PathBuf, TlsError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mode = if private { 0o600 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(pem.as_bytes()).map(|()| f))
            .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        f.flush().map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        Ok(path)
    };
    Ok(Generated {
        ca: write("ca.pem", &ca.pem(), false)?,
        server_cert: write("server.pem", &server_cert, false)?,
        server_key: write("server-key.pem", &server_key, true)?,
        client_cert: write("client.pem", &client_cert, false)?,
        client_key: write("client-key.pem", &client_key, true)?,
    })
}

pub use rustls::pki_types::ServerName as TlsServerName;
pub use rustls::{ClientConfig, ServerConfig};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of every TLS connection (a handshake record): how a server that requires TLS
/// tells a plaintext ferrovol client (whose frames start with `F`) from a TLS one.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
