//! TLS for the QUIC edge: the certificates Spooky serves (a default one, and more chosen by
//! the name the client asks for with SNI) and the process-wide session-ticket keys.
//!
//! The control thread loads a [`TlsMaterial`] with every snapshot; each worker builds its
//! BoringSSL context from it with [`TlsMaterial::ssl_context`] (`settings::quic_config` wraps
//! that context in the `quiche` configuration).

use crate::config::Config;
use anyhow::Context as _;
use boring::pkey::{PKey, Private};
use boring::ssl::{NameType, SniError, SslAlert, SslContextBuilder, SslMethod, SslRef};
use boring::x509::X509;
use foreign_types::{ForeignType, ForeignTypeRef};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

/// A certificate problem found while loading: the configuration key it belongs to and what is
/// wrong (naming the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.problem)
    }
}

impl std::error::Error for TlsError {}

fn fail(key: impl Into<String>, problem: impl Into<String>) -> TlsError {
    TlsError { key: key.into(), problem: problem.into() }
}

/// Every certificate and key, parsed once by the control thread and shared (read-only) by
/// every worker's contexts.
#[derive(Clone)]
pub struct TlsMaterial {
    certs: Arc<Certificates>,
    /// The certificate and key files read, in order (a self-signed default is not a file).
    files: Vec<Vec<u8>>,
    ticket_key_rotation: Duration,
}

struct Certificates {
    default: Identity,
    sni: Vec<Identity>,
    /// Exact name → index in `sni`.
    exact: HashMap<String, usize>,
    /// `*.suffix` → index in `sni`, keyed by the suffix.
    wildcard: HashMap<String, usize>,
}

/// One certificate chain and its key.
struct Identity {
    chain: Vec<X509>,
    key: PKey<Private>,
    /// The chain as BoringSSL buffers, leaf first: what a connection is switched to without
    /// re-encoding anything.
    buffers: Vec<CryptoBuffer>,
}

/// An immutable, reference-counted BoringSSL `CRYPTO_BUFFER` (DER bytes).
struct CryptoBuffer(NonNull<boring_sys::CRYPTO_BUFFER>);

// SAFETY: a CRYPTO_BUFFER is immutable after creation and its reference count is atomic;
// BoringSSL shares them between threads itself.
unsafe impl Send for CryptoBuffer {}
unsafe impl Sync for CryptoBuffer {}

impl CryptoBuffer {
    fn new(der: &[u8]) -> Option<Self> {
        // SAFETY: BoringSSL copies `der`; a null pool means an unpooled buffer.
        NonNull::new(unsafe { boring_sys::CRYPTO_BUFFER_new(der.as_ptr(), der.len(), std::ptr::null_mut()) })
            .map(CryptoBuffer)
    }
}

impl Drop for CryptoBuffer {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { boring_sys::CRYPTO_BUFFER_free(self.0.as_ptr()) }
    }
}

impl Identity {
    fn new(chain: Vec<X509>, key: PKey<Private>) -> anyhow::Result<Self> {
        let buffers = chain
            .iter()
            .map(|c| CryptoBuffer::new(&c.to_der()?).context("allocating a certificate buffer"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Identity { chain, key, buffers })
    }

    /// Makes this the certificate `ssl` presents (chain and key both replaced).
    fn serve_on(&self, ssl: &mut SslRef) -> bool {
        let certs: Vec<*mut boring_sys::CRYPTO_BUFFER> = self.buffers.iter().map(|b| b.0.as_ptr()).collect();
        // SAFETY: valid SSL, buffers and key for the duration of the call; BoringSSL takes its
        // own references to them.
        unsafe {
            boring_sys::SSL_set_chain_and_key(
                ssl.as_ptr(),
                certs.as_ptr(),
                certs.len(),
                self.key.as_ptr(),
                std::ptr::null(),
            ) == 1
        }
    }
}

impl Certificates {
    /// The SNI certificate for `name`: an exact name, else the most specific `*.suffix`.
    fn select(&self, name: &str) -> Option<&Identity> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&name) {
            return Some(&self.sni[i]);
        }
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(&i) = self.wildcard.get(parent) {
                return Some(&self.sni[i]);
            }
            rest = parent;
        }
        None
    }
}

