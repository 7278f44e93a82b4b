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
    /// The certificate files (by their `cert` path) that failed to load at
    /// their last change: a later good read says so.
    failing: Arc<parking_lot::Mutex<std::collections::HashSet<PathBuf>>>,
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
            failing: Default::default(),
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
        let mut failing = self.failing.lock();
        for entry in current.entries() {
            let tenant = entry
                .tenant
                .as_deref()
                .unwrap_or(crate::config::DEFAULT_TENANT);
            let recovered = |failing: &mut std::collections::HashSet<PathBuf>| {
                if failing.remove(&entry.files.cert) {
                    tracing::info!(
                        tenant,
                        cert = %entry.files.cert.display(),
                        "TLS certificate files load again"
                    );
                }
            };
            let reloaded = match read_pair(&entry.files) {
                Ok((_, _, hash)) if hash == entry.hash => {
                    recovered(&mut failing);
                    entry.clone()
                }
                Ok((cert, key, hash)) => match certified_key(&entry.files, &cert, &key) {
                    Ok(k) => {
                        failing.remove(&entry.files.cert);
                        crate::metrics::Metrics::global().reloaded("certificate", true);
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
                        failing.insert(entry.files.cert.clone());
                        log_kept(config, entry, &reason);
                        entry.clone()
                    }
                },
                Err(reason) => {
                    failing.insert(entry.files.cert.clone());
                    log_kept(config, entry, &reason);
                    entry.clone()
                }
            };
            entries.push(reloaded);
        }
        drop(failing);
        if let Some(table) = CertTable::from_entries(config, entries, Some(&current)) {
            self.certificates.table.store(Arc::new(table));
        }
    }

    /// Every certificate and key file now served (the listener's, which a
    /// config reload that turns TLS off does not change until a restart),
    /// to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        self.certificates
            .table
            .load()
            .entries()
            .flat_map(|e| [e.files.cert.clone(), e.files.key.clone()])
            .collect()
    }
}

/// Certificates loaded by [`Tls::prepare`], not yet serving.
#[derive(Debug)]
pub struct PreparedCertificates(Option<CertTable>);

/// Logs that `entry`'s files did not load and its certificate stays. A
/// mismatch of key and certificate is a warning: it is what a rotation
/// shows between writing one file and the other.
fn log_kept(config: &Config, entry: &Loaded, reason: &str) {
    if reason.contains("does not belong to the certificate") {
        tracing::warn!(
            "{}:{}: tls: {reason} (one of the pair not replaced yet?); the certificate loaded \
             before keeps serving",
            config.file.display(),
            entry.files.line
        );
    } else {
        // A mismatch is what every rotation shows between its two renames:
        // only other failures count.
        crate::metrics::Metrics::global().reload_failed(
            "certificate",
            format!(
                "{}:{}: tls: {reason}",
                config.file.display(),
                entry.files.line
            ),
        );
        tracing::error!(
            "{}:{}: tls: {reason}; the certificate loaded before keeps serving",
            config.file.display(),
            entry.files.line
        );
    }
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
                None => match certified_key(files, &cert, &key) {
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
        Ok(CertTable::from_entries(config, entries, previous))
    }

    /// The table of `entries` (the default certificate first), mapping each
    /// tenant's hosts to its own; warns about a certificate that does not
    /// cover one of its tenant's hosts, unless `previous` served the same
    /// certificate for the same hosts (it warned then).
    fn from_entries(
        config: &Config,
        entries: Vec<Arc<Loaded>>,
        previous: Option<&CertTable>,
    ) -> Option<CertTable> {
        let mut entries = entries.into_iter();
        let default = entries.next()?;
        let tenants: Vec<Arc<Loaded>> = entries.collect();
        // Every tenant's hosts, those of a tenant without a certificate
        // mapped to the default one: an exact name of such a tenant must
        // not fall through to another tenant's wildcard, as routing would
        // not either.
        let mut by_host = HostMap::default();
        for settings in &config.tenants {
            let own = tenants
                .iter()
                .find(|e| e.tenant.as_deref() == Some(settings.name.as_str()));
            for host in &settings.hosts {
                match own {
                    Some(entry) => {
                        let warned = previous
                            .and_then(|p| p.by_host.get(host))
                            .is_some_and(|before| before.hash == entry.hash);
                        if !warned {
                            warn_uncovered(config, entry, host);
                        }
                        by_host.insert(host, entry.clone());
                    }
                    None => by_host.insert(host, default.clone()),
                }
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
/// (PEM), read from `files`, checked to belong together; the reason
/// otherwise, naming the file.
fn certified_key(files: &TlsFiles, cert: &[u8], key: &[u8]) -> Result<CertifiedKey, String> {
    let (cert_path, key_path) = (files.cert.display(), files.key.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_path}: {}", pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{cert_path}: no CERTIFICATE block (is it the key, or not PEM?)"
        ));
    }
    if contains(key, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(format!(
            "{key_path}: the private key is encrypted, which is not supported: decrypt it \
             (`openssl pkey -in {key_path} -out plain.key`) and keep the file readable by \
             the gateway only"
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{key_path}: no PRIVATE KEY block (PKCS#8, RSA or EC)")
        }
        e => format!("{key_path}: {}", pem_problem(&e)),
    })?;
    let provider: &CryptoProvider = &rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "the private key in {key_path} does not belong to the certificate in {cert_path} \
             (the first one of the chain)"
        ),
        e => format!("{key_path} with {cert_path}: cannot use them: {e}"),
    })
}

/// What is wrong with a PEM file, in words.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::MissingSectionEnd { .. } => {
            "a PEM block has no END line (a file still being written?)".to_owned()
        }
        Pem::IllegalSectionStart { .. } => "a malformed BEGIN line".to_owned(),
        Pem::Base64Decode(_) => "a PEM block is not valid base64".to_owned(),
        Pem::SectionTooLarge => "a PEM block is over 256 MiB".to_owned(),
        other => format!("not PEM: {other}"),
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
