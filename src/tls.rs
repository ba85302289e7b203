//! TLS for every hop that leaves the machine, on rustls (ring provider): the relay's server
//! configuration from PEM files (its certificate in a [`CertSlot`], so a reload can replace it
//! under running connections), and the edge roles' client configuration that verifies the
//! relay against the system roots or a CA file (one configuration per process, so its session
//! cache resumes TLS sessions on reconnect).

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, both PEM, checked to fit together.
pub fn certified_key(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading TLS key {}", key.display()))?;
    let certified =
        CertifiedKey::from_der(chain, key, &provider()).context("TLS certificate and key do not fit together")?;
    Ok(Arc::new(certified))
}

/// The certificate the relay presents: every handshake reads it, a reload replaces it.
/// Connections already up keep the one they were made with.
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<CertSlot> {
        Arc::new(CertSlot(RwLock::new(key)))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The relay's TLS configuration, presenting whatever `slot` holds.
pub fn server_config(slot: Arc<CertSlot>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    Ok(Arc::new(config))
}

/// The edge roles' TLS configuration: trust `ca` (PEM) if given, else the system's roots.
pub fn client_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in
                CertificateDer::pem_file_iter(path).with_context(|| format!("reading CA file {}", path.display()))?
            {
                roots.add(cert.with_context(|| format!("parsing CA file {}", path.display()))?)?;
            }
            if roots.is_empty() {
                bail!("CA file {} holds no certificate", path.display());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!("no system CA certificates found; give the relay's CA with --ca FILE");
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