impl TlsMaterial {
    /// Reads (or generates) every certificate of `config.tls` (already validated: paths are
    /// absolute and readable). Refuses unparsable files and keys that do not match their
    /// certificate, naming the key and the file.
    pub fn load(config: &Config) -> Result<Self, TlsError> {
        let tls = &config.tls;
        let mut files = Vec::new();
        let default = if let Some(names) = &tls.self_signed {
            let ck = rcgen::generate_simple_self_signed(names.clone())
                .map_err(|e| fail("tls.self_signed", format!("cannot generate a certificate: {e}")))?;
            let chain = vec![X509::from_der(ck.cert.der()).map_err(|e| fail("tls.self_signed", e.to_string()))?];
            let key = PKey::private_key_from_der(&ck.signing_key.serialize_der())
                .map_err(|e| fail("tls.self_signed", e.to_string()))?;
            Identity::new(chain, key).map_err(|e| fail("tls.self_signed", format!("{e:#}")))?
        } else {
            let (cert, key) = (tls.cert.as_deref().expect("validated"), tls.key.as_deref().expect("validated"));
            read_identity("tls", cert, key, &mut files)?
        };
        let mut certs = Certificates { default, sni: Vec::new(), exact: HashMap::new(), wildcard: HashMap::new() };
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, entry) in tls.sni.iter().enumerate() {
            let key = format!("tls.sni[{i}]");
            let identity = read_identity(&key, &entry.cert, &entry.key, &mut files)?;
            let names = match &entry.names {
                Some(names) => names.clone(),
                None => {
                    let names = dns_names(&identity.chain[0]);
                    if names.is_empty() {
                        return Err(fail(
                            format!("{key}.names"),
                            format!(
                                "left out, and `{}` has no DNS subject-alternative names to take them from",
                                entry.cert.display()
                            ),
                        ));
                    }
                    names
                }
            };
            for name in names {
                if let Some(first) = owner.insert(name.clone(), i) {
                    let from = if entry.names.is_some() { "" } else { " (from its certificate)" };
                    return Err(fail(
                        format!("{key}.names"),
                        format!("`{name}`{from} is already served by tls.sni[{first}]"),
                    ));
                }
                match name.strip_prefix("*.") {
                    Some(suffix) => certs.wildcard.insert(suffix.to_string(), i),
                    None => certs.exact.insert(name, i),
                };
            }
            certs.sni.push(identity);
        }
        Ok(TlsMaterial { certs: Arc::new(certs), files, ticket_key_rotation: tls.ticket_key_rotation.0 })
    }

    /// The contents of every certificate and key file read (for the snapshot fingerprint).
    pub fn files(&self) -> &[Vec<u8>] {
        &self.files
    }

    /// A BoringSSL context serving this material (the QUIC configuration is built on it):
    /// the default certificate, an SNI callback when there are more, and the process-wide
    /// session-ticket keys.
    pub fn ssl_context(&self) -> anyhow::Result<SslContextBuilder> {
        let mut ctx = SslContextBuilder::new(SslMethod::tls())?;
        let default = &self.certs.default;
        ctx.set_certificate(&default.chain[0])?;
        for extra in &default.chain[1..] {
            ctx.add_extra_chain_cert(extra.clone())?;
        }
        ctx.set_private_key(&default.key)?;
        ctx.check_private_key().context("the private key does not match the certificate")?;
        if !self.certs.sni.is_empty() {
            // The connection keeps the context quiche built (its ALPN callback, early-data
            // setting and ticket keys all live there): only the certificate is swapped, on
            // the connection itself. Switching the whole context (`SSL_set_SSL_CTX`) would
            // make BoringSSL take ALPN selection and `enable_early_data` from a context quiche
            // never configured.
            let certs = Arc::clone(&self.certs);
            ctx.set_servername_callback(move |ssl, alert| {
                let Some(identity) = ssl.servername(NameType::HOST_NAME).and_then(|n| certs.select(n)) else {
                    return Ok(()); // no SNI, or a name without its own certificate: the default
                };
                if identity.serve_on(ssl) {
                    Ok(())
                } else {
                    *alert = SslAlert::INTERNAL_ERROR;
                    Err(SniError::ALERT_FATAL)
                }
            });
        }
        tickets::install(&mut ctx, self.ticket_key_rotation);
        Ok(ctx)
    }
}

