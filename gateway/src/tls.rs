//! TLS termination (`wss://`, RFC 6455 section 3 and RFC 8446): the
//! listener's certificates, which one a ClientHello gets, and reloading them
//! when their files change.
//!
//! - `[server] tls = { cert, key }` turns TLS on for the listener; its
//!   certificate is the default one, served to clients whose SNI (RFC 6066
//!   section 3) names no tenant, or who send none.
//! - `[[tenant]] tls = { cert, key }` is served to clients whose SNI names
//!   one of the tenant's hosts, matched by [`HostMap`] exactly as routing
//!   matches the `Host` header, so the two always agree on the tenant.
//! - ALPN (RFC 7301) offers `http/1.1` only: WebSocket over HTTP/2 (RFC
//!   8441) is not served.
//! - A file that changes is read again and swapped in for new handshakes;
//!   open connections keep the session they negotiated. A file that no
//!   longer loads leaves the certificate it held serving, and the error is
//!   logged with the file and the reason.
//!
//! rustls with the ring provider does the protocol; this module only
//! loads, checks and selects certificates.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsFiles};
use crate::error::Error;
use crate::file::ContentHash;
use crate::routing::hosts::HostMap;

/// ALPN protocol ids offered, in order of preference: HTTP/1.1 only.
const ALPN: &[&[u8]] = &[b"http/1.1"];

/// The listener's TLS: the acceptor handshakes use and the certificates it
/// chooses from.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The TLS of `config`'s listener: `Ok(None)` when `[server]` has no
    /// `tls`; every certificate that cannot be loaded is an error naming
    /// the config line, the file and the reason.
    pub fn new(config: &Config) -> Result<Option<Tls>, Vec<Error>> {
        let Some(table) = CertTable::load(config, None)? else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificates = Arc::new(Certificates {
            table: ArcSwap::from_pointee(table),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                vec![Error::Engine(format!(
                    "cannot set up TLS: the crypto provider supports no safe protocol version ({e})"
                ))]
            })?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Some(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certificates,
        }))
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Loads the certificates of `config` (a reload of the config file) for
    /// the next handshakes; on any error nothing changes and the errors are
    /// returned. Files whose bytes did not change are not parsed again.
    pub fn prepare(&self, config: &Config) -> Result<PreparedCertificates, Vec<Error>> {
        let current = self.certificates.table.load_full();
        match CertTable::load(config, Some(&current))? {
            Some(table) => Ok(PreparedCertificates(Some(table))),
            // TLS turned off in the file: the listener stays TLS until a
            // restart (logged by the reload), with the certificates it has.
            None => Ok(PreparedCertificates(None)),
        }
    }

    /// Serves what [`Tls::prepare`] loaded from now on.
    pub fn install(&self, prepared: PreparedCertificates) {
        if let Some(table) = prepared.0 {
            self.certificates.table.store(Arc::new(table));
        }
    }

    /// Reads the certificate and key files of `config` again after one of
    /// them changed on disk. A pair that loads replaces its certificate; a
    /// pair that does not is logged and its certificate keeps serving.
    pub fn reload_files(&self, config: &Config) {
        let current = self.certificates.table.load_full();
        let mut entries = Vec::new();
        for entry in current.entries() {
            let reloaded = match read_pair(&entry.files) {
                Ok((_, _, hash)) if hash == entry.hash => entry.clone(),
                Ok((cert, key, hash)) => match certified_key(&cert, &key) {
                    Ok(k) => {
                        tracing::info!(
                            tenant = entry.tenant.as_deref().unwrap_or(crate::config::DEFAULT_TENANT),
                            cert = %entry.files.cert.display(),
                            "TLS certificate reloaded: new handshakes get it, open connections keep theirs"
                        );
                        Arc::new(Loaded {
                            key: Arc::new(k),
                            hash,
                            ..(**entry).clone()
                        })
                    }
                    Err(reason) => {
                        log_kept(config, entry, &reason);
                        entry.clone()
                    }
                },
                Err(reason) => {
                    log_kept(config, entry, &reason);
                    entry.clone()
                }
            };
            entries.push(reloaded);
        }
        if let Some(table) = CertTable::from_entries(config, entries) {
            self.certificates.table.store(Arc::new(table));
        }
    }
}

/// Certificates loaded by [`Tls::prepare`], not yet serving.
#[derive(Debug)]
pub struct PreparedCertificates(Option<CertTable>);

fn log_kept(config: &Config, entry: &Loaded, reason: &str) {
    tracing::error!(
        "{}:{}: tls: {reason}; the certificate loaded before keeps serving",
        config.file.display(),
        entry.files.line
    );
}

/// The certificate resolver rustls calls during each handshake: the
/// certificate of the tenant the SNI names, else the default one.
pub struct Certificates {
    table: ArcSwap<CertTable>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table.load();
        f.debug_struct("Certificates")
            .field("default", &table.default.files.cert)
            .field("tenants", &table.tenants.len())
            .finish()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let by_sni = hello
            .server_name()
            .and_then(|name| table.by_host.get(&name.to_ascii_lowercase()));
        Some(by_sni.unwrap_or(&table.default).key.clone())
    }
}

