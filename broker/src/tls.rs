//! The node's TLS certificate: loaded from PEM files, reloadable while the node runs.
//!
//! [`Certificate`] holds the rustls [`ServerConfig`] built from `tls.cert_path` and
//! `tls.key_path` behind a lock that the shards take only at accept, to clone an `Arc`: a new
//! connection's handshake uses the certificate in force when it was accepted, and a connection
//! keeps the configuration it started with (its own `Arc`) until it ends. [`Certificate::reload`]
//! reads the files again and swaps the configuration in only if they load: a failed reload keeps
//! the old certificate. The TLS byte stream itself (handshake, records, close_notify) lives in
//! the driver (`node/stream.rs`); the sans-IO core sees only plaintext.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config;

/// Why a certificate could not be loaded (at start, or by a reload).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// TLS is off: no `listen.tls` or `listen.wss`.
    #[error("TLS is off (neither listen.tls nor listen.wss is set)")]
    NotEnabled,
    /// `tls.cert_path` or `tls.key_path` is not set.
    #[error("{0} must be set when listen.tls or listen.wss is on")]
    Missing(&'static str),
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (`certificate file`, `key file`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be (or holds none of what it should).
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate and key (e.g. the key does not match the certificate).
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Rejected(#[from] rustls::Error),
}

/// The node's certificate and key as a rustls server configuration, swapped on reload.
#[derive(Debug)]
pub(crate) struct Certificate {
    /// The PEM certificate chain (end-entity first).
    cert_path: PathBuf,
    /// The PEM private key.
    key_path: PathBuf,
    /// The configuration new connections use.
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificate {
    /// Loads the certificate of `tls` (both paths must be set).
    pub(crate) fn load(tls: &config::Tls) -> Result<Certificate, TlsError> {
        let cert_path = tls
            .cert_path
            .clone()
            .ok_or(TlsError::Missing("tls.cert_path"))?;
        let key_path = tls
            .key_path
            .clone()
            .ok_or(TlsError::Missing("tls.key_path"))?;
        let config = server_config(&cert_path, &key_path)?;
        Ok(Certificate {
            cert_path,
            key_path,
            current: RwLock::new(config),
        })
    }

    /// The configuration for a connection accepted now.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            // A writer panicked mid-swap: the value is still a whole `Arc`.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Reads the files again; new connections use them from now on, connections already open
    /// keep theirs. On error nothing changes.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert_path, &self.key_path)?;
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }
}

/// Builds the server configuration from the PEM files: TLS 1.2 and 1.3 with rustls's safe
/// defaults and the ring provider, no client certificates.
fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let pem_error = |path: &Path, message: String| TlsError::Pem {
        path: path.to_owned(),
        message,
    };
    let cert_pem = read("certificate file", cert_path)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            cert_path,
            "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key_pem = read("key file", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        pem_error(
            key_path,
            format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn tls(cert: &Path, key: &Path) -> config::Tls {
        config::Tls {
            cert_path: Some(cert.to_owned()),
            key_path: Some(key.to_owned()),
            ..config::Tls::default()
        }
    }

    #[test]
    fn loads_a_pem_pair_and_reload_swaps_only_on_success() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = write_pair(dir.path(), "a");
        let loaded = Certificate::load(&tls(&cert, &key)).expect("loads");
        let before = loaded.current();
        // A broken file: the reload fails, the old configuration stays.
        std::fs::write(&cert, "not pem").expect("write");
        assert!(matches!(loaded.reload(), Err(TlsError::Pem { .. })));
        assert!(Arc::ptr_eq(&before, &loaded.current()));
        // A new pair: swapped.
        let (c2, k2) = write_pair(dir.path(), "b");
        std::fs::copy(&c2, &cert).expect("copy");
        std::fs::copy(&k2, &key).expect("copy");
        loaded.reload().expect("reloads");
        assert!(!Arc::ptr_eq(&before, &loaded.current()));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = write_pair(dir.path(), "a");
        let missing = dir.path().join("nope.pem");
        let e = Certificate::load(&tls(&missing, &key)).expect_err("missing");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let e = Certificate::load(&config::Tls::default()).expect_err("unset");
        assert!(e.to_string().contains("tls.cert_path"), "{e}");
        // A key that does not match the certificate.
        let (_, other_key) = write_pair(dir.path(), "b");
        let e = Certificate::load(&tls(&cert, &other_key)).expect_err("mismatch");
        assert!(matches!(e, TlsError::Rejected(_)), "{e}");
        // The key where the certificate should be.
        let e = Certificate::load(&tls(&key, &key)).expect_err("no cert");
        assert!(e.to_string().contains("no certificate"), "{e}");
    }
}
