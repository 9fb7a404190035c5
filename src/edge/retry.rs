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
//!
//! The tokens of NEW_TOKEN frames ([`seal_new_token`], RFC 9000 §8.1.3), sent once a
//! connection's handshake completed so the client's next connection skips the Retry, are
//! built the same way under another tag and another HKDF subkey, bound to the client's IP
//! only, with a lifetime of their own (`quic.new_token_lifetime`).

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

/// Tells NEW_TOKEN tokens (RFC 9000 §8.1.3) from Retry tokens and from anything else.
const NEW_TOKEN_TAG: u8 = 0xa8;

/// Whether `token` claims to be one of the tokens Spooky sends in NEW_TOKEN frames.
pub fn is_new_token(token: &[u8]) -> bool {
    token.first() == Some(&NEW_TOKEN_TAG)
}

/// Seals the token of a NEW_TOKEN frame for a client at `client`'s IP address. The layout is
/// a Retry token's without the original DCID: `NEW_TOKEN_TAG`, a random salt, the sealed
/// issue time, the GCM tag. The key is a NEW_TOKEN subkey ([`EdgeKeys::new_token_key`]) and
/// only the IP is authenticated, not the port: a client's next connection comes from a new
/// port, and a NAT may change it too.
pub fn seal_new_token(keys: &EdgeKeys, client: std::net::IpAddr, now: SystemTime) -> Vec<u8> {
    let mut token = Vec::with_capacity(1 + SALT + 8 + aead::AES_256_GCM.tag_len());
    token.push(NEW_TOKEN_TAG);
    let mut salt = [0u8; SALT];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).expect("the OS random source works");
    token.extend_from_slice(&salt);
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut sealed = secs.to_be_bytes().to_vec();
    keys.new_token_key(&salt)
        .seal_in_place_append_tag(only_nonce(), associated_ip(client), &mut sealed)
        .expect("sealing a short buffer cannot fail");
    token.extend_from_slice(&sealed);
    token
}

/// Checks a NEW_TOKEN token a client at `client` sent in a first Initial.
pub fn open_new_token(
    keys: &EdgeKeys,
    token: &[u8],
    client: std::net::IpAddr,
    lifetime: Duration,
    now: SystemTime,
) -> Result<(), TokenError> {
    if token.len() != 1 + SALT + 8 + aead::AES_256_GCM.tag_len() || token[0] != NEW_TOKEN_TAG {
        return Err(TokenError::Invalid);
    }
    let mut sealed = token[1 + SALT..].to_vec();
    let plain = keys
        .new_token_key(&token[1..1 + SALT])
        .open_in_place(only_nonce(), associated_ip(client), &mut sealed)
        .map_err(|_| TokenError::Invalid)?;
    let issued = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(plain[..8].try_into().expect("length checked")));
    let age = now.duration_since(issued).map_err(|_| TokenError::Expired)?;
    if age > lifetime {
        return Err(TokenError::Expired);
    }
    Ok(())
}

fn associated_ip(client: std::net::IpAddr) -> aead::Aad<[u8; 16]> {
    aead::Aad::from(match client {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(ip) => ip.octets(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_opens_for_its_ip_on_any_port_within_its_lifetime() {
        let keys = EdgeKeys::from_master(&[1; 32]);
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let now = SystemTime::now();
        let life = Duration::from_secs(86_400);
        let token = seal_new_token(&keys, ip, now);
        assert!(is_new_token(&token) && !is_retry_token(&token));
        assert_eq!(open_new_token(&keys, &token, ip, life, now + Duration::from_secs(3600)), Ok(()));
        let other: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(open_new_token(&keys, &token, other, life, now), Err(TokenError::Invalid));
        assert_eq!(open_new_token(&keys, &token, ip, life, now + life * 2), Err(TokenError::Expired));
        let mut altered = token.clone();
        altered[20] ^= 1;
        assert_eq!(open_new_token(&keys, &altered, ip, life, now), Err(TokenError::Invalid));
        assert_eq!(open_new_token(&EdgeKeys::from_master(&[2; 32]), &token, ip, life, now), Err(TokenError::Invalid));
        // Retry tokens and NEW_TOKEN tokens never open as each other, even with the tag swapped.
        let client = SocketAddr::new(ip, 4433);
        let mut retry = seal(&keys, client, b"", b"scid", now);
        retry[0] = NEW_TOKEN_TAG;
        assert_eq!(open_new_token(&keys, &retry, ip, life, now), Err(TokenError::Invalid));
        let mut swapped = token.clone();
        swapped[0] = TOKEN_TAG;
        assert_eq!(open(&keys, &swapped, client, b"scid", LIFE, now), Err(TokenError::Invalid));
    }

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