/// One certificate as loaded: its files, the key rustls serves, and the
/// hash of the files' bytes (to skip a reload that changed nothing).
#[derive(Clone)]
struct Loaded {
    /// `None`: the server's default certificate.
    tenant: Option<String>,
    files: TlsFiles,
    key: Arc<CertifiedKey>,
    hash: ContentHash,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("tenant", &self.tenant)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The certificates of one config.
#[derive(Debug)]
struct CertTable {
    default: Arc<Loaded>,
    /// One per tenant with its own certificate, in config order.
    tenants: Vec<Arc<Loaded>>,
    by_host: HostMap<Arc<Loaded>>,
}

impl CertTable {
    /// Loads every certificate `config` names (`None`: no TLS), reusing
    /// those of `previous` whose files hold the same bytes.
    fn load(
        config: &Config,
        previous: Option<&CertTable>,
    ) -> Result<Option<CertTable>, Vec<Error>> {
        let Some(server) = &config.server.tls else {
            return Ok(None);
        };
        let wanted = std::iter::once((None, server)).chain(
            config
                .tenants
                .iter()
                .filter_map(|t| t.tls.as_ref().map(|f| (Some(t.name.clone()), f))),
        );
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for (tenant, files) in wanted {
            let fail = |reason: String| Error::Config {
                file: config.file.clone(),
                line: files.line,
                message: format!("tls: {reason}"),
            };
            let (cert, key, hash) = match read_pair(files) {
                Ok(read) => read,
                Err(reason) => {
                    errors.push(fail(reason));
                    continue;
                }
            };
            let same = previous.and_then(|p| {
                p.entries().find(|e| {
                    e.files.cert == files.cert && e.files.key == files.key && e.hash == hash
                })
            });
            let key = match same {
                Some(e) => e.key.clone(),
                None => match certified_key(&cert, &key) {
                    Ok(k) => Arc::new(k),
                    Err(reason) => {
                        errors.push(fail(reason));
                        continue;
                    }
                },
            };
            entries.push(Arc::new(Loaded {
                tenant,
                files: files.clone(),
                key,
                hash,
            }));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CertTable::from_entries(config, entries))
    }

    /// The table of `entries` (the default certificate first), mapping each
    /// tenant's hosts to its own; warns about a certificate that does not
    /// cover one of its tenant's hosts.
    fn from_entries(config: &Config, entries: Vec<Arc<Loaded>>) -> Option<CertTable> {
        let mut entries = entries.into_iter();
        let default = entries.next()?;
        let tenants: Vec<Arc<Loaded>> = entries.collect();
        let mut by_host = HostMap::default();
        for entry in &tenants {
            let Some(settings) = config
                .tenants
                .iter()
                .find(|t| Some(&t.name) == entry.tenant.as_ref())
            else {
                continue;
            };
            for host in &settings.hosts {
                warn_uncovered(config, entry, host);
                by_host.insert(host, entry.clone());
            }
        }
        Some(CertTable {
            default,
            tenants,
            by_host,
        })
    }

    /// The default certificate, then the tenants' own.
    fn entries(&self) -> impl Iterator<Item = &Arc<Loaded>> {
        std::iter::once(&self.default).chain(&self.tenants)
    }
}

/// Warns when `entry`'s certificate is not valid for `host` (a name of its
/// tenant; for a wildcard, any one label under it): clients checking the
/// name would refuse the handshake.
fn warn_uncovered(config: &Config, entry: &Loaded, host: &str) {
    let probe = match host.strip_prefix("*.") {
        Some(parent) => format!("wasmgate-probe.{parent}"),
        None => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    };
    let Ok(name) = ServerName::try_from(probe.as_str()) else {
        return;
    };
    let Some(leaf) = entry.key.cert.first() else {
        return;
    };
    let covered = webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok());
    if !covered {
        tracing::warn!(
            "{}:{}: tls: {} is not valid for host {host:?} of tenant {}: clients that check the \
             name will refuse the handshake",
            config.file.display(),
            entry.files.line,
            entry.files.cert.display(),
            entry
                .tenant
                .as_deref()
                .unwrap_or(crate::config::DEFAULT_TENANT),
        );
    }
}

/// The bytes of a certificate file and a key file, and their joint hash.
fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>, ContentHash), String> {
    let read = |path: &Path| {
        crate::file::read_regular_file(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    let mut both = Vec::with_capacity(cert.len() + key.len() + 1);
    both.extend_from_slice(&cert);
    both.push(0);
    both.extend_from_slice(&key);
    Ok((cert, key, ContentHash::of(&both)))
}

/// The chain in `cert` (PEM, leaf first) with the private key in `key`
/// (PEM), checked to belong together; the reason otherwise.
fn certified_key(cert: &[u8], key: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file: not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("certificate file: no CERTIFICATE block".to_owned());
    }
    let private = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "key file: no PRIVATE KEY block (PKCS#8, RSA or EC)".to_owned()
        }
        e => format!("key file: not PEM: {e}"),
    })?;
    let provider: &CryptoProvider = &rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not belong to the certificate (the first one in the chain)"
                .to_owned()
        }
        e => format!("cannot use the certificate and key: {e}"),
    })
}

/// The file paths [`Tls`] watches for `config`: every `tls` cert and key.
pub fn files_of(config: &Config) -> Vec<PathBuf> {
    let server = config.server.tls.iter();
    let tenants = config.tenants.iter().filter_map(|t| t.tls.as_ref());
    server
        .chain(tenants)
        .flat_map(|f| [f.cert.clone(), f.key.clone()])
        .collect()
}
