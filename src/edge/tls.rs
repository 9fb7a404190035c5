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

    fn ssl_context(&self) -> anyhow::Result<SslContextBuilder> {
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

/// Builds the QUIC + HTTP/3 configuration for one worker.
pub fn quic_config(config: &Config, tls: &TlsMaterial) -> anyhow::Result<quiche::Config> {
    let q = &config.quic;
    let mut c = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, tls.ssl_context()?)?;
    c.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
    c.set_max_idle_timeout(config.timeouts.idle.0.as_millis() as u64);
    c.set_max_recv_udp_payload_size(q.max_udp_payload);
    c.set_max_send_udp_payload_size(q.max_udp_payload);
    c.set_initial_max_data(q.max_data.0);
    c.set_initial_max_stream_data_bidi_remote(q.max_stream_data.0);
    c.set_initial_max_stream_data_bidi_local(q.max_stream_data.0);
    // HTTP/3 needs three unidirectional streams per side (control, QPACK encoder/decoder).
    c.set_initial_max_stream_data_uni(64 * 1024);
    c.set_initial_max_streams_bidi(q.max_concurrent_streams);
    c.set_initial_max_streams_uni(8);
    // Let windows grow to what a fast bulk transfer needs, but no further.
    c.set_max_connection_window(q.max_data.0.max(24 << 20));
    c.set_max_stream_window(q.max_stream_data.0.max(8 << 20));
    c.set_disable_active_migration(true);
    c.set_cc_algorithm_name(&q.congestion_control).map_err(|e| anyhow::anyhow!("congestion control: {e}"))?;
    Ok(c)
}

/// The HTTP/3 configuration for one worker.
pub fn h3_config(config: &Config) -> anyhow::Result<quiche::h3::Config> {
    let mut c = quiche::h3::Config::new()?;
    c.set_max_field_section_size(config.quic.max_header_list_size.0);
    Ok(c)
}
