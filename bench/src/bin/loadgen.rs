//! The load generator: drives any `ws://` echo endpoint and prints one JSON
//! line of results. Its client is hand-rolled (pre-built masked frames, no
//! per-message allocation) so that it is not the bottleneck.
//!
//! Modes:
//! - `echo`: N connections, each keeping K messages of S bytes in flight for
//!   a duration; msgs/s, MB/s, p50/p99/p999 round-trip latency, errors.
//!   With `--rate R`, the connections send R messages a second in all, one
//!   at a time each, at an even pace: latency at a set load rather than at
//!   saturation.
//! - `setup`: connections per second, each one opened, handshaken, used for
//!   one echo and closed, by C concurrent workers.
//! - `idle`: opens N connections that stay idle and reports the server's RSS
//!   growth per connection (read from /proc/PID/status).
//! - `reload`: echo load on N connections while the plugin file the route
//!   serves is replaced (renamed over) several times, alternating two
//!   plugins; reports throughput, p99, errors (lost or failed messages) and,
//!   per swap, the time from the rename to the first new connection served
//!   by the new version (told apart by their answer to a text `id`).
//! - `attack`: N connections, each sending one text command (to a test
//!   plugin: `spin`, `flood-self 1000000`...) and waiting for an answer or
//!   the close, then reconnecting, for a duration; reports attacks made.
//!   Run beside `echo` (with `--host` naming another tenant) to measure a
//!   neighbour's latency under attack.
//! - `cert`: writes a self-signed certificate and key for `localhost`
//!   (`DIR/server.pem`, `DIR/server.key`) for the TLS scenarios.
//!
//! With `--tls`, every mode connects over TLS (`wss://`, SNI `localhost`,
//! ALPN http/1.1) and accepts any certificate: the benchmark measures the
//! servers, not certificate checks.
//!
//! With `--deflate`, every connection offers permessage-deflate (RFC 7692,
//! leaving context takeover to the server) and, where the server accepts,
//! sends its messages compressed, each one on its own (compressed once,
//! ahead of the measurement: a message that refers to no earlier one is
//! valid whatever was agreed); `echo` and `idle --message` messages are then text that
//! compresses about 14:1 (1 KiB to 72 bytes at level 1).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:9100")]
    addr: SocketAddr,
    /// Request path of the echo endpoint.
    #[arg(long, default_value = "/echo")]
    path: String,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// The server's process id: when given, the server's CPU time (user +
    /// system, all threads) over the measured window is reported per
    /// message, connection or delivery.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The `Host` header to send (default: the address): picks the tenant
    /// on a gateway with `[[tenant]]`s.
    #[arg(long)]
    host: Option<String>,
    /// Connect over TLS (SNI `localhost`, any certificate accepted).
    #[arg(long)]
    tls: bool,
    /// Offer permessage-deflate and compress what is sent when accepted.
    #[arg(long)]
    deflate: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Round trips on N connections with K messages in flight each.
    Echo {
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        /// Measured seconds (after one second of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Messages per second over all connections, each connection
        /// sending one at a time at an even pace (`--inflight` is then 1);
        /// 0: as fast as answers come back (a closed loop, which runs the
        /// server at saturation).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Connection setup rate.
    Setup {
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Fan-out: one sender and M receivers in one room (the server must
    /// send every message to every other member).
    Broadcast {
        #[arg(long, default_value_t = 1000)]
        members: usize,
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Messages the sender keeps in flight (counted at one receiver).
        #[arg(long, default_value_t = 16)]
        inflight: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Fan-out across gateway nodes: one sender on the first of `nodes`,
    /// `members` receivers spread over all of them in turn, all in one
    /// room. A message is complete when every member has it; the sender
    /// keeps `inflight` messages incomplete at a time. Reports deliveries
    /// per second and the time from a send to its last delivery.
    Fanout {
        /// The nodes' addresses (default: `--addr` alone).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Payload bytes (at least 16: a sequence number and a send time).
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        inflight: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Every process whose CPU time counts (the nodes, Redis).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
    /// Echo load while the route's plugin file is replaced.
    Reload {
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The plugin file the gateway serves (replaced by renames).
        #[arg(long)]
        file: std::path::PathBuf,
        /// The two plugins to alternate (both echo binary messages, and
        /// answer a text `id` differently).
        #[arg(long, num_args = 2)]
        plugins: Vec<std::path::PathBuf>,
        #[arg(long, default_value_t = 10)]
        swaps: usize,
    },
    /// Server memory per idle connection.
    /// Hostile connections sending `command` again and again.
    Attack {
        #[arg(long)]
        command: String,
        #[arg(long, default_value_t = 2)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Write a self-signed certificate for `localhost` into DIR.
    Cert {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// The server's process id.
        #[arg(long)]
        pid: u32,
        /// Keep the connections open this many seconds after measuring.
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Each connection first sends one text message of this many bytes
        /// and reads its echo (0: none), so that what a used connection
        /// keeps is measured.
        #[arg(long, default_value_t = 0)]
        message: usize,
        /// Seconds between the last connection opening and measuring: long
        /// enough for the server to settle (tasks started, buffers sized,
        /// and with hibernation, instances released and freed memory
        /// returned to the system).
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
}

/// The `Host` header every connection sends (`--host`), if set.
static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A masked client frame (FIN set) carrying `payload`.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x1f, 0x8b, 0x3c, 0x5d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The TLS client every connection uses (`--tls`), if set.
static TLS: std::sync::OnceLock<TlsConnector> = std::sync::OnceLock::new();

/// A client connection: plain TCP or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A certificate verifier that accepts any certificate (the benchmark's
/// own, self-signed), still checking handshake signatures.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `--tls` client: ring, safe defaults, ALPN http/1.1, any certificate.
fn tls_connector() -> anyhow::Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Writes a self-signed certificate for `localhost` and its key.
fn write_cert(dir: &std::path::Path) -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("server.pem"), cert.cert.pem())?;
    std::fs::write(dir.join("server.key"), cert.signing_key.serialize_pem())?;
    Ok(())
}

/// Whether connections offer permessage-deflate (`--deflate`).
static DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A text payload of `size` bytes that compresses about 14:1 (words from a
/// small vocabulary in a repeating but irregular order).
fn text_payload(size: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "gateway ", "message ", "room ", "hello ", "plugin ", "wasm ", "event ", "tenant ",
    ];
    let mut out = Vec::with_capacity(size + 8);
    let mut i = 0usize;
    while out.len() < size {
        out.extend_from_slice(WORDS[(i * 7 + i / 5) % WORDS.len()].as_bytes());
        i += 1;
    }
    out.truncate(size);
    out
}

/// `payload` as one permessage-deflate message (raw DEFLATE, sync flush,
/// without the final 4 bytes).
fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::new(1), false, 15);
    let mut out = Vec::with_capacity(payload.len() + 64);
    let _ = z.compress_vec(payload, &mut out, flate2::FlushCompress::Sync);
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

/// A masked client frame for a text message of `payload`: compressed (RSV1)
/// when the connection agreed on permessage-deflate.
fn text_frame(payload: &[u8], compressed: bool) -> Vec<u8> {
    if compressed {
        let mut frame = client_frame(0x1, &deflate(payload));
        frame[0] |= 0x40;
        frame
    } else {
        client_frame(0x1, payload)
    }
}

/// Opens a WebSocket connection; returns the stream and any bytes read past
/// the handshake.
async fn open(addr: SocketAddr, path: &str) -> anyhow::Result<(Conn, Vec<u8>)> {
    open_negotiated(addr, path)
        .await
        .map(|(s, buf, _)| (s, buf))
}

/// [`open`], and whether permessage-deflate was agreed.
async fn open_negotiated(addr: SocketAddr, path: &str) -> anyhow::Result<(Conn, Vec<u8>, bool)> {
    let tcp = TcpStream::connect(addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let mut s = match TLS.get() {
        None => Conn::Plain(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            Conn::Tls(Box::new(
                tls.connect(name, tcp).await.context("TLS handshake")?,
            ))
        }
    };
    let host = HOST.get().cloned().unwrap_or_else(|| addr.to_string());
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
        if DEFLATE.load(std::sync::atomic::Ordering::Relaxed) {
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        } else {
            ""
        }
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                bail!("upgrade refused: {}", String::from_utf8_lossy(&buf[..i]));
            }
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let agreed = head.contains("\r\nsec-websocket-extensions: permessage-deflate");
            return Ok((s, buf[i + 4..].to_vec(), agreed));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed during handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes complete server frames off the front of `buf`; returns how many
/// data frames (text or binary) were removed.
fn take_frames(buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    let mut data = 0;
    take_payloads(buf, |_| data += 1)?;
    Ok(data)
}

/// Echo load on N connections: one `echo_conn` task each, measured after
/// one second of warm-up for `seconds`.
struct EchoLoad {
    measure_from: Instant,
    tasks: Vec<tokio::task::JoinHandle<ConnResult>>,
    cpu: CpuWindow,
}

impl EchoLoad {
    fn start(args: &Args, conns: usize, size: usize, inflight: usize, seconds: u64) -> EchoLoad {
        let (addr, path) = (args.addr, &args.path);
        EchoLoad::spawn(args, conns, seconds, |_, measure_from, until| {
            echo_conn(addr, path.clone(), size, inflight, measure_from, until)
        })
    }

    /// Like [`EchoLoad::start`] with one message in flight per connection,
    /// but sent at `rate` a second over all connections, each connection
    /// pacing its own share, their phases spread evenly: the server is
    /// loaded to a set rate instead of to saturation, which is where tail
    /// latency is meaningful.
    fn paced(args: &Args, conns: usize, size: usize, rate: u64, seconds: u64) -> EchoLoad {
        let (addr, path) = (args.addr, &args.path);
        let every = Duration::from_secs_f64(conns as f64 / rate as f64);
        EchoLoad::spawn(args, conns, seconds, |i, measure_from, until| {
            let phase = every.mul_f64(i as f64 / conns as f64);
            paced_conn(addr, path.clone(), size, every, phase, measure_from, until)
        })
    }

    /// `conns` tasks of `conn(index, measure_from, until)`, measured for
    /// `seconds` after one second of warm-up.
    fn spawn<F>(
        args: &Args,
        conns: usize,
        seconds: u64,
        conn: impl Fn(usize, Instant, Instant) -> F,
    ) -> EchoLoad
    where
        F: std::future::Future<Output = ConnResult> + Send + 'static,
    {
        let measure_from = Instant::now() + Duration::from_secs(1);
        let until = measure_from + Duration::from_secs(seconds);
        let tasks = (0..conns)
            .map(|i| tokio::spawn(conn(i, measure_from, until)))
            .collect();
        EchoLoad {
            measure_from,
            tasks,
            cpu: CpuWindow::start(args.server_pid, measure_from, until),
        }
    }

    /// Every round trip's latency in ns, sorted, the errors, and the
    /// server's CPU seconds over the measured window (with `--server-pid`).
    async fn finish(self) -> anyhow::Result<(Vec<u64>, u64, Option<f64>)> {
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in self.tasks {
            let r = t.await?;
            latencies.extend(r.latencies);
            errors += r.errors;
        }
        latencies.sort_unstable();
        Ok((latencies, errors, self.cpu.seconds().await))
    }
}

#[derive(Default)]
struct ConnResult {
    latencies: Vec<u64>,
    errors: u64,
}

impl ConnResult {
    /// A connection that could not open: one error.
    fn failed() -> ConnResult {
        ConnResult {
            latencies: Vec::new(),
            errors: 1,
        }
    }
}

/// An echo connection: the stream, its read buffer, and the frame of `size`
/// bytes it sends: binary, or with `--deflate` compressible text, compressed
/// if the server agreed.
async fn open_echo(
    addr: SocketAddr,
    path: &str,
    size: usize,
) -> anyhow::Result<(Conn, Vec<u8>, Vec<u8>)> {
    let (s, buf, agreed) = open_negotiated(addr, path).await?;
    if DEFLATE.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok((s, buf, text_frame(&text_payload(size), agreed)));
    }
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    Ok((s, buf, client_frame(0x2, &payload)))
}

async fn echo_conn(
    addr: SocketAddr,
    path: String,
    size: usize,
    inflight: usize,
    measure_from: Instant,
    until: Instant,
) -> ConnResult {
    let Ok((mut s, mut buf, frame)) = open_echo(addr, &path, size).await else {
        return ConnResult::failed();
    };
    let mut result = ConnResult::default();
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(inflight);
    let mut out = Vec::with_capacity(frame.len() * inflight);
    for _ in 0..inflight {
        out.extend_from_slice(&frame);
        sent.push_back(Instant::now());
    }
    if s.write_all(&out).await.is_err() {
        result.errors += 1;
        return result;
    }
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match tokio::time::timeout_at(until.into(), s.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                result.errors += 1;
                break;
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let got = match take_frames(&mut buf) {
            Ok(g) => g,
            Err(_) => {
                result.errors += 1;
                break;
            }
        };
        let now = Instant::now();
        out.clear();
        for _ in 0..got {
            if let Some(t) = sent.pop_front() {
                if t >= measure_from {
                    result.latencies.push((now - t).as_nanos() as u64);
                }
            }
            if now < until {
                out.extend_from_slice(&frame);
                sent.push_back(now);
            }
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            result.errors += 1;
            break;
        }
    }
    let _ = s
        .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await;
    result
}

/// One connection sending a message every `every` (from `phase` after it
/// opened), each when the previous one has been answered or when it is
/// due, whichever is later; latency from sending to the answer.
async fn paced_conn(
    addr: SocketAddr,
    path: String,
    size: usize,
    every: Duration,
    phase: Duration,
    measure_from: Instant,
    until: Instant,
) -> ConnResult {
    let Ok((mut s, mut buf, frame)) = open_echo(addr, &path, size).await else {
        return ConnResult::failed();
    };
    let mut result = ConnResult::default();
    let mut chunk = vec![0u8; 64 << 10];
    let mut due = Instant::now() + phase;
    'messages: while due < until {
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        if s.write_all(&frame).await.is_err() {
            result.errors += 1;
            break;
        }
        loop {
            let n = match tokio::time::timeout_at(until.into(), s.read(&mut chunk)).await {
                Err(_) => break 'messages,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    result.errors += 1;
                    break 'messages;
                }
                Ok(Ok(n)) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            match take_frames(&mut buf) {
                Ok(0) => continue,
                Ok(_) => break,
                Err(_) => {
                    result.errors += 1;
                    break 'messages;
                }
            }
        }
        if sent >= measure_from {
            result.latencies.push(sent.elapsed().as_nanos() as u64);
        }
        due += every;
    }
    let _ = s
        .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await;
    result
}

/// Which of the two plugins serves a new connection: echo answers a text
/// `id` with `id`, testkit with `ok <its id>`.
async fn answer_to_id(addr: SocketAddr, path: &str) -> anyhow::Result<bool> {
    Ok(raw_answer_to_id(addr, path).await? == b"id")
}

/// A new connection's answer to a text `id`.
async fn raw_answer_to_id(addr: SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
    let (mut s, mut buf) = open(addr, path).await?;
    s.write_all(&client_frame(0x1, b"id")).await?;
    let mut chunk = [0u8; 1024];
    loop {
        if buf.len() >= 2 && buf.len() >= 2 + (buf[1] & 0x7F) as usize && buf[1] & 0x7F < 126 {
            let len = (buf[1] & 0x7F) as usize;
            let answer = buf[2..2 + len].to_vec();
            let _ = s
                .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
                .await;
            return Ok(answer);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .context("no answer to id")??;
        if n == 0 {
            bail!("closed before answering id");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Takes every complete frame from `buf`, calling `data` with the payload
/// of each data frame (server frames are not masked).
fn take_payloads(buf: &mut Vec<u8>, mut data: impl FnMut(&[u8])) -> anyhow::Result<()> {
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            break;
        }
        let (hdr, len) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (10, u64::from_be_bytes(n) as usize)
            }
            126 | 127 => break,
            n => (2, n as usize),
        };
        if b.len() < hdr + len {
            break;
        }
        match b[0] & 0x0F {
            0x1 | 0x2 => data(&b[hdr..hdr + len]),
            0x8 => bail!("server closed the connection"),
            _ => {}
        }
        pos += hdr + len;
    }
    buf.drain(..pos);
    Ok(())
}

/// Messages of the fan-out scenario in flight, by sequence number.
struct Pending {
    slots: Vec<(u64, usize, Instant)>,
    /// Send-to-last-delivery times of messages sent in the measured window,
    /// in ns.
    latencies: Vec<u64>,
    measure_from: Instant,
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    args: &Args,
    nodes: &[SocketAddr],
    members: usize,
    size: usize,
    inflight: usize,
    seconds: u64,
    pids: &[u32],
) -> anyhow::Result<serde_json::Value> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let nodes: Vec<SocketAddr> = if nodes.is_empty() {
        vec![args.addr]
    } else {
        nodes.to_vec()
    };
    let size = size.max(16);
    let ring = inflight.next_power_of_two().max(64) * 4;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(2);
    let until = measure_from + Duration::from_secs(seconds);
    let pending = Arc::new(Mutex::new(Pending {
        slots: vec![(u64::MAX, 0, start); ring],
        latencies: Vec::new(),
        measure_from,
    }));
    let delivered = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut receivers = Vec::new();
    for i in 0..members {
        let (mut s, mut buf) = open(nodes[i % nodes.len()], &args.path).await?;
        let (pending, delivered, errors, done) = (
            pending.clone(),
            delivered.clone(),
            errors.clone(),
            done_tx.clone(),
        );
        receivers.push(tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let now = Instant::now();
                let mut p = pending.lock().unwrap();
                let r = take_payloads(&mut buf, |payload| {
                    let seq = u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8]));
                    if now >= p.measure_from {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    let n = p.slots.len();
                    let slot = &mut p.slots[(seq % n as u64) as usize];
                    if slot.0 == seq {
                        slot.1 -= 1;
                        if slot.1 == 0 {
                            let sent = slot.2;
                            slot.0 = u64::MAX;
                            if sent >= p.measure_from {
                                p.latencies.push((now - sent).as_nanos() as u64);
                            }
                            let _ = done.send(());
                        }
                    }
                });
                drop(p);
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }));
    }
    drop(done_tx);
    let (mut sender, _) = open(nodes[0], &args.path).await?;
    // Let every node learn every membership before the first send.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The processes named, or else --server-pid.
    let pids: Vec<u32> = if pids.is_empty() {
        args.server_pid.into_iter().collect()
    } else {
        pids.to_vec()
    };
    let cpu: Vec<CpuWindow> = pids
        .iter()
        .map(|&pid| CpuWindow::start(Some(pid), measure_from, until))
        .collect();
    let mut seq = 0u64;
    let mut payload = vec![b'x'; size];
    let mut send = |seq: u64, pending: &Mutex<Pending>| {
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        let mut p = pending.lock().unwrap();
        let n = p.slots.len();
        p.slots[(seq % n as u64) as usize] = (seq, members, Instant::now());
        client_frame(0x2, &payload)
    };
    for _ in 0..inflight {
        let frame = send(seq, &pending);
        seq += 1;
        sender.write_all(&frame).await?;
    }
    let mut stalled = 0;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(2), done_rx.recv()).await {
            Ok(Some(())) => {
                let frame = send(seq, &pending);
                seq += 1;
                sender.write_all(&frame).await?;
            }
            Ok(None) => break,
            // A message some member never got (dropped on the way): count
            // it and send another, so the window does not shrink.
            Err(_) => {
                stalled += 1;
                let frame = send(seq, &pending);
                seq += 1;
                sender.write_all(&frame).await?;
            }
        }
    }
    let total = delivered.load(Ordering::Relaxed);
    for r in receivers {
        r.abort();
    }
    let mut cpu_s = (!pids.is_empty()).then_some(0.0);
    for c in cpu {
        cpu_s = match (cpu_s, c.seconds().await) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
    let mut lat = std::mem::take(&mut pending.lock().unwrap().latencies);
    lat.sort_unstable();
    Ok(serde_json::json!({
        "label": args.label, "mode": "fanout", "nodes": nodes.len(), "members": members,
        "size": size, "inflight": inflight,
        "deliveries_per_s": (total as f64 / seconds as f64).round(),
        "messages_per_s": (lat.len() as f64 / seconds as f64).round(),
        "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99),
        "server_cpu_us_per_delivery": cpu_us_per(cpu_s, total as f64),
        "stalled": stalled, "errors": errors.load(Ordering::Relaxed),
    }))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The server's CPU time over a window, sampled by a task of its own.
struct CpuWindow(Option<tokio::task::JoinHandle<Option<f64>>>);

impl CpuWindow {
    /// Samples `pid`'s CPU time at `from` and at `until` (nothing without a
    /// pid).
    fn start(pid: Option<u32>, from: Instant, until: Instant) -> CpuWindow {
        CpuWindow(pid.map(|pid| {
            tokio::spawn(async move {
                tokio::time::sleep_until(from.into()).await;
                let before = cpu_seconds(pid)?;
                tokio::time::sleep_until(until.into()).await;
                Some(cpu_seconds(pid)? - before)
            })
        }))
    }

    /// CPU seconds the server used in the window.
    async fn seconds(self) -> Option<f64> {
        self.0?.await.ok().flatten()
    }
}

/// Microseconds of server CPU per unit of work, rounded to 0.01.
fn cpu_us_per(cpu: Option<f64>, units: f64) -> Option<f64> {
    cpu.filter(|_| units > 0.0)
        .map(|s| (s * 1e6 / units * 100.0).round() / 100.0)
}

/// User + system CPU time of every thread of `pid` so far, in seconds
/// (fields 14 and 15 of /proc/PID/stat, in USER_HZ ticks: 100 per second
/// on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `kB` field of a /proc file of `pid`.
fn proc_kib(pid: u32, file: &str, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/{file}"))
}

/// Resident set size: every mapped page, shared pages once per mapping.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// Proportional set size: shared pages divided among their mappings (the
/// copy-on-write module image every plugin instance maps counts once).
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_kib(pid, "smaps_rollup", "Pss:")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(h) = &args.host {
        let _ = HOST.set(h.clone());
    }
    if let Mode::Cert { dir } = &args.mode {
        write_cert(dir)?;
        return Ok(());
    }
    if args.tls {
        let _ = TLS.set(tls_connector()?);
    }
    DEFLATE.store(args.deflate, std::sync::atomic::Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let line = rt.block_on(run(&args))?;
    println!("{line}");
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    match args.mode {
        Mode::Cert { .. } => bail!("`cert` writes files and prints nothing"),
        Mode::Echo {
            conns,
            size,
            inflight,
            seconds,
            rate,
        } => {
            let load = if rate > 0 {
                EchoLoad::paced(args, conns, size, rate, seconds)
            } else {
                EchoLoad::start(args, conns, size, inflight, seconds)
            };
            let (latencies, errors, cpu) = load.finish().await?;
            let msgs = latencies.len() as f64 / seconds as f64;
            Ok(serde_json::json!({
                "label": args.label, "mode": "echo", "conns": conns, "size": size, "inflight": inflight,
                "rate": rate,
                "seconds": seconds, "msgs_per_s": msgs.round(),
                "server_cpu_us_per_msg": cpu_us_per(cpu, latencies.len() as f64),
                "mb_per_s": (msgs * size as f64 / 1e6 * 100.0).round() / 100.0,
                "p50_us": percentile(&latencies, 0.50), "p99_us": percentile(&latencies, 0.99),
                "p999_us": percentile(&latencies, 0.999), "errors": errors,
            }))
        }
        Mode::Attack {
            ref command,
            conns,
            seconds,
        } => {
            let until = Instant::now() + Duration::from_secs(seconds);
            let frame = client_frame(0x1, command.as_bytes());
            let tasks: Vec<_> = (0..conns)
                .map(|_| {
                    let (addr, path, frame) = (args.addr, args.path.clone(), frame.clone());
                    tokio::spawn(async move {
                        let mut attacks = 0u64;
                        let mut chunk = [0u8; 16 << 10];
                        while Instant::now() < until {
                            let attack = async {
                                let (mut s, mut buf) = open(addr, &path).await?;
                                s.write_all(&frame).await?;
                                // Until the server closes, or answers `ok`
                                // or `err` (a flood before it is drained),
                                // or the run ends.
                                let left = until.saturating_duration_since(Instant::now());
                                let _ = tokio::time::timeout(left, async {
                                    loop {
                                        let n = s.read(&mut chunk).await?;
                                        if n == 0 {
                                            break;
                                        }
                                        buf.extend_from_slice(&chunk[..n]);
                                        let answered = buf.windows(4).any(|w| {
                                            w[0] == 0x81 && (w[2..4] == *b"ok" || w[2..4] == *b"er")
                                        });
                                        if take_frames(&mut buf).is_err() || answered {
                                            break;
                                        }
                                    }
                                    anyhow::Ok(())
                                })
                                .await;
                                anyhow::Ok(())
                            };
                            // A steady attack, not a reconnect loop that
                            // would measure the attacking client's own CPU
                            // use on a small machine.
                            let pause = if attack.await.is_ok() { 10 } else { 50 };
                            attacks += 1;
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        attacks
                    })
                })
                .collect();
            let mut attacks = 0;
            for t in tasks {
                attacks += t.await?;
            }
            Ok(serde_json::json!({
                "label": args.label, "mode": "attack", "command": command, "conns": conns,
                "seconds": seconds, "attacks": attacks,
            }))
        }
        Mode::Setup {
            concurrency,
            seconds,
        } => {
            let until = Instant::now() + Duration::from_secs(seconds);
            let cpu = CpuWindow::start(args.server_pid, Instant::now(), until);
            let frame = client_frame(0x2, b"ping-pong-32-bytes-of-payload!!!");
            let close = client_frame(0x8, &1000u16.to_be_bytes());
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (addr, path, frame, close) =
                        (args.addr, args.path.clone(), frame.clone(), close.clone());
                    tokio::spawn(async move {
                        let (mut done, mut errors) = (0u64, 0u64);
                        let mut chunk = [0u8; 4096];
                        while Instant::now() < until {
                            let ok = async {
                                let (mut s, mut buf) = open(addr, &path).await?;
                                s.write_all(&frame).await?;
                                while take_frames(&mut buf)? == 0 {
                                    let n = s.read(&mut chunk).await?;
                                    if n == 0 {
                                        bail!("eof");
                                    }
                                    buf.extend_from_slice(&chunk[..n]);
                                }
                                s.write_all(&close).await?;
                                // Wait for the server's close and EOF. Over
                                // TLS a server that closes the TCP
                                // connection without a close_notify (the
                                // baseline) ends it as cleanly.
                                loop {
                                    match s.read(&mut chunk).await {
                                        Ok(0) => break,
                                        Ok(_) => {}
                                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                                            break
                                        }
                                        Err(e) => return Err(e.into()),
                                    }
                                }
                                anyhow::Ok(())
                            }
                            .await;
                            match ok {
                                Ok(()) => done += 1,
                                Err(_) => errors += 1,
                            }
                        }
                        (done, errors)
                    })
                })
                .collect();
            let (mut done, mut errors) = (0, 0);
            for t in tasks {
                let (d, e) = t.await?;
                done += d;
                errors += e;
            }
            Ok(serde_json::json!({
                "label": args.label, "mode": "setup", "concurrency": concurrency,
                "conns_per_s": (done as f64 / seconds as f64).round(), "errors": errors,
                "server_cpu_us_per_conn": cpu_us_per(cpu.seconds().await, done as f64),
            }))
        }
        Mode::Broadcast {
            members,
            size,
            inflight,
            seconds,
        } => {
            use std::sync::atomic::{AtomicU64, Ordering};
            use std::sync::Arc;
            let delivered = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let (tick_tx, mut tick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
            let mut receivers = Vec::new();
            for i in 0..members {
                let (mut s, mut buf) = open(args.addr, &args.path).await?;
                let (delivered, errors) = (delivered.clone(), errors.clone());
                let tick = (i == 0).then(|| tick_tx.clone());
                receivers.push(tokio::spawn(async move {
                    let mut chunk = vec![0u8; 64 << 10];
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        match take_frames(&mut buf) {
                            Ok(got) => {
                                delivered.fetch_add(got as u64, Ordering::Relaxed);
                                if let Some(t) = &tick {
                                    for _ in 0..got {
                                        let _ = t.send(());
                                    }
                                }
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }));
            }
            drop(tick_tx);
            let (mut sender, _) = open(args.addr, &args.path).await?;
            let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            let frame = client_frame(0x2, &payload);
            let start = Instant::now();
            let measure_from = start + Duration::from_secs(1);
            let until = measure_from + Duration::from_secs(seconds);
            let cpu = CpuWindow::start(args.server_pid, measure_from, until);
            for _ in 0..inflight {
                sender.write_all(&frame).await?;
            }
            let mut first: Option<u64> = None;
            while Instant::now() < until {
                match tokio::time::timeout_at(until.into(), tick_rx.recv()).await {
                    Ok(Some(())) => sender.write_all(&frame).await?,
                    Ok(None) => break,
                    Err(_) => break,
                }
                if first.is_none() && Instant::now() >= measure_from {
                    first = Some(delivered.load(Ordering::Relaxed));
                }
            }
            let total = delivered.load(Ordering::Relaxed) - first.unwrap_or(0);
            for r in receivers {
                r.abort();
            }
            Ok(serde_json::json!({
                "label": args.label, "mode": "broadcast", "members": members, "size": size,
                "inflight": inflight, "deliveries_per_s": (total as f64 / seconds as f64).round(),
                "server_cpu_us_per_delivery": cpu_us_per(cpu.seconds().await, total as f64),
                "errors": errors.load(Ordering::Relaxed),
            }))
        }
        Mode::Fanout {
            ref nodes,
            members,
            size,
            inflight,
            seconds,
            ref pids,
        } => fanout(args, nodes, members, size, inflight, seconds, pids).await,
        Mode::Reload {
            conns,
            size,
            seconds,
            ref file,
            ref plugins,
            swaps,
        } => {
            let load = EchoLoad::start(args, conns, size, 1, seconds);
            let measure_from = load.measure_from;
            // Swaps spread over the measured window.
            let every = Duration::from_secs(seconds) / (swaps as u32 + 1);
            let mut swap_ms = Vec::new();
            let bytes: Vec<Vec<u8>> = plugins
                .iter()
                .map(std::fs::read)
                .collect::<Result<_, _>>()
                .context("read the plugins to swap")?;
            let before = answer_to_id(args.addr, &args.path).await?;
            let mut last = before;
            for i in 0..swaps {
                tokio::time::sleep_until((measure_from + every * (i as u32 + 1)).into()).await;
                let tmp = file.with_extension("swap.tmp");
                std::fs::write(&tmp, &bytes[(i + 1) % bytes.len()])?;
                let renamed = Instant::now();
                std::fs::rename(&tmp, file)?;
                loop {
                    let now = answer_to_id(args.addr, &args.path).await?;
                    if now != last {
                        last = now;
                        break;
                    }
                    if renamed.elapsed() > Duration::from_secs(10) {
                        bail!("swap {i}: the new version never served");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                swap_ms.push(renamed.elapsed().as_secs_f64() * 1000.0);
            }
            let (latencies, errors, _) = load.finish().await?;
            swap_ms.sort_by(f64::total_cmp);
            let msgs = latencies.len() as f64 / seconds as f64;
            Ok(serde_json::json!({
                "label": args.label, "mode": "reload", "conns": conns, "size": size,
                "swaps": swap_ms.len(), "msgs_per_s": msgs.round(),
                "p50_us": percentile(&latencies, 0.50), "p99_us": percentile(&latencies, 0.99),
                "errors": errors,
                "swap_to_served_ms_median": (swap_ms.get(swap_ms.len() / 2).copied().unwrap_or(0.0) * 10.0).round() / 10.0,
                "swap_to_served_ms_max": (swap_ms.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
            }))
        }
        Mode::Idle {
            conns,
            pid,
            hold,
            settle,
            message,
        } => {
            let before = rss_kib(pid)?;
            let pss_before = pss_kib(pid)?;
            let mut open_conns = Vec::with_capacity(conns);
            let mut errors = 0u64;
            let (mut compressed, payload) = (0u64, text_payload(message));
            for _ in 0..conns {
                let opened = async {
                    let (mut s, mut buf, agreed) = open_negotiated(args.addr, &args.path).await?;
                    if message > 0 {
                        s.write_all(&text_frame(&payload, agreed)).await?;
                        let mut chunk = [0u8; 4096];
                        while take_frames(&mut buf)? == 0 {
                            let n = s.read(&mut chunk).await?;
                            if n == 0 {
                                bail!("eof");
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                    }
                    anyhow::Ok((s, agreed))
                }
                .await;
                match opened {
                    Ok((c, agreed)) => {
                        compressed += u64::from(agreed);
                        open_conns.push(c);
                    }
                    Err(_) => errors += 1,
                }
            }
            tokio::time::sleep(Duration::from_secs(settle)).await;
            let after = rss_kib(pid)?;
            let pss_after = pss_kib(pid)?;
            eprintln!("loadgen: {} connections open", open_conns.len());
            tokio::time::sleep(Duration::from_secs(hold)).await;
            let n = open_conns.len().max(1) as f64;
            Ok(serde_json::json!({
                "label": args.label, "mode": "idle", "conns": open_conns.len(),
                "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_conn": ((after.saturating_sub(before)) as f64 / n * 100.0).round() / 100.0,
                "pss_kib_per_conn": ((pss_after.saturating_sub(pss_before)) as f64 / n * 100.0).round() / 100.0,
                "message": message, "deflate_agreed": compressed,
                "errors": errors,
            }))
        }
    }
}
