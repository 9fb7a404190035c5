//! Immutable configuration snapshots: what the control thread broadcasts to workers.

use crate::config::{self, Config};
use crate::edge::settings;
use crate::edge::tls::TlsMaterial;
use crate::transport::tls::TlsUpstream;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    /// The embedded default (nothing to watch or reload).
    Embedded,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => "<embedded default>".into(),
        }
    }
}

/// A validated configuration with everything derived from it that workers need.
pub struct Snapshot {
    /// 1 for the configuration Spooky started with, +1 per applied reload.
    pub version: u64,
    /// First 16 hex digits of the SHA-256 of the file's text.
    pub hash: String,
    /// SHA-256 of the text and of the certificate, key and CA files it names: equal
    /// fingerprints mean a reload would change nothing.
    pub fingerprint: [u8; 32],
    pub source: Source,
    pub loaded_at: SystemTime,
    pub config: Arc<Config>,
    pub tls: TlsMaterial,
}

impl Snapshot {
    /// Reads and validates the whole configuration, and loads its certificate and key.
    /// The error names the file, the key and the problem.
    pub fn load(source: &Source, version: u64) -> Result<Snapshot, String> {
        match source {
            Source::File(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Snapshot::from_text(&text, source, &base, version)
            }
            Source::Embedded => Snapshot::from_text(config::DEFAULT_CONFIG_YAML, source, Path::new("."), version),
        }
    }

    /// Validates `text` as the configuration from `source` (relative paths resolve against
    /// `base`), loads its TLS material and builds once everything a worker builds from it, so
    /// that a snapshot accepted here cannot fail on a worker: a reload is all or nothing.
    pub fn from_text(text: &str, source: &Source, base: &Path, version: u64) -> Result<Snapshot, String> {
        let name = source.describe();
        let config = config::parse(text, &name, base).map_err(|e| e.to_string())?;
        let tls = TlsMaterial::load(&config).map_err(|e| format!("{name}: {e}"))?;
        settings::quic_config(&config, &tls).map_err(|e| format!("{name}: `quic`: {e:#}"))?;
        settings::h3_config(&config).map_err(|e| format!("{name}: `quic`: {e:#}"))?;
        for (pool, u) in &config.upstreams {
            if let Some(t) = &u.tls {
                TlsUpstream::new(t).map_err(|e| format!("{name}: `upstreams.{pool}.tls`: {e:#}"))?;
            }
        }
        let hash = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
        let mut fp = Sha256::new();
        fp.update(text.as_bytes());
        // Files may change under an unchanged config: they count. (A self-signed certificate
        // is new on every load and is not worth a reload by itself.)
        for file in tls.files() {
            fp.update(file);
        }
        for ca in config.upstreams.values().filter_map(|u| u.tls.as_ref()?.ca_pem.as_ref()) {
            fp.update(&ca.0);
        }
        Ok(Snapshot {
            version,
            hash,
            fingerprint: fp.finalize().into(),
            source: source.clone(),
            loaded_at: SystemTime::now(),
            config: Arc::new(config),
            tls,
        })
    }

    /// Why `next` cannot be applied to a running Spooky, if it changes what needs new sockets
    /// or threads.
    pub fn restart_needed(&self, next: &Snapshot) -> Option<String> {
        let (a, b) = (&self.config, &next.config);
        if a.listen != b.listen {
            return Some("`listen` changed: new sockets need a restart".into());
        }
        if a.workers.resolve() != b.workers.resolve() || a.pin_workers != b.pin_workers {
            return Some("`workers`/`pin_workers` changed: new worker threads need a restart".into());
        }
        if a.admin.listen != b.admin.listen {
            return Some("`admin.listen` changed: a new admin socket needs a restart".into());
        }
        let (qa, qb) = (&a.quic, &b.quic);
        // Socket options, the CID layout and the keys of live connections' resets are fixed
        // for the life of the process.
        if (qa.gso, qa.gro, qa.pacing, qa.reuseport_bpf) != (qb.gso, qb.gro, qb.pacing, qb.reuseport_bpf)
            || (qa.server_id, qa.cid_rotation) != (qb.server_id, qb.cid_rotation)
            || qa.secret_key_file != qb.secret_key_file
        {
            return Some(
                "`quic.gso`, `gro`, `pacing`, `reuseport_bpf`, `server_id`, `cid_rotation` or `secret_key_file` changed: \
                 these need a restart"
                    .into(),
            );
        }
        None
    }
}
