//! HTTP/2 over TLS to backends: BoringSSL (the same library quiche uses) through
//! `tokio-boring` on monoio's poll-io streams. ALPN offers only `h2`; a backend that does not
//! select it is a failed connection. Certificates are verified by default — against the system
//! store, or the pool's `ca` file (read once by config validation, on the control thread) —
//! and the name checked is `server_name` (default: the backend address's host).

use crate::config::UpstreamTls;
use anyhow::Context as _;
use boring::ssl::{SslConnector, SslMethod, SslVerifyMode};
use boring::x509::X509;

/// A pool's TLS client configuration, built once per worker and snapshot.
pub struct TlsUpstream {
    connector: SslConnector,
    /// What it was built from: pools share connections only with the same settings.
    pub config: UpstreamTls,
}

impl TlsUpstream {
    pub fn new(cfg: &UpstreamTls) -> anyhow::Result<Self> {
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        b.set_alpn_protos(b"\x02h2")?;
        match (&cfg.ca, &cfg.ca_pem) {
            (Some(ca), Some(pem)) => {
                for cert in X509::stack_from_pem(&pem.0).with_context(|| format!("parsing CA file {}", ca.display()))? {
                    b.cert_store_mut().add_cert(cert)?;
                }
            }
            (Some(ca), None) => anyhow::bail!("CA file {} was not read by validation", ca.display()),
            (None, _) => b.set_default_verify_paths()?,
        }
        b.set_verify(if cfg.verify { SslVerifyMode::PEER } else { SslVerifyMode::NONE });
        Ok(TlsUpstream { connector: b.build(), config: cfg.clone() })
    }

    /// Wraps a connected stream in TLS to the backend `host`.
    pub async fn handshake<S>(&self, host: &str, io: S) -> Result<tokio_boring::SslStream<S>, String>
    where
        S: monoio::io::poll_io::AsyncRead + monoio::io::poll_io::AsyncWrite + Unpin,
    {
        let name = self.config.server_name.as_deref().unwrap_or(host);
        let mut config = self.connector.configure().map_err(|e| e.to_string())?;
        config.set_verify_hostname(self.config.verify);
        let stream =
            tokio_boring::connect(config, name, io).await.map_err(|e| format!("TLS handshake with {name}: {e}"))?;
        if stream.ssl().selected_alpn_protocol() != Some(b"h2") {
            return Err(format!("{name} did not select ALPN h2"));
        }
        Ok(stream)
    }
}