/// Reads and checks one certificate chain and key; errors name `{key}.cert` or `{key}.key`.
fn read_identity(key: &str, cert: &Path, pkey: &Path, files: &mut Vec<Vec<u8>>) -> Result<Identity, TlsError> {
    let (cert_key, pkey_key) = (format!("{key}.cert"), format!("{key}.key"));
    let chain_pem =
        std::fs::read(cert).map_err(|e| fail(&cert_key, format!("cannot read `{}`: {e}", cert.display())))?;
    let key_pem = std::fs::read(pkey).map_err(|e| fail(&pkey_key, format!("cannot read `{}`: {e}", pkey.display())))?;
    let chain = X509::stack_from_pem(&chain_pem)
        .map_err(|e| fail(&cert_key, format!("`{}` is not a PEM certificate chain: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(fail(&cert_key, format!("`{}` holds no certificate", cert.display())));
    }
    let private = PKey::private_key_from_pem(&key_pem)
        .map_err(|e| fail(&pkey_key, format!("`{}` is not a PEM private key: {e}", pkey.display())))?;
    let public = chain[0]
        .public_key()
        .map_err(|e| fail(&cert_key, format!("`{}`: unusable public key: {e}", cert.display())))?;
    if !public.public_eq(&private) {
        return Err(fail(
            &pkey_key,
            format!("`{}` does not match the certificate in `{}`", pkey.display(), cert.display()),
        ));
    }
    files.push(chain_pem);
    files.push(key_pem);
    Identity::new(chain, private).map_err(|e| fail(&cert_key, format!("{e:#}")))
}

/// The certificate's DNS subject-alternative names, lower-cased.
fn dns_names(cert: &X509) -> Vec<String> {
    let Some(sans) = cert.subject_alt_names() else {
        return Vec::new();
    };
    let mut names: Vec<String> = sans
        .iter()
        .filter_map(|n| n.dnsname())
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()))
        .collect();
    names.dedup();
    names
}

/// Session tickets sealed with keys shared by every worker of the process.
///
/// BoringSSL's own ticket keys belong to one `SSL_CTX`, and every worker builds its own
/// context (and a new one on each reload), so a ticket issued by worker 0 could not be opened
/// by worker 1 or after a reload. Spooky installs one ticket AEAD (`SSL_CTX_set_ticket_aead_
/// method`) on every context instead: tickets are sealed with AES-256-GCM under a process-wide
/// key ring. Of BoringSSL's three hooks this is the one that needs no OpenSSL-style cipher and
/// HMAC context juggling (`SSL_CTX_set_tlsext_ticket_key_cb`) and, unlike
/// `SSL_CTX_set_tlsext_ticket_keys` (quiche's `Config::set_ticket_key`), accepts a previous key
/// after rotation without rebuilding every context. In TLS 1.3 the server sends fresh tickets
/// after every handshake, resumed ones included, so a ticket opened with the previous key is
/// replaced by one sealed with the current key.
///
/// Keys are 256-bit CSPRNG output, rotated every `tls.ticket_key_rotation`: the current key
/// seals, the previous one still opens for one more period, older ones are forgotten
/// (forward secrecy of the tickets). The ring is locked only while sealing or opening a
/// ticket — once or twice per handshake, beside public-key operations that cost ~1000× more;
/// nothing on the request path touches it.
pub(crate) mod tickets {
    use boring::ssl::SslContextBuilder;
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
    use ring::rand::{SecureRandom, SystemRandom};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{LazyLock, PoisonError, RwLock, RwLockReadGuard};
    use std::time::{Duration, Instant};

