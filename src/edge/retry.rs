//! Stateless Retry tokens (RFC 9000 §8.1.2): a client proves it can receive at its address
//! before Spooky keeps any state for it.
//!
//! A token is sealed with AES-256-GCM under a key derived from [`super::keys::EdgeKeys`] and
//! the token's own random salt, so any worker (or a restarted process, or another node sharing
//! the secret) can check it without a table, and no key ever seals two tokens:
//!
//! ```text
//! byte 0       : TOKEN_TAG (tells Retry tokens from anything else a client may send)
//! bytes 1-16   : random salt (HKDF info for the token's key; the GCM nonce is zero)
//! then, sealed : issue time (u64 seconds since the epoch, big-endian)
//!                original DCID length (1 byte) and the original DCID
//! last 16      : GCM tag, which also authenticates (as associated data) the client's IP and
//!                port and the CID Spooky chose in the Retry
//! ```
//!
//! A token is refused if it was altered, is presented from another address, for another CID,
//! or after its lifetime.

use super::keys::EdgeKeys;
use ring::aead;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TOKEN_TAG: u8 = 0xa7;
/// 128 random bits: two tokens share a key with probability about n²/2^129.
const SALT: usize = 16;

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a Retry token of ours, or altered, or for another address or CID.
    Invalid,
    Expired,
}

/// Whether `token` claims to be one of Spooky's Retry tokens (other tokens are ignored).
pub fn is_retry_token(token: &[u8]) -> bool {
    token.first() == Some(&TOKEN_TAG)
}

/// Seals a token for a client at `client` whose first Initial had `odcid`, retried to `scid`.
pub fn seal(keys: &EdgeKeys, client: SocketAddr, odcid: &[u8], scid: &[u8], now: SystemTime) -> Vec<u8> {
    let mut token = Vec::with_capacity(1 + SALT + 9 + odcid.len() + aead::AES_256_GCM.tag_len());
    token.push(TOKEN_TAG);
    let mut salt = [0u8; SALT];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).expect("the OS random source works");
    token.extend_from_slice(&salt);
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut sealed = Vec::with_capacity(9 + odcid.len() + aead::AES_256_GCM.tag_len());
    sealed.extend_from_slice(&secs.to_be_bytes());
    sealed.push(odcid.len() as u8);
    sealed.extend_from_slice(odcid);
    keys.token_key(&salt)
        .seal_in_place_append_tag(only_nonce(), associated(client, scid), &mut sealed)
        .expect("sealing a short buffer cannot fail");
    token.extend_from_slice(&sealed);
    token
}

/// Checks a token a client at `client` sent in an Initial for `dcid`; the original DCID.
pub fn open(
    keys: &EdgeKeys,
    token: &[u8],
    client: SocketAddr,
    dcid: &[u8],
    lifetime: Duration,
    now: SystemTime,
) -> Result<Vec<u8>, TokenError> {
    if token.len() < 1 + SALT + 9 + aead::AES_256_GCM.tag_len() || token[0] != TOKEN_TAG {
        return Err(TokenError::Invalid);
    }
    let mut sealed = token[1 + SALT..].to_vec();
    let plain = keys
        .token_key(&token[1..1 + SALT])
        .open_in_place(only_nonce(), associated(client, dcid), &mut sealed)
        .map_err(|_| TokenError::Invalid)?;
    let issued = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(plain[..8].try_into().expect("length checked")));
    let odcid_len = usize::from(plain[8]);
    let odcid = plain.get(9..9 + odcid_len).ok_or(TokenError::Invalid)?;
    // A token from the future means a clock jump; treat it like an expired one.
    let age = now.duration_since(issued).map_err(|_| TokenError::Expired)?;
    if age > lifetime {
        return Err(TokenError::Expired);
    }
    Ok(odcid.to_vec())
}

/// Every token has a key of its own, so one fixed nonce is unique per key.
fn only_nonce() -> aead::Nonce {
    aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN])
}

fn associated(client: SocketAddr, cid: &[u8]) -> aead::Aad<Vec<u8>> {
    let mut aad = Vec::with_capacity(18 + cid.len());
    match client.ip() {
        std::net::IpAddr::V4(ip) => aad.extend_from_slice(&ip.to_ipv6_mapped().octets()),
        std::net::IpAddr::V6(ip) => aad.extend_from_slice(&ip.octets()),
    }
    aad.extend_from_slice(&client.port().to_be_bytes());
    aad.extend_from_slice(cid);
    aead::Aad::from(aad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFE: Duration = Duration::from_secs(10);

    #[test]
    fn a_token_opens_only_for_its_client_cid_and_lifetime() {
        let keys = EdgeKeys::from_master(&[1; 32]);
        let client: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let now = SystemTime::now();
        let token = seal(&keys, client, b"odcid-123", b"retry-scid", now);
        assert_eq!(open(&keys, &token, client, b"retry-scid", LIFE, now), Ok(b"odcid-123".to_vec()));
        let other_port: SocketAddr = "192.0.2.1:4434".parse().unwrap();
        assert_eq!(open(&keys, &token, other_port, b"retry-scid", LIFE, now), Err(TokenError::Invalid));
        assert_eq!(open(&keys, &token, client, b"other-scid", LIFE, now), Err(TokenError::Invalid));
        assert_eq!(open(&keys, &token, client, b"retry-scid", LIFE, now + LIFE * 2), Err(TokenError::Expired));
        let mut altered = token.clone();
        altered[20] ^= 1;
        assert_eq!(open(&keys, &altered, client, b"retry-scid", LIFE, now), Err(TokenError::Invalid));
        let mut salted = token.clone();
        salted[3] ^= 1;
        assert_eq!(open(&keys, &salted, client, b"retry-scid", LIFE, now), Err(TokenError::Invalid), "salt is bound");
        let other_keys = EdgeKeys::from_master(&[2; 32]);
        assert_eq!(open(&other_keys, &token, client, b"retry-scid", LIFE, now), Err(TokenError::Invalid));
        assert_eq!(open(&keys, &token[..10], client, b"retry-scid", LIFE, now), Err(TokenError::Invalid));
    }

    #[test]
    fn every_token_has_a_key_of_its_own() {
        let keys = EdgeKeys::from_master(&[1; 32]);
        let client: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let now = SystemTime::now();
        let salts: std::collections::HashSet<Vec<u8>> =
            (0..1000).map(|_| seal(&keys, client, b"odcid", b"scid", now)[1..1 + SALT].to_vec()).collect();
        assert_eq!(salts.len(), 1000, "same inputs, a new salt (and so a new key) every time");
        // Another node with the same secret opens them: the key derives from the token alone.
        let token = seal(&keys, client, b"odcid", b"scid", now);
        assert_eq!(open(&EdgeKeys::from_master(&[1; 32]), &token, client, b"scid", LIFE, now), Ok(b"odcid".to_vec()));
    }
}
