//! The edge's secrets: one master secret, from which HKDF-SHA256 derives the key of stateless
//! reset tokens (HMAC-SHA256 over the CID, RFC 9000 §10.3.2) and the key sealing Retry tokens
//! (AES-256-GCM).
//!
//! The master secret must outlive the process, or a restarted Spooky could not reset the
//! connections its predecessor left behind: it is read from `quic.secret_key_file`, else
//! derived from the TLS private key file (as stable as the certificate, and shared by a fleet
//! serving the same one). Only with a self-signed certificate, which changes on every start
//! anyway, is it random.

use crate::config::Config;
use anyhow::Context as _;
use ring::{aead, hkdf, hmac};

pub struct EdgeKeys {
    reset: hmac::Key,
    /// Retry tokens are sealed under keys derived from this, one per token (see
    /// [`EdgeKeys::token_key`]).
    token: hkdf::Prk,
    /// NEW_TOKEN tokens likewise (see [`EdgeKeys::new_token_key`]).
    new_token: hkdf::Prk,
}

impl EdgeKeys {
    /// Loads or derives the keys for `config`; the control thread calls this once at start.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        if config.quic.secret_key_file.is_some() && config.quic.server_id == 0 {
            // A node resets only CIDs that carry its server id; if every node of a fleet keeps
            // the default id, any of them can reset (kill) the others' connections.
            tracing::warn!(
                "quic.secret_key_file is set but quic.server_id is the default 0: if other nodes share this \
                 secret, give each its own server_id, or they can reset each other's connections"
            );
        }
        let secrets = config.quic.secret_key_file.iter().map(|f| ("quic.secret_key_file", f));
        let keys = config.tls.key.iter().map(|f| ("tls.key", f));
        let sni_keys = config.tls.sni.iter().map(|s| ("tls.sni[].key", &s.key));
        for (key, file) in secrets.chain(keys).chain(sni_keys) {
            warn_if_others_can_read(key, file);
        }
        let master = match (&config.quic.secret_key_file, &config.tls.key) {
            (Some(file), _) => std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
            (None, Some(key)) => std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
            (None, None) => {
                let mut random = vec![0; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
                    .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
                random
            }
        };
        Ok(Self::from_master(&master))
    }

    pub fn from_master(master: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"spooky edge keys v1").extract(master);
        let reset = prk.expand(&[b"stateless reset"], hmac::HMAC_SHA256).expect("32 bytes is a valid HKDF length");
        let token: hkdf::Prk =
            prk.expand(&[b"retry token"], hkdf::HKDF_SHA256).expect("32 bytes is a valid HKDF length").into();
        let new_token: hkdf::Prk =
            prk.expand(&[b"new token"], hkdf::HKDF_SHA256).expect("32 bytes is a valid HKDF length").into();
        EdgeKeys { reset: hmac::Key::from(reset), token, new_token }
    }

    /// The AES-256-GCM key of the Retry token with this `salt` (random, carried in the
    /// token). A key seals one token only, so its nonce can never repeat under it: the bound
    /// of about 2^32 random nonces per GCM key never applies, however many tokens a fleet
    /// sharing the master secret issues, and nothing needs rotating.
    pub(super) fn token_key(&self, salt: &[u8]) -> aead::LessSafeKey {
        let info = [salt];
        let okm = self.token.expand(&info, &aead::AES_256_GCM).expect("32 bytes is a valid HKDF length");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }

    /// The AES-256-GCM key of the NEW_TOKEN token with this `salt`: as [`Self::token_key`],
    /// under a subkey of its own (HKDF label `new token`), so a Retry token can never open
    /// as a NEW_TOKEN one or the other way round.
    pub(super) fn new_token_key(&self, salt: &[u8]) -> aead::LessSafeKey {
        let info = [salt];
        let okm = self.new_token.expand(&info, &aead::AES_256_GCM).expect("32 bytes is a valid HKDF length");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }

    /// The stateless reset token of a CID Spooky issued.
    pub fn reset_token(&self, cid: &[u8]) -> u128 {
        let tag = hmac::sign(&self.reset, cid);
        u128::from_be_bytes(tag.as_ref()[..16].try_into().expect("HMAC-SHA256 is 32 bytes"))
    }
}

/// Logs a warning when `file` (a secret) may be read by users other than its owner and group:
/// with a TLS key or the QUIC secret, anyone on the machine could impersonate the server or
/// forge its stateless resets and tokens; with a config holding `admin.token`, reload it.
pub fn warn_if_others_can_read(key: &str, file: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file) {
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            tracing::warn!(
                key,
                file = %file.display(),
                mode = format!("{:o}", mode & 0o777),
                "a secret is readable by every user of this machine: chmod o-r (e.g. 0640 or 0600)"
            );
        }
    }
}

/// Builds a stateless reset for a packet of `received` bytes into `out`; its length, if one
/// may be sent. It is shorter than the packet that triggered it, so two endpoints that both
/// forgot a connection cannot loop (RFC 9000 §10.3.3), and at least 21 bytes so it passes
/// for a short-header packet.
pub fn stateless_reset(token: u128, received: usize, out: &mut [u8]) -> Option<usize> {
    const MIN: usize = 21;
    let len = received.checked_sub(1)?.min(MIN + 20);
    if len < MIN {
        return None;
    }
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out[..len - 16]).ok()?;
    out[0] = 0x40 | (out[0] & 0x3f); // fixed bit set, short header, random rest
    out[len - 16..len].copy_from_slice(&token.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_per_secret_and_cid() {
        let a = EdgeKeys::from_master(&[7; 32]);
        let b = EdgeKeys::from_master(&[7; 32]);
        let c = EdgeKeys::from_master(&[8; 32]);
        assert_eq!(a.reset_token(b"cid-1"), b.reset_token(b"cid-1"), "a restart resets old connections");
        assert_ne!(a.reset_token(b"cid-1"), a.reset_token(b"cid-2"));
        assert_ne!(a.reset_token(b"cid-1"), c.reset_token(b"cid-1"));
    }

    #[test]
    fn resets_are_smaller_than_their_trigger() {
        let mut out = [0u8; 64];
        assert_eq!(stateless_reset(1, 21, &mut out), None, "cannot be smaller than 21 bytes");
        assert_eq!(stateless_reset(1, 30, &mut out), Some(29));
        let n = stateless_reset(0xabcd, 1350, &mut out).unwrap();
        assert_eq!(n, 41);
        assert_eq!(out[0] & 0xc0, 0x40);
        assert_eq!(u128::from_be_bytes(out[n - 16..n].try_into().unwrap()), 0xabcd);
    }
}