    const ID_LEN: usize = 16;
    const TAG_LEN: usize = 16;
    /// Bytes a sealed ticket adds: key id, nonce, tag.
    pub const OVERHEAD: usize = ID_LEN + NONCE_LEN + TAG_LEN;

    /// The process-wide key ring every worker's contexts use. It lives as long as the process,
    /// so reloads (which build new contexts) keep every ticket valid.
    pub static KEYS: LazyLock<TicketKeys> = LazyLock::new(|| TicketKeys::new(Duration::from_secs(3600)));

    struct TicketKey {
        id: [u8; ID_LEN],
        key: LessSafeKey,
        created: Instant,
    }

    struct Ring {
        current: TicketKey,
        previous: Option<TicketKey>,
    }

    pub struct TicketKeys {
        rotation_ms: AtomicU64,
        ring: RwLock<Ring>,
        rng: SystemRandom,
    }

    impl TicketKeys {
        pub fn new(rotation: Duration) -> Self {
            let rng = SystemRandom::new();
            let current = TicketKey::generate(&rng, Instant::now());
            TicketKeys {
                rotation_ms: AtomicU64::new(rotation.as_millis() as u64),
                ring: RwLock::new(Ring { current, previous: None }),
                rng,
            }
        }

        pub fn set_rotation(&self, rotation: Duration) {
            self.rotation_ms.store(rotation.as_millis().max(1) as u64, Ordering::Relaxed);
        }

        fn rotation(&self) -> Duration {
            Duration::from_millis(self.rotation_ms.load(Ordering::Relaxed))
        }

        /// The ring as of `now`, rotated first if the current key has served its period.
        fn ring(&self, now: Instant) -> RwLockReadGuard<'_, Ring> {
            let period = self.rotation();
            let ring = self.ring.read().unwrap_or_else(PoisonError::into_inner);
            if now < ring.current.created + period {
                return ring;
            }
            drop(ring);
            {
                let mut ring = self.ring.write().unwrap_or_else(PoisonError::into_inner);
                if now >= ring.current.created + period {
                    let next = TicketKey::generate(&self.rng, now);
                    let old = std::mem::replace(&mut ring.current, next);
                    // The old key opens tickets for one more period after its own, no longer.
                    ring.previous = (now < old.created + 2 * period).then_some(old);
                }
            }
            self.ring.read().unwrap_or_else(PoisonError::into_inner)
        }

