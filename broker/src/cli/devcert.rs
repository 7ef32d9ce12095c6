//! `broker devcert`: a self-signed certificate and key for trying TLS locally.
//!
//! The certificate names `localhost`, `127.0.0.1` and `::1`, so clients on this machine can
//! verify it once they trust it (it is its own root: add `cert.pem` to the client's trusted
//! roots). It is for development only: browsers and other machines will not trust it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::CliError;

/// The names the development certificate is valid for.
const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The certificate's file name in `--out`.
const CERT_FILE: &str = "cert.pem";

/// The key's file name in `--out`.
const KEY_FILE: &str = "key.pem";

/// Flags of `broker devcert`.
#[derive(Debug, Args)]
pub(super) struct DevcertArgs {
    /// The directory to write `cert.pem` and `key.pem` into (created if missing; existing files
    /// are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// A fresh self-signed certificate for [`NAMES`], as (certificate PEM, key PEM).
fn generate() -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    Ok((certified.cert.pem(), certified.signing_key.serialize_pem()))
}

/// Writes the key readable by its owner only.
fn write_key(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(pem.as_bytes())
}

/// Runs `broker devcert`.
pub(super) fn run(args: DevcertArgs) -> Result<ExitCode, CliError> {
    let (cert, key) =
        generate().map_err(|e| CliError::new(format!("cannot generate a certificate: {e}")))?;
    let fail = |path: &Path, e: std::io::Error| {
        CliError::new(format!("cannot write {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&args.out).map_err(|e| fail(&args.out, e))?;
    let cert_path = args.out.join(CERT_FILE);
    let key_path = args.out.join(KEY_FILE);
    std::fs::write(&cert_path, cert).map_err(|e| fail(&cert_path, e))?;
    write_key(&key_path, &key).map_err(|e| fail(&key_path, e))?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let (cert_path, key_path) = (absolute(&cert_path), absolute(&key_path));
    println!("certificate: {}", cert_path.display());
    println!("key:         {}", key_path.display());
    println!(
        "valid for:   {} (self-signed, for development only)",
        NAMES.join(", ")
    );
    println!();
    println!("serve TLS with it:");
    println!(
        "  broker serve --set listen.tls=127.0.0.1:7443 --set listen.wss=127.0.0.1:7444 \\\n    \
         --set tls.cert_path={} --set tls.key_path={}",
        cert_path.display(),
        key_path.display()
    );
    println!("and have clients trust {} as a root.", cert_path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_pair_the_broker_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("certs");
        run(DevcertArgs { out: out.clone() }).expect("runs");
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(out.join(CERT_FILE))
            .expect("opens")
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM certificates");
        assert_eq!(certs.len(), 1);
        PrivateKeyDer::from_pem_file(out.join(KEY_FILE)).expect("a PEM key");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(out.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
    }
}
