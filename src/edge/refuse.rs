//! Refusing a new connection without creating one: a server Initial packet carrying
//! CONNECTION_CLOSE, built and protected here with the Initial keys every QUIC endpoint can
//! derive from the client's DCID (RFC 9001 §5.2). Refusing this way costs a few hashes and
//! one AES-GCM seal, where letting quiche do it would mean reading the ClientHello and
//! signing a certificate for a connection we are about to drop (and quiche would then send
//! the close in a Handshake packet the client cannot read yet).

use ring::aead::{self, quic::HeaderProtectionKey};
use ring::hkdf;

/// RFC 9001 §5.2: the salt of QUIC v1 Initial secrets.
const INITIAL_SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f,
    0x0a,
];
/// CONNECTION_CLOSE frame carrying a transport error.
const CONNECTION_CLOSE: u8 = 0x1c;

/// The server's Initial packet protection keys for a connection the client opened with `dcid`.
struct InitialKeys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    hp: HeaderProtectionKey,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446 §7.1).
fn expand_label(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) {
    let full_len = (6 + label.len()) as u8;
    let length = (out.len() as u16).to_be_bytes();
    let info: [&[u8]; 5] = [&length, &[full_len], b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len())).and_then(|okm| okm.fill(out)).expect("lengths are within HKDF limits");
}

/// The server's Initial key, IV and header-protection key material (RFC 9001 §5.2).
fn server_initial_secrets(dcid: &[u8]) -> ([u8; 16], [u8; 12], [u8; 16]) {
    let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &INITIAL_SALT_V1).extract(dcid);
    let mut secret = [0u8; 32];
    expand_label(&initial, b"server in", &mut secret);
    let server = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &secret);
    let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
    expand_label(&server, b"quic key", &mut key);
    expand_label(&server, b"quic iv", &mut iv);
    expand_label(&server, b"quic hp", &mut hp);
    (key, iv, hp)
}

impl InitialKeys {
    fn server(dcid: &[u8]) -> Self {
        let (key, iv, hp) = server_initial_secrets(dcid);
        InitialKeys {
            key: aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).expect("16-byte key")),
            iv,
            hp: HeaderProtectionKey::new(&aead::quic::AES_128, &hp).expect("16-byte key"),
        }
    }
}

/// Writes into `out` a QUIC v1 server Initial closing the connection the client tried to open
/// (its Initial had `client_dcid` and `client_scid`) with transport error `code`; its length.
pub fn initial_close(
    client_dcid: &[u8],
    client_scid: &[u8],
    server_scid: &[u8],
    code: u64,
    reason: &[u8],
    out: &mut [u8],
) -> Option<usize> {
    let mut payload = vec![CONNECTION_CLOSE];
    put_varint(&mut payload, code);
    payload.push(0); // the frame type that caused it: none
    put_varint(&mut payload, reason.len() as u64);
    payload.extend_from_slice(reason);
    let tag_len = aead::AES_128_GCM.tag_len();
    // Long header, fixed bit, type Initial, one-byte packet number.
    let mut pkt = vec![0xc0];
    pkt.extend_from_slice(&1u32.to_be_bytes());
    for cid in [client_scid, server_scid] {
        pkt.push(cid.len() as u8);
        pkt.extend_from_slice(cid);
    }
    pkt.push(0); // no token
    let length = 1 + payload.len() + tag_len; // packet number, payload, tag
    put_varint2(&mut pkt, length as u16);
    let pn_offset = pkt.len();
    let pn: u8 = 0;
    pkt.push(pn);
    let keys = InitialKeys::server(client_dcid);
    let mut nonce = keys.iv;
    nonce[11] ^= pn;
    let tag = keys
        .key
        .seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&pkt[..]), &mut payload)
        .ok()?;
    pkt.extend_from_slice(&payload);
    pkt.extend_from_slice(tag.as_ref());
    // Header protection (RFC 9001 §5.4): the sample starts 4 bytes after the packet number.
    let sample = pkt.get(pn_offset + 4..pn_offset + 4 + 16)?;
    let mask = keys.hp.new_mask(sample).ok()?;
    pkt[0] ^= mask[0] & 0x0f;
    pkt[pn_offset] ^= mask[1];
    out.get_mut(..pkt.len())?.copy_from_slice(&pkt);
    Some(pkt.len())
}

/// A QUIC variable-length integer (RFC 9000 §16).
fn put_varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16_383 => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        16_384..=1_073_741_823 => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// A varint forced to two bytes (the Length field is written before its value is final).
fn put_varint2(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&(v | 0x4000).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9001 Appendix A.1: the server's Initial keys for DCID 0x8394c8f03e515708.
    #[test]
    fn initial_keys_match_rfc_9001_appendix_a() {
        let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
        let (key, iv, hp) = server_initial_secrets(&dcid);
        assert_eq!(hex::encode(key), "cf3a5331653c364c88f0f379b6067e37");
        assert_eq!(hex::encode(iv), "0ac1493ca1905853b0bba03e");
        assert_eq!(hex::encode(hp), "c206b8d9b9f0f37644430b490eeaa314");
    }

    #[test]
    fn varints() {
        let mut v = Vec::new();
        for n in [0, 63, 64, 16_383, 16_384, 1 << 30] {
            put_varint(&mut v, n);
        }
        assert_eq!(hex::encode(v), "003f40407fff80004000c000000040000000");
    }
}