        /// Seals `plaintext` into `out` (`plaintext.len() + OVERHEAD` bytes at least):
        /// key id ‖ nonce ‖ ciphertext ‖ tag. Returns the length written.
        pub fn seal(&self, now: Instant, plaintext: &[u8], out: &mut [u8]) -> Option<usize> {
            let total = plaintext.len() + OVERHEAD;
            if out.len() < total {
                return None;
            }
            let ring = self.ring(now);
            let mut nonce = [0u8; NONCE_LEN];
            self.rng.fill(&mut nonce).ok()?;
            let (head, body) = out[..total].split_at_mut(ID_LEN + NONCE_LEN);
            head[..ID_LEN].copy_from_slice(&ring.current.id);
            head[ID_LEN..].copy_from_slice(&nonce);
            let (text, tag_out) = body.split_at_mut(plaintext.len());
            text.copy_from_slice(plaintext);
            let tag = ring
                .current
                .key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&ring.current.id), text)
                .ok()?;
            tag_out.copy_from_slice(tag.as_ref());
            Some(total)
        }

        /// Opens a ticket sealed by [`Self::seal`] with the current or the previous key.
        /// `None`: unknown or expired key, or a forged or damaged ticket.
        pub fn open(&self, now: Instant, ticket: &[u8]) -> Option<Vec<u8>> {
            if ticket.len() < OVERHEAD {
                return None;
            }
            let (id, rest) = ticket.split_at(ID_LEN);
            let (nonce, sealed) = rest.split_at(NONCE_LEN);
            let period = self.rotation();
            let ring = self.ring(now);
            let key = if ring.current.id == id {
                &ring.current
            } else {
                ring.previous.as_ref().filter(|p| p.id == id && now < p.created + 2 * period)?
            };
            let mut buf = sealed.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let len = key.key.open_in_place(nonce, Aad::from(&key.id), &mut buf).ok()?.len();
            buf.truncate(len);
            Some(buf)
        }
    }

    impl TicketKey {
        fn generate(rng: &SystemRandom, created: Instant) -> Self {
            let mut id = [0u8; ID_LEN];
            let mut secret = [0u8; 32];
            rng.fill(&mut id).expect("OS randomness");
            rng.fill(&mut secret).expect("OS randomness");
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).expect("32-byte key"));
            TicketKey { id, key, created }
        }
    }

    /// Makes `ctx` seal and open tickets with [`KEYS`], rotating every `rotation`, and tells
    /// clients a ticket lives `rotation` (it is honoured for at least that long).
    pub fn install(ctx: &mut SslContextBuilder, rotation: Duration) {
        KEYS.set_rotation(rotation);
        LazyLock::force(&KEYS);
        // SAFETY: valid context; METHOD is 'static.
        unsafe {
            boring_sys::SSL_CTX_set_ticket_aead_method(ctx.as_ptr(), &METHOD);
            boring_sys::SSL_CTX_set_session_psk_dhe_timeout(ctx.as_ptr(), rotation.as_secs().max(1) as u32);
        }
    }

    static METHOD: boring_sys::SSL_TICKET_AEAD_METHOD =
        boring_sys::SSL_TICKET_AEAD_METHOD { max_overhead: Some(max_overhead), seal: Some(seal), open: Some(open) };

    unsafe extern "C" fn max_overhead(_ssl: *mut boring_sys::SSL) -> usize {
        OVERHEAD
    }

    unsafe extern "C" fn seal(
        _ssl: *mut boring_sys::SSL,
        out: *mut u8,
        out_len: *mut usize,
        max_out_len: usize,
        input: *const u8,
        in_len: usize,
    ) -> std::os::raw::c_int {
        // BoringSSL may pass the same buffer as input and output: copy the input first.
        // SAFETY: BoringSSL passes `in_len` readable bytes at `input` and `max_out_len`
        // writable bytes at `out`.
        let plaintext = unsafe { std::slice::from_raw_parts(input, in_len) }.to_vec();
        let out = unsafe { std::slice::from_raw_parts_mut(out, max_out_len) };
        match KEYS.seal(Instant::now(), &plaintext, out) {
            Some(n) => {
                // SAFETY: valid out-pointer from BoringSSL.
                unsafe { *out_len = n };
                1
            }
            None => 0,
        }
    }

    unsafe extern "C" fn open(
        _ssl: *mut boring_sys::SSL,
        out: *mut u8,
        out_len: *mut usize,
        max_out_len: usize,
        input: *const u8,
        in_len: usize,
    ) -> boring_sys::ssl_ticket_aead_result_t {
        // SAFETY: as in `seal`; `open` copies the ticket before anything is written to `out`.
        let ticket = unsafe { std::slice::from_raw_parts(input, in_len) };
        let Some(plain) = KEYS.open(Instant::now(), ticket) else {
            return boring_sys::ssl_ticket_aead_result_t::ssl_ticket_aead_ignore_ticket;
        };
        if plain.len() > max_out_len {
            return boring_sys::ssl_ticket_aead_result_t::ssl_ticket_aead_ignore_ticket;
        }
        // SAFETY: `plain` is our own buffer, `out` has `max_out_len` >= its length bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(plain.as_ptr(), out, plain.len());
            *out_len = plain.len();
        }
        boring_sys::ssl_ticket_aead_result_t::ssl_ticket_aead_success
    }
}

