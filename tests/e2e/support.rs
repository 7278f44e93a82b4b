//! Starting the real `wasmgate` binary on an ephemeral port, and two kinds of
//! client: tokio-tungstenite (a different implementation than the server)
//! and a raw socket for malformed input.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// The folder holding every built plugin, test plugins included.
pub fn plugin(name: &str) -> String {
    format!("{}/{name}.wasm", wasmgate::builtin::PLUGIN_DIR)
}

/// A scratch folder for one test, removed with everything in it when the
/// value is dropped, unless the test is failing (then it is kept for a look,
/// and its path is printed).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Said again last: a long gateway log and a backtrace can push
            // the panic message out of a truncated CI log.
            let failure = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            eprintln!(
                "kept the failing test's scratch folder {}; the test failed: {failure}",
                self.0.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

thread_local! {
    /// The message and place of the last panic on this thread, for
    /// [`Scratch`] to repeat.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps each panic's message for [`Scratch`] (once per process), then
/// reports it as the default hook does.
fn record_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            default(info);
        }));
    });
}

/// A fresh scratch folder for one test (see [`Scratch`]).
pub fn scratch(name: &str) -> Scratch {
    record_panics();
    let dir = std::env::temp_dir().join(format!("wasmgate-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    Scratch(dir)
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// The folder of a config written by [`Gateway::start`], removed after
    /// the process is killed.
    scratch: Option<Scratch>,
}

impl Gateway {
    /// Starts `wasmgate serve` with `config` (TOML; `{testkit}` and
    /// `{plugins}` are replaced by the test plugin's path and the plugin
    /// folder) on an ephemeral port.
    pub fn start(name: &str, config: &str) -> Gateway {
        let dir = scratch(name);
        let file = dir.join("gateway.toml");
        let text = config
            .replace("{testkit}", &plugin("testkit"))
            .replace("{plugins}", wasmgate::builtin::PLUGIN_DIR);
        std::fs::write(&file, text).expect("write config");
        let mut gw = Gateway::spawn(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.to_str().unwrap(),
        ]);
        gw.scratch = Some(dir);
        gw
    }

    /// Starts `wasmgate` with `args`, waiting for its "listening on" line.
    pub fn spawn(args: &[&str]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(args)
            .env("RUST_LOG", "info,wasmgate=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wasmgate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[gateway] {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("wasmgate listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
            }
        });
        // Generous: a JavaScript or Python plugin that is not in the compile
        // cache yet takes tens of seconds to compile before the gateway
        // listens, more on a loaded CI machine.
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("gateway did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Gateway {
            child,
            addr,
            stderr,
            scratch: None,
        }
    }

    /// The `ws://` URL of `path` (with its query).
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing `text`; that line.
    pub fn wait_log(&self, text: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            assert!(
                start.elapsed() < WAIT,
                "no log line with {text:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the gateway process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("the gateway had exited before the test failed: {status}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tokio-tungstenite client.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects, panicking on failure.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// Connects with `host` as the `Host` header; the handshake's error (for
/// example the HTTP status of a refusal) if it fails.
pub async fn try_connect_host(
    url: &str,
    host: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("host", host.parse().expect("a valid Host header value"));
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")?;
    Ok(ws)
}

/// Connects with `host` as the `Host` header, panicking on failure.
pub async fn connect_host(url: &str, host: &str) -> Ws {
    try_connect_host(url, host)
        .await
        .unwrap_or_else(|e| panic!("connect {url} as {host}: {e}"))
}

/// The HTTP status a refused upgrade got.
pub fn refusal_status(e: &tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// The next message that is not a ping or pong.
pub async fn next(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message in time")
            .expect("stream ended")
            .expect("read error");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

/// The next text message.
pub async fn next_text(ws: &mut Ws) -> String {
    match next(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The next text message, parsed as JSON.
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    serde_json::from_str(&next_text(ws).await).expect("JSON")
}

/// Sends a text message.
pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// Sends a testkit command and returns its answer.
pub async fn command(ws: &mut Ws, cmd: &str) -> String {
    send(ws, cmd).await;
    next_text(ws).await
}

/// Asks a testkit connection for its id.
pub async fn conn_id(ws: &mut Ws) -> String {
    let answer = command(ws, "id").await;
    answer.strip_prefix("ok ").expect("ok <id>").to_owned()
}

/// Expects the connection to be closed with `code`, completes the closing
/// handshake, and returns the reason.
pub async fn expect_close(ws: &mut Ws, code: u16) -> String {
    let reason = match next(ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(
                u16::from(f.code),
                code,
                "close code (reason {:?})",
                f.reason
            );
            f.reason.to_string()
        }
        other => panic!("expected close {code}, got {other:?}"),
    };
    // Polling again sends our close reply; the server then ends the stream.
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    reason
}

/// Asserts that nothing but pings arrives for `d`.
pub async fn expect_silence(ws: &mut Ws, d: Duration) {
    if let Ok(Some(msg)) = tokio::time::timeout(d, ws.next()).await {
        let msg = msg.expect("read");
        assert!(
            matches!(msg, Message::Ping(_) | Message::Pong(_)),
            "unexpected {msg:?}"
        );
    }
}

/// A client over a raw socket, for bytes no library would send.
pub struct Raw {
    /// The socket.
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The answer to a raw HTTP request: status line, headers, body.
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The head, lower-cased.
    pub head: String,
    /// The body (as much as arrived).
    pub body: String,
}

/// Sends raw HTTP and reads the reply head and its `content-length` body.
pub async fn http(addr: SocketAddr, request: &str) -> HttpReply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before a reply: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let status = head[9..12].parse().expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while buf.len() < end + len {
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("body in time")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[end..]).into_owned();
    HttpReply { status, head, body }
}

/// Raises this process's open-file limit to its hard limit (gateways
/// started afterwards inherit it), for tests that open many sockets; the
/// limit now.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

/// A valid upgrade request for `path`, with `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

impl Raw {
    /// Opens a WebSocket connection by hand.
    pub async fn connect(addr: SocketAddr, path: &str) -> Raw {
        Raw::connect_with(addr, path, "").await.0
    }

    /// Opens a WebSocket connection by hand, with `extra` header lines
    /// (each ending in CRLF) in the request; the connection and the
    /// response head.
    pub async fn connect_with(addr: SocketAddr, path: &str, extra: &str) -> (Raw, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(upgrade_request(path, extra).as_bytes())
            .await
            .expect("write");
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.fill().await;
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        raw.buf.drain(..end);
        (raw, head)
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Sends one frame, masked unless `masked` is false.
    pub async fn send_frame(&mut self, first_byte: u8, payload: &[u8], masked: bool) {
        let mut out = vec![first_byte];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x37u8, 0xfa, 0x21, 0x3d];
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        self.stream.write_all(&out).await.expect("write frame");
    }

    /// Reads one server frame: (first byte, payload); `None` at EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let len7 = (self.buf[1] & 0x7F) as usize;
                let (hdr, len) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (10, u64::from_be_bytes(b) as usize)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if hdr != usize::MAX && self.buf.len() >= hdr + len {
                    let b0 = self.buf[0];
                    let payload = self.buf[hdr..hdr + len].to_vec();
                    self.buf.drain(..hdr + len);
                    return Some((b0, payload));
                }
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Asks a testkit connection for its id.
    pub async fn id(&mut self) -> String {
        self.send_frame(0x81, b"id", true).await;
        let (_, answer) = self.read_frame().await.expect("id");
        let answer = String::from_utf8(answer).expect("UTF-8");
        answer.strip_prefix("ok ").expect("ok <id>").to_owned()
    }

    /// Reads frames until a close frame; its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame().await {
                Some((b0, p)) if b0 & 0x0F == 0x8 => {
                    assert!(p.len() >= 2, "close frame without a code");
                    return u16::from_be_bytes([p[0], p[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Whether the server closes the TCP connection within `d`.
    pub async fn closed_within(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        let mut chunk = [0u8; 8192];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A scratch folder holding `plugin.wasm` (a copy of `first`) and a
/// `gateway.toml` of `config`; the gateway serving it, started with `args`.
pub fn serve_copy(name: &str, first: &str, config: &str, args: &[&str]) -> (Gateway, Scratch) {
    let dir = scratch(name);
    std::fs::copy(first, dir.join("plugin.wasm")).expect("copy plugin");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config).expect("write config");
    let mut all = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    (Gateway::spawn(&all), dir)
}

/// The testkit plugin as built against `wasmgate:plugin@0.1.0`, before the
/// contract grew `resume`: it must keep loading and working.
pub fn fixture_0_1_0() -> String {
    format!(
        "{}/../tests/fixtures/testkit-wit-0.1.0.wasm",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A `kB` field of a process's `/proc/PID/status` (`VmRSS`, `VmHWM`...), in
/// KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Runs `wasmgate serve --listen listen` on `config` (`{testkit}`
/// replaced) until it exits, as a start that fails does: whether it
/// succeeded, its stdout and its stderr. A gateway that starts after all
/// is stopped after 30 s (and the caller's assertions fail).
pub fn serve_output(name: &str, config: &str, listen: &str) -> (bool, String, String) {
    let dir = scratch(name);
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config.replace("{testkit}", &plugin("testkit"))).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args([
            "serve",
            "--listen",
            listen,
            "--config",
            file.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wasmgate");
    let start = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < WAIT * 3 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("wasmgate's output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `wasmgate check` on `config` (with `files` beside it): success,
/// stdout, stderr.
pub fn check_output(name: &str, config: &str, files: &[(&str, &[u8])]) -> (bool, String, String) {
    let dir = scratch(name);
    for (f, bytes) in files {
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config.replace("{testkit}", &plugin("testkit"))).expect("write config");
    // Errors only: no log lines (such as the vm.max_map_count warning).
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .env("RUST_LOG", "error")
        .args(["check", file.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
