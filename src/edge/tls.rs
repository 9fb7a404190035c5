//! TLS material and the per-worker `quiche` configuration.

use crate::config::Config;
use anyhow::Context as _;
use boring::pkey::PKey;
use boring::ssl::{SslContextBuilder, SslMethod};
use boring::x509::X509;

/// Certificate chain and key in PEM, loaded (or generated) once by the control thread and
/// handed to every worker.
#[derive(Clone)]
pub struct TlsMaterial {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsMaterial {
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let tls = &config.tls;
        if let Some(names) = &tls.self_signed {
            let ck =
                rcgen::generate_simple_self_signed(names.clone()).context("generating a self-signed certificate")?;
            return Ok(TlsMaterial {
                chain_pem: ck.cert.pem().into_bytes(),
                key_pem: ck.signing_key.serialize_pem().into_bytes(),
            });
        }
        let (cert, key) = (tls.cert.as_ref().expect("validated"), tls.key.as_ref().expect("validated"));
        let m = TlsMaterial {
            chain_pem: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        };
        // Fail at load, with the file named, rather than at the first handshake.
        m.ssl_context().with_context(|| format!("tls: certificate {} / key {}", cert.display(), key.display()))?;
        Ok(m)
    }

    /// A BoringSSL context serving this material (the QUIC configuration is built on it).
    pub fn ssl_context(&self) -> anyhow::Result<SslContextBuilder> {
        let mut ctx = SslContextBuilder::new(SslMethod::tls())?;
        let mut chain = X509::stack_from_pem(&self.chain_pem).context("parsing the certificate chain")?.into_iter();
        let leaf = chain.next().context("the certificate file holds no certificate")?;
        ctx.set_certificate(&leaf)?;
        for extra in chain {
            ctx.add_extra_chain_cert(extra)?;
        }
        let key = PKey::private_key_from_pem(&self.key_pem).context("parsing the private key")?;
        ctx.set_private_key(&key)?;
        ctx.check_private_key().context("the private key does not match the certificate")?;
        Ok(ctx)
    }
}
