//! The HS256 token secret: taken from the configuration, read from its file, or generated once.
//!
//! [`load_or_generate`] looks, in order, at
//! 1. `auth.secret` in the configuration (its UTF-8 bytes, as given);
//! 2. the secret file ([`Config::secret_path`], default `<data_dir>/secret`): its contents with
//!    surrounding whitespace trimmed;
//! 3. nothing there: it generates 32 random bytes, writes them hex-encoded (64 characters and a
//!    newline) to the secret file with mode 0600, creating its directory if needed, and uses that.
//!
//! The secret is always the *text* of the file (trimmed), never its hex-decoded bytes, so any tool
//! can mint tokens from the file as it reads. The file is written atomically: a temporary file in
//! the same directory is filled, synced and then linked into place, which fails if another
//! process created the secret meanwhile; the winner's secret is then read and used, so two
//! processes starting on an empty data dir agree on one secret.
//!
//! Nothing here prints or logs the secret, and no error carries it.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Number of random bytes in a generated secret (hex-encoded, so the file holds twice as many
/// characters).
pub const GENERATED_SECRET_BYTES: usize = 32;

/// Shortest secret accepted, in bytes: an HS256 key shorter than the hash is guessable offline
/// from any one token (RFC 7518 3.2 asks for at least 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Where the secret came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// `auth.secret` of the configuration (file, environment or `--set`).
    Config,
    /// The existing secret file at this path.
    File(PathBuf),
    /// A new secret, generated and written to this path.
    Generated(PathBuf),
}

/// Why no secret could be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// `auth.secret` is set but empty.
    #[error("auth.secret is set but empty")]
    EmptyConfig,
    /// The secret file exists but holds nothing but whitespace.
    #[error("secret file {0} is empty (delete it to have a new secret generated)")]
    EmptyFile(PathBuf),
    /// The secret file exists but could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Read {
        /// The secret file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A new secret could not be written.
    #[error("cannot write a new secret to {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The secret is shorter than [`MIN_SECRET_BYTES`].
    #[error(
        "the token secret from {from} is {len} bytes; at least {MIN_SECRET_BYTES} are required \
         (delete the secret file to have one generated, or set a longer auth.secret)"
    )]
    TooShort {
        /// Where it came from (`auth.secret` or the file).
        from: String,
        /// Its length.
        len: usize,
    },
    /// The operating system's random number generator failed.
    #[error("cannot generate a secret: the system random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// Returns the token secret and where it came from: `config.auth.secret` if set, else the secret
/// file's trimmed contents, else a newly generated secret written to the secret file (see the
/// [module documentation](self)).
///
/// # Errors
///
/// An empty `auth.secret` or secret file, a secret file that exists but cannot be read, a new
/// secret that cannot be written, or a failing random number generator. An unreadable file is
/// never replaced by a new secret.
pub fn load_or_generate(config: &Config) -> Result<(Vec<u8>, SecretSource), SecretError> {
    if let Some(secret) = &config.auth.secret {
        let bytes = secret.expose().as_bytes();
        if bytes.is_empty() {
            return Err(SecretError::EmptyConfig);
        }
        long_enough(bytes, "auth.secret")?;
        return Ok((bytes.to_vec(), SecretSource::Config));
    }
    let path = config.secret_path();
    if let Some(secret) = read_secret_file(&path)? {
        long_enough(&secret, &path.display().to_string())?;
        return Ok((secret, SecretSource::File(path)));
    }
    let text = generate_hex()?;
    match write_new(&path, &text)? {
        Written::Created => Ok((text.into_bytes(), SecretSource::Generated(path))),
        Written::AlreadyExisted => match read_secret_file(&path)? {
            Some(secret) => Ok((secret, SecretSource::File(path))),
            None => Err(SecretError::Read {
                path,
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "the secret file appeared and vanished again while it was being created",
                ),
            }),
        },
    }
}

/// Refuses a secret shorter than [`MIN_SECRET_BYTES`] (from `from`).
fn long_enough(secret: &[u8], from: &str) -> Result<(), SecretError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(SecretError::TooShort {
            from: from.to_owned(),
            len: secret.len(),
        });
    }
    Ok(())
}

