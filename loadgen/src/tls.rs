//! The TLS client of `--transport tls|wss`: rustls (ring, TLS 1.2 and 1.3) trusting exactly the
//! certificates of `--ca`, verifying the broker under `--server-name`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// A client configuration trusting the PEM certificates in `ca`, and the broker's name.
///
/// # Errors
///
/// The file cannot be read, holds no certificate or an unusable one, or `server_name` is not
/// a DNS name or an IP address.
pub fn client_config(
    ca: &Path,
    server_name: &str,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), String> {
    let pem = std::fs::read(ca).map_err(|e| format!("cannot read --ca {}: {e}", ca.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--ca {}: not PEM certificates: {e}", ca.display()))?;
    if certs.is_empty() {
        return Err(format!("--ca {}: no certificate in it", ca.display()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("--ca {}: not a usable certificate: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("--server-name {server_name:?}: {e}"))?;
    Ok((Arc::new(config), name))
}
