//! Secrets: a string type that never prints, URL redaction, the master key, credential encryption
//! and hashed tokens (admin token, client keys).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A secret string. `Debug` and `Display` print `***`; only [`Secret::expose`] gives the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The plain value. Call it only where the secret is used, never to log or return it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Serialises as `***` so that a config dump can never leak a secret.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// `scheme://user:password@host/db` → `scheme://user:***@host/db`; other URLs unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Query parameters such as `?password=` are redacted wholesale.
    let (rest, query) = match rest.split_once('?') {
        Some((before, _)) => (before, "?***"),
        None => (rest, ""),
    };
    // The last `@` ends the user info even when an unescaped password holds `/` or `@`.
    let Some((userinfo, host_and_path)) = rest.rsplit_once('@') else {
        return format!("{scheme}://{rest}{query}");
    };
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => userinfo.to_string(),
    };
    format!("{scheme}://{user}@{host_and_path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://qg:hunter2@db:5432/quotagate"),
            "postgres://qg:***@db:5432/quotagate"
        );
        assert_eq!(redact_url("sqlite://data/q.db"), "sqlite://data/q.db");
        assert_eq!(
            redact_url("postgres://u:p@h/db?sslmode=require&password=x"),
            "postgres://u:***@h/db?***"
        );
        assert_eq!(
            redact_url("postgres://u:p/s@s@h/db"),
            "postgres://u:***@h/db"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The master key and credential encryption
// ---------------------------------------------------------------------------------------------

/// Length of an XChaCha20 nonce. Random nonces of this size never collide in practice, so no nonce
/// counter has to be stored.
const NONCE_LEN: usize = 24;

/// Name of the generated master key file inside `data_dir`.
pub const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("security.master_key: {0}")]
    MalformedKey(String),
    #[error("{path}: {problem}")]
    KeyFile { path: PathBuf, problem: String },
    #[error("credentials cannot be decrypted with this master key (was the key changed?)")]
    Decrypt,
}

/// The 32-byte key that seals account credentials at rest.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

/// Where the master key in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    Config,
    File(PathBuf),
    Generated(PathBuf),
}

impl MasterKey {
    /// Parses 32 bytes written as 64 hex digits or as base64 (standard or URL-safe, padded or not).
    pub fn parse(text: &str) -> Result<MasterKey, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|e| e.to_string())?
        } else {
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            engines
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .ok_or_else(|| "not valid hex or base64".to_string())?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "must be 32 bytes (64 hex digits or 44 base64 characters), got {} bytes",
                b.len()
            )
        })?;
        Ok(MasterKey(key))
    }

    pub fn generate() -> MasterKey {
        MasterKey(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// The configured key when there is one, else the one in `data_dir/master.key`, generated
    /// (mode 0600) on first use.
    pub fn load_or_generate(
        configured: &Secret,
        data_dir: &Path,
    ) -> Result<(MasterKey, KeyOrigin), SecretsError> {
        if !configured.is_empty() {
            let key = MasterKey::parse(configured.expose()).map_err(SecretsError::MalformedKey)?;
            return Ok((key, KeyOrigin::Config));
        }
        let path = data_dir.join(MASTER_KEY_FILE);
        let key_file_error = |problem: String| SecretsError::KeyFile {
            path: path.clone(),
            problem,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = MasterKey::parse(&text).map_err(key_file_error)?;
                Ok((key, KeyOrigin::File(path)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = MasterKey::generate();
                write_private_file(&path, &hex::encode(key.0)).map_err(key_file_error)?;
                Ok((key, KeyOrigin::Generated(path)))
            }
            Err(e) => Err(key_file_error(format!("cannot read: {e}"))),
        }
    }

    /// Seals `plaintext`; `context` (e.g. the account id) is bound to the ciphertext so a sealed
    /// value copied to another row does not open there.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(&self.0.into());
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let payload = Payload {
            msg: plaintext,
            aad: context,
        };
        let ciphertext = cipher
            .encrypt(&nonce, payload)
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, SecretsError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretsError::Decrypt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new(&self.0.into());
        let payload = Payload {
            msg: ciphertext,
            aad: context,
        };
        cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| SecretsError::Decrypt)
    }
}

/// Writes a file only its owner can read (0600 on Unix), creating its directory.
pub fn write_private_file(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot create: {e}"))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Tokens: client keys and the admin token
// ---------------------------------------------------------------------------------------------

/// A freshly generated bearer token: 32 random bytes, URL-safe base64, with a readable prefix.
/// Such tokens carry 256 bits of entropy, so a fast hash (SHA-256) is enough to store them: there
/// is nothing to brute-force, and a request never pays for a slow password hash.
pub fn generate_token(prefix: &str) -> Secret {
    let bytes: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Secret::new(format!("{prefix}{body}"))
}

/// The stored form of a token: lowercase hex SHA-256.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares a presented token with a stored hash in constant time.
pub fn token_matches(token: &str, stored_hash: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    hash_token(token)
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into()
}

/// `…a1b2`: the only part of a credential that is ever shown.
pub fn mask(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if secret.chars().count() <= 8 {
        "…".to_string()
    } else {
        format!("…{tail}")
    }
}

#[cfg(test)]
mod crypto_tests {
    use super::*;

    #[test]
    fn sealed_credentials_open_only_with_the_same_key_and_context() {
        let key = MasterKey::generate();
        let sealed = key.seal(b"sk-secret", b"account-1");
        assert!(!sealed.windows(9).any(|w| w == b"sk-secret"));
        assert_eq!(key.open(&sealed, b"account-1").unwrap(), b"sk-secret");
        assert!(key.open(&sealed, b"account-2").is_err());
        assert!(MasterKey::generate().open(&sealed, b"account-1").is_err());
        assert!(key.open(&sealed[..10], b"account-1").is_err());
    }

    #[test]
    fn master_keys_parse_from_hex_and_base64_and_refuse_other_lengths() {
        let hex_key = "00".repeat(32);
        assert!(MasterKey::parse(&hex_key).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(MasterKey::parse(&b64).is_ok());
        let err = MasterKey::parse("abcd").unwrap_err();
        assert!(err.contains("32 bytes"), "{err}");
        assert!(MasterKey::parse("not a key!").is_err());
    }

    #[test]
    fn a_missing_master_key_is_generated_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let (first, origin) = MasterKey::load_or_generate(&Secret::default(), dir.path()).unwrap();
        assert!(matches!(origin, KeyOrigin::Generated(_)));
        let (again, origin) = MasterKey::load_or_generate(&Secret::default(), dir.path()).unwrap();
        assert!(matches!(origin, KeyOrigin::File(_)));
        assert_eq!(first.0, again.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(MASTER_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn tokens_are_unique_hashed_and_compared_by_hash() {
        let a = generate_token("qg_");
        let b = generate_token("qg_");
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("qg_"));
        let stored = hash_token(a.expose());
        assert!(token_matches(a.expose(), &stored));
        assert!(!token_matches(b.expose(), &stored));
    }

    #[test]
    fn masks_show_only_the_tail() {
        assert_eq!(mask("sk-abcdefgh1234"), "…1234");
        assert_eq!(mask("short"), "…");
    }
}