#[cfg(test)]
mod tests {
    use super::tickets::{TicketKeys, OVERHEAD};
    use super::*;
    use std::time::Instant;

    fn ecdsa_key() -> PKey<Private> {
        crate::tools::certs::ecdsa_key().unwrap()
    }

    fn rsa_key() -> PKey<Private> {
        crate::tools::certs::rsa_key().unwrap()
    }

    fn write_pair(dir: &Path, stem: &str, key: &PKey<Private>, names: &[&str]) {
        crate::tools::certs::write_self_signed(dir, stem, key, names).unwrap();
    }

    fn config(dir: &Path, tls: &str) -> Result<Config, String> {
        let yaml = format!(
            "listen: 127.0.0.1:0\ntls:\n{tls}\nupstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:1\nroutes:\n  - upstream: a\n"
        );
        crate::config::parse(&yaml, "t.yaml", dir).map_err(|e| e.to_string())
    }

    fn material(dir: &Path, tls: &str) -> Result<TlsMaterial, String> {
        let c = config(dir, tls)?;
        TlsMaterial::load(&c).map_err(|e| e.to_string())
    }

    fn refused(dir: &Path, tls: &str) -> String {
        match material(dir, tls) {
            Ok(_) => panic!("accepted: {tls}"),
            Err(e) => e,
        }
    }

