//! What an instance does to its database before it serves, under the start lock (see
//! [`crate::store::lock`]) so that instances starting together do it once: check that its master
//! key is the one that sealed the stored credentials, hand out the first secrets, and write the
//! providers its config declares.

use crate::config::Config;
use crate::manage;
use crate::provision;
use crate::secrets::{self, MasterKey};
use crate::store::{keys, lock, settings, DbConn, StoreError};

/// Where the database keeps a value sealed with the master key that sealed its credentials.
const KEY_CHECK: &str = "master_key_check";
const KEY_CHECK_TEXT: &[u8] = b"quotagate master key check";

/// Why an instance cannot start on this database.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the credentials in this database were sealed with another master key: give every \
         instance the same security.master_key (or the same data_dir/master.key)"
    )]
    OtherMasterKey,
    #[error("applying the providers of {path}: {problem}")]
    Providers { path: String, problem: StoreError },
}

/// Prepares the database for this instance (see the module documentation); answers what the
/// declared providers changed.
pub fn prepare(
    conn: &mut DbConn,
    config: &Config,
    key: &MasterKey,
) -> Result<provision::Report, StartError> {
    lock::with_start_lock(conn, |conn| {
        check_master_key(conn, key)?;
        hand_out_first_secrets(conn, config)?;
        provision::apply(conn, key, &config.providers).map_err(|problem| StartError::Providers {
            path: config.path.display().to_string(),
            problem,
        })
    })
}

/// The first instance on a database leaves a value sealed with its master key; the others must
/// open it, or their credentials would not open either.
fn check_master_key(conn: &mut DbConn, key: &MasterKey) -> Result<(), StartError> {
    match settings::get(conn, KEY_CHECK)? {
        Some(sealed) => {
            let opened = hex::decode(sealed)
                .ok()
                .and_then(|bytes| key.open(&bytes, KEY_CHECK.as_bytes()).ok());
            match opened {
                Some(text) if text == KEY_CHECK_TEXT => Ok(()),
                _ => Err(StartError::OtherMasterKey),
            }
        }
        None => {
            let sealed = key.seal(KEY_CHECK_TEXT, KEY_CHECK.as_bytes());
            settings::put(conn, KEY_CHECK, &hex::encode(sealed))?;
            Ok(())
        }
    }
}

/// A first start with no admin token configured and no client key yet: make both and print them
/// once on stdout (never through the logger), so the quick start needs no setup step.
fn hand_out_first_secrets(conn: &mut DbConn, config: &Config) -> Result<(), StoreError> {
    if config.security.admin_token.is_empty()
        && settings::get(conn, settings::ADMIN_TOKEN_HASH)?.is_none()
    {
        let token = secrets::generate_token(manage::ADMIN_TOKEN_PREFIX);
        settings::put(
            conn,
            settings::ADMIN_TOKEN_HASH,
            &secrets::hash_token(token.expose()),
        )?;
        println!("quotagate: generated an admin token (shown only now; `quotagate admin-token rotate` makes a new one):");
        println!("  admin token: {}", token.expose());
    }
    if keys::list(conn)?.is_empty() {
        let (created, token) = manage::create_key(conn, "default", "default")?;
        println!(
            "quotagate: generated client key `{}` for user `{}` (shown only now):",
            created.key.name, created.user_name
        );
        println!("  client key: {}", token.expose());
    }
    Ok(())
}