/// The trimmed contents of the secret file, or `None` if it does not exist.
fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    match fs::read(path) {
        Ok(bytes) => {
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() {
                Err(SecretError::EmptyFile(path.to_owned()))
            } else {
                Ok(Some(trimmed.to_vec()))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SecretError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// [`GENERATED_SECRET_BYTES`] random bytes, hex-encoded.
fn generate_hex() -> Result<String, SecretError> {
    let mut raw = [0u8; GENERATED_SECRET_BYTES];
    getrandom::fill(&mut raw).map_err(SecretError::Random)?;
    Ok(hex(&raw))
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// What [`write_new`] did.
enum Written {
    /// The file was created with the new secret.
    Created,
    /// Another process created the file first; it was left alone.
    AlreadyExisted,
}

/// Creates `path` holding `text` and a newline, mode 0600, atomically and without replacing an
/// existing file. Creates the parent directory if needed.
fn write_new(path: &Path, text: &str) -> Result<Written, SecretError> {
    let write_err = |p: &Path| {
        let p = p.to_owned();
        move |source| SecretError::Write { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    let name = path
        .file_name()
        .map_or_else(|| "secret".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), unique()));
    let result = write_tmp(&tmp, text)
        .map_err(write_err(&tmp))
        .and_then(|()| link_into_place(&tmp, path).map_err(write_err(path)));
    // The temporary file is gone after a rename, and only a second name after a link.
    let _ = fs::remove_file(&tmp);
    let written = result?;
    if let Ok(d) = fs::File::open(&dir) {
        // Make the new directory entry durable; not every file system supports this.
        let _ = d.sync_all();
    }
    Ok(written)
}

/// Creates `tmp` (which must not exist) with mode 0600 and writes `text` and a newline to it.
fn write_tmp(tmp: &Path, text: &str) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(tmp)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Gives `tmp`'s file the name `path` unless `path` exists: a hard link (atomic and never
/// replacing), or a rename where the file system has no hard links.
fn link_into_place(tmp: &Path, path: &Path) -> io::Result<Written> {
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(Written::Created),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Written::AlreadyExisted),
        Err(_) if !path.exists() => fs::rename(tmp, path).map(|()| Written::Created),
        Err(_) => Ok(Written::AlreadyExisted),
    }
}

/// A value that differs between calls in one process (for temporary file names).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "parley-secret-{name}-{}-{}",
                std::process::id(),
                unique()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn config_in(dir: &Path) -> Config {
        Config {
            data_dir: dir.join("data"),
            ..Config::default()
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn config_secret_wins_over_the_file() {
        let tmp = TempDir::new("config");
        let mut config = config_in(&tmp.0);
        fs::create_dir_all(&config.data_dir).expect("mkdir");
        fs::write(
            config.secret_path(),
            "from-file-from-file-from-file-from-file",
        )
        .expect("write");
        config.auth.secret = Some(Secret::new(" from config, thirty-two bytes or more "));
        let (secret, source) = load_or_generate(&config).expect("secret");
        assert_eq!(
            secret, b" from config, thirty-two bytes or more ",
            "taken as given, not trimmed"
        );
        assert_eq!(source, SecretSource::Config);
    }

    #[test]
    fn empty_config_secret_is_an_error() {
        let tmp = TempDir::new("empty-config");
        let mut config = config_in(&tmp.0);
        config.auth.secret = Some(Secret::new(""));
        assert!(matches!(
            load_or_generate(&config),
            Err(SecretError::EmptyConfig)
        ));
        assert!(!config.data_dir.exists(), "nothing generated");
    }

    #[test]
    fn file_contents_are_trimmed_text_bytes() {
        let tmp = TempDir::new("file");
        let config = config_in(&tmp.0);
        fs::create_dir_all(&config.data_dir).expect("mkdir");
        fs::write(
            config.secret_path(),
            "  \tabc def ghi jkl mno pqr stu vwx yz0\r\n\n",
        )
        .expect("write");
        let (secret, source) = load_or_generate(&config).expect("secret");
        assert_eq!(secret, b"abc def ghi jkl mno pqr stu vwx yz0");
        assert_eq!(source, SecretSource::File(config.secret_path()));
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused() {
        let tmp = TempDir::new("short");
        let mut config = config_in(&tmp.0);
        config.auth.secret = Some(Secret::new("x"));
        let e = load_or_generate(&config).expect_err("a 1-byte secret");
        assert!(matches!(e, SecretError::TooShort { len: 1, .. }), "{e}");
        assert!(e.to_string().contains("32"), "{e}");
        config.auth.secret = None;
        fs::create_dir_all(&config.data_dir).expect("mkdir");
        fs::write(config.secret_path(), "31-bytes-31-bytes-31-bytes-31-b\n").expect("write");
        assert!(matches!(
            load_or_generate(&config),
            Err(SecretError::TooShort { len: 31, .. })
        ));
    }

    #[test]
    fn whitespace_only_file_is_an_error_and_is_not_replaced() {
        let tmp = TempDir::new("empty-file");
        let config = config_in(&tmp.0);
        fs::create_dir_all(&config.data_dir).expect("mkdir");
        fs::write(config.secret_path(), " \n").expect("write");
        let err = load_or_generate(&config).expect_err("empty file");
        assert!(matches!(err, SecretError::EmptyFile(_)), "{err}");
        assert_eq!(
            fs::read(config.secret_path()).expect("read"),
            b" \n",
            "left alone"
        );
    }

    #[test]
    fn unreadable_secret_path_is_an_error_not_a_new_secret() {
        let tmp = TempDir::new("unreadable");
        let config = config_in(&tmp.0);
        // A directory where the file should be: reading fails with something other than
        // NotFound.
        fs::create_dir_all(config.secret_path()).expect("mkdir");
        let err = load_or_generate(&config).expect_err("cannot read");
        assert!(matches!(err, SecretError::Read { .. }), "{err}");
        assert!(config.secret_path().is_dir());
    }

    #[test]
    fn missing_file_is_generated_once_then_reused() {
        let tmp = TempDir::new("generate");
        let mut config = config_in(&tmp.0);
        config.data_dir = tmp.0.join("nested").join("data");
        let (secret, source) = load_or_generate(&config).expect("generated");
        let path = config.secret_path();
        assert_eq!(source, SecretSource::Generated(path.clone()));
        assert_eq!(secret.len(), 2 * GENERATED_SECRET_BYTES);
        assert!(
            secret
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        );
        let text = fs::read(&path).expect("file written");
        assert_eq!(
            text.trim_ascii(),
            &secret[..],
            "the secret is the file's text"
        );
        assert_eq!(entries(&config.data_dir), ["secret"], "no temporary left");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let (again, source) = load_or_generate(&config).expect("read back");
        assert_eq!(again, secret);
        assert_eq!(source, SecretSource::File(path));
    }

    #[test]
    fn generated_secrets_differ() {
        let a = TempDir::new("differ-a");
        let b = TempDir::new("differ-b");
        let (sa, _) = load_or_generate(&config_in(&a.0)).expect("a");
        let (sb, _) = load_or_generate(&config_in(&b.0)).expect("b");
        assert_ne!(sa, sb);
    }

    #[test]
    fn configured_secret_file_is_used_and_created() {
        let tmp = TempDir::new("secret-file");
        let mut config = config_in(&tmp.0);
        let path = tmp.0.join("keys").join("parley.key");
        config.auth.secret_file = Some(path.clone());
        let (secret, source) = load_or_generate(&config).expect("generated");
        assert_eq!(source, SecretSource::Generated(path.clone()));
        assert_eq!(fs::read(&path).expect("read").trim_ascii(), &secret[..]);
        assert!(!config.data_dir.exists(), "data dir not involved");
    }

    #[test]
    fn existing_file_is_never_overwritten_by_a_racing_generator() {
        let tmp = TempDir::new("race");
        let path = tmp.0.join("secret");
        fs::write(&path, "first\n").expect("write");
        assert!(matches!(
            write_new(&path, "second").expect("no error"),
            Written::AlreadyExisted
        ));
        assert_eq!(fs::read(&path).expect("read"), b"first\n");
        assert_eq!(entries(&tmp.0), ["secret"], "no temporary left");
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_secret() {
        let tmp = TempDir::new("concurrent");
        let config = config_in(&tmp.0);
        let secrets: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_generate(&config).expect("secret").0))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(secrets.windows(2).all(|w| w[0] == w[1]), "one secret");
        assert_eq!(
            fs::read(config.secret_path()).expect("read").trim_ascii(),
            &secrets[0][..]
        );
        assert_eq!(entries(&config.data_dir), ["secret"]);
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