    /// Two contexts built from the same material, as two workers (or two reloads) do.
    fn server_config(m: &TlsMaterial, early_data: bool) -> quiche::Config {
        let mut c =
            quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, m.ssl_context().unwrap()).unwrap();
        c.set_application_protos(&[b"test"]).unwrap();
        c.set_initial_max_data(1 << 20);
        c.set_initial_max_stream_data_bidi_remote(1 << 16);
        c.set_initial_max_streams_bidi(8);
        if early_data {
            c.enable_early_data();
        }
        c
    }

    fn client_config() -> quiche::Config {
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        c.set_application_protos(&[b"test"]).unwrap();
        c.verify_peer(false);
        c.set_initial_max_data(1 << 20);
        c.set_initial_max_stream_data_bidi_local(1 << 16);
        c.set_initial_max_streams_bidi(8);
        c.enable_early_data();
        c
    }

    struct Pair {
        client: quiche::Connection,
        server: quiche::Connection,
    }

    const CLIENT: &str = "127.0.0.1:4000";
    const SERVER: &str = "127.0.0.1:443";

    impl Pair {
        fn new(server: &mut quiche::Config, sni: Option<&str>, session: Option<&[u8]>) -> Pair {
            let (c, s) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
            let mut client_cfg = client_config();
            let mut client =
                quiche::connect(sni, &quiche::ConnectionId::from_ref(&[1; 16]), c, s, &mut client_cfg).unwrap();
            if let Some(session) = session {
                client.set_session(session).unwrap();
            }
            let server = quiche::accept(&quiche::ConnectionId::from_ref(&[2; 16]), None, s, c, server).unwrap();
            Pair { client, server }
        }

        /// Moves packets both ways until neither side has anything to send.
        fn pump(&mut self) {
            let mut buf = vec![0u8; 65_535];
            loop {
                let moved = relay(&mut self.client, &mut self.server, &mut buf)
                    | relay(&mut self.server, &mut self.client, &mut buf);
                if !moved {
                    return;
                }
            }
        }

        fn leaf_names(&self) -> Vec<String> {
            let der = self.client.peer_cert().expect("server certificate");
            dns_names(&X509::from_der(der).unwrap())
        }
    }

    /// Delivers everything `from` has to send to `to`; true if anything moved.
    fn relay(from: &mut quiche::Connection, to: &mut quiche::Connection, buf: &mut [u8]) -> bool {
        let mut moved = false;
        while let Ok((n, info)) = from.send(buf) {
            let _ = to.recv(&mut buf[..n], quiche::RecvInfo { from: info.from, to: info.to });
            moved = true;
        }
        moved
    }

    #[test]
    fn tickets_open_with_the_current_and_previous_key_only() {
        let keys = TicketKeys::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut out = vec![0u8; 100 + OVERHEAD];
        let n = keys.seal(t0, &[7; 100], &mut out).unwrap();
        assert_eq!(n, 100 + OVERHEAD);
        let ticket = out[..n].to_vec();
        assert_eq!(keys.open(t0, &ticket).unwrap(), vec![7; 100]);
        // Damaged or too-short tickets are refused, as are other processes' tickets.
        let mut bad = ticket.clone();
        bad[OVERHEAD] ^= 1;
        assert!(keys.open(t0, &bad).is_none());
        assert!(keys.open(t0, &ticket[..OVERHEAD - 1]).is_none());
        assert!(TicketKeys::new(Duration::from_secs(10)).open(t0, &ticket).is_none());
        assert!(keys.seal(t0, &[7; 100], &mut out[..100 + OVERHEAD - 1]).is_none());
        // One rotation: a new key seals, the old one still opens.
        let t1 = t0 + Duration::from_secs(11);
        let n = keys.seal(t1, b"new", &mut out).unwrap();
        assert_ne!(out[..16], ticket[..16], "a new key id after rotation");
        assert_eq!(keys.open(t1, &out[..n]).unwrap(), b"new");
        assert_eq!(keys.open(t1, &ticket).unwrap(), vec![7; 100]);
        // Two periods after its creation the old key is gone.
        assert!(keys.open(t0 + Duration::from_secs(20), &ticket).is_none());
        assert_eq!(keys.open(t0 + Duration::from_secs(20), &out[..n]).unwrap(), b"new");
    }

    #[test]
    fn a_long_idle_gap_forgets_both_keys() {
        let keys = TicketKeys::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut out = vec![0u8; 64];
        let n = keys.seal(t0, b"x", &mut out).unwrap();
        // Nothing happened for 25 s: the next use rotates, and the old key is past its life.
        assert!(keys.open(t0 + Duration::from_secs(25), &out[..n]).is_none());
    }

    #[test]
    fn sni_picks_the_certificate_and_unknown_names_get_the_default() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "api", &ecdsa_key(), &["api.example.com"]);
        write_pair(dir.path(), "org", &rsa_key(), &["*.example.org"]);
        let m = material(
            dir.path(),
            "  self_signed: [default.test]\n  sni:\n    - { names: [api.example.com], cert: api.crt, key: api.key }\n    - { cert: org.crt, key: org.key }",
        )
        .unwrap();
        let mut server = server_config(&m, false);
        for (sni, expect) in [
            (Some("api.example.com"), "api.example.com"),
            (Some("API.Example.COM"), "api.example.com"),
            (Some("www.example.org"), "*.example.org"),
            (Some("a.b.example.org"), "*.example.org"),
            (Some("example.org"), "default.test"),
            (Some("other.test"), "default.test"),
            (None, "default.test"),
        ] {
            let mut p = Pair::new(&mut server, sni, None);
            p.pump();
            assert!(p.client.is_established(), "{sni:?}: {:?}", p.client.local_error());
            assert_eq!(p.leaf_names(), vec![expect.to_string()], "{sni:?}");
        }
    }

    #[test]
    fn tickets_from_one_worker_resume_on_another_with_early_data() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "api", &rsa_key(), &["api.example.com"]);
        let tls = "  self_signed: [default.test]\n  sni: [{ cert: api.crt, key: api.key }]";
        let m = material(dir.path(), tls).unwrap();
        let (mut worker0, mut worker1) = (server_config(&m, true), server_config(&m, true));
        let mut first = Pair::new(&mut worker0, Some("api.example.com"), None);
        first.pump();
        assert!(first.client.is_established() && !first.client.is_resumed());
        let session = first.client.session().expect("a ticket").to_vec();

        // Another worker, and a context built from a reloaded configuration: both resume.
        let reloaded = material(dir.path(), tls).unwrap();
        for server in [&mut worker1, &mut server_config(&reloaded, true)] {
            let mut p = Pair::new(server, Some("api.example.com"), Some(&session));
            // The client's first flight (ClientHello), then 0-RTT stream data: only these
            // reach the server before it answers.
            let mut buf = vec![0u8; 65_535];
            relay(&mut p.client, &mut p.server, &mut buf);
            assert!(p.client.is_in_early_data(), "the ticket allows 0-RTT");
            p.client.stream_send(0, b"early", true).unwrap();
            relay(&mut p.client, &mut p.server, &mut buf);
            assert!(!p.server.is_established());
            assert!(p.server.is_in_early_data());
            let mut got = [0u8; 16];
            let (n, fin) = p.server.stream_recv(0, &mut got).expect("0-RTT stream data before the handshake");
            assert_eq!((&got[..n], fin), (&b"early"[..], true));
            p.pump();
            assert!(p.client.is_resumed() && p.server.is_resumed());
            assert_eq!(p.client.early_data_reason(), 2, "ssl_early_data_accepted");
            assert_eq!(p.leaf_names(), vec!["api.example.com".to_string()]);
        }
    }

    #[test]
    fn bad_certificates_are_refused_with_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &ecdsa_key(), &["a.test"]);
        write_pair(dir.path(), "b", &rsa_key(), &["b.test"]);
        let base = "  self_signed: [default.test]\n  sni:\n    - { cert: a.crt, key: a.key }\n";
        let e = refused(dir.path(), &format!("{base}    - {{ cert: b.crt, key: a.key }}"));
        assert!(e.contains("`tls.sni[1].key`") && e.contains("a.key") && e.contains("does not match"), "{e}");
        let e = refused(dir.path(), &format!("{base}    - {{ cert: a.crt, key: a.key }}"));
        assert!(e.contains("`tls.sni[1].names`") && e.contains("`a.test` (from its certificate)"), "{e}");
        std::fs::write(dir.path().join("junk.crt"), "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
            .unwrap();
        let e = refused(dir.path(), &format!("{base}    - {{ cert: junk.crt, key: b.key }}"));
        assert!(e.contains("`tls.sni[1].cert`") && e.contains("junk.crt"), "{e}");
        let e = refused(dir.path(), &format!("{base}    - {{ cert: missing.crt, key: b.key }}"));
        assert!(e.contains("`tls.sni[1].cert`") && e.contains("cannot read") && e.contains("missing.crt"), "{e}");
        let e = refused(dir.path(), &format!("{base}    - {{ names: [Bad.test], cert: b.crt, key: b.key }}"));
        assert!(e.contains("`tls.sni[1].names[0]`"), "{e}");
        let e = refused(dir.path(), &format!("{base}    - {{ names: [], cert: b.crt, key: b.key }}"));
        assert!(e.contains("`tls.sni[1].names`"), "{e}");
        let e = refused(dir.path(), "  self_signed: [x]\n  ticket_key_rotation: 0s");
        assert!(e.contains("`tls.ticket_key_rotation`"), "{e}");
        let e = refused(dir.path(), "  cert: b.crt\n  key: a.key");
        assert!(e.contains("`tls.key`") && e.contains("does not match"), "{e}");
        // Names listed explicitly override the certificate's, and must be unique.
        let e = refused(
            dir.path(),
            &format!("{base}    - {{ names: [x.test, '*.y.test'], cert: b.crt, key: b.key }}\n    - {{ names: ['*.y.test'], cert: b.crt, key: b.key }}"),
        )
        ;
        assert!(e.contains("`tls.sni[2].names[0]`") && e.contains("already listed in tls.sni[1]"), "{e}");
    }
}
