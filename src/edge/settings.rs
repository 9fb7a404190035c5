//! The `quiche` transport and HTTP/3 settings a worker accepts connections with, built from
//! one configuration snapshot.

use super::tls::TlsMaterial;
use crate::config::Config;

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
    // A stream's window may grow to what a fast bulk upload needs; the connection's never
    // grows past `max_data`, so what quiche buffers of one connection's request bodies (all
    // Spooky has not read yet) stays a configured number (see `bridge::budget`).
    c.set_max_connection_window(q.max_data.0);
    c.set_max_stream_window(q.max_stream_data.0.max(8 << 20));
    c.set_disable_active_migration(!q.active_migration);
    // Spare CIDs a client may hand us, and the size of quiche's path table: with
    // vendor/quiche patch 1 the paths a connection left (and failed ones) are released and
    // their CIDs retired, so this no longer bounds how often a connection can migrate.
    c.set_active_connection_id_limit(8);
    if q.early_data {
        c.enable_early_data();
    }
    // quiche computes each packet's release time; the socket hands it to the qdisc.
    c.enable_pacing(q.pacing);
    c.set_cc_algorithm_name(&q.congestion_control).map_err(|e| anyhow::anyhow!("congestion control: {e}"))?;
    Ok(c)
}

/// The HTTP/3 configuration for one worker.
pub fn h3_config(config: &Config) -> anyhow::Result<quiche::h3::Config> {
    let mut c = quiche::h3::Config::new()?;
    c.set_max_field_section_size(config.quic.max_header_list_size.0);
    Ok(c)
}
