//! The native ceiling: an echo server on hyper 1 + fastwebsockets with no
//! plugin, on the same runtime settings as the gateway (tokio multi-thread,
//! TCP_NODELAY). The benchmark compares the gateway's echo route with it.
//! `/broadcast` is one room: every message goes to every other connection
//! (the ceiling for the gateway's `fanout` plugin). With `--tls-cert` and
//! `--tls-key` it terminates TLS as the gateway does (rustls with ring, its
//! safe defaults, ALPN http/1.1).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{upgrade, FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Native echo server.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Worker threads as the gateway's `[server] threads`: 0 for one per
    /// CPU, 1 for a current-thread runtime.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A PEM certificate chain: serve TLS (with `--tls-key`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The TLS acceptor of `--tls-cert` and `--tls-key`.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

/// The one room of `/broadcast`: each member's outbound queue.
type Room = Mutex<HashMap<u64, mpsc::UnboundedSender<(OpCode, Bytes)>>>;

fn room() -> &'static Room {
    static ROOM: OnceLock<Room> = OnceLock::new();
    ROOM.get_or_init(Default::default)
}

async fn broadcast(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let ws = fut.await?;
    let (mut rd, mut wr) = ws.split(tokio::io::split);
    let (tx, mut rx) = mpsc::unbounded_channel::<(OpCode, Bytes)>();
    room().lock().expect("room").insert(id, tx);
    let writer = tokio::spawn(async move {
        while let Some((opcode, payload)) = rx.recv().await {
            let frame = Frame::new(true, opcode, None, Payload::Borrowed(&payload));
            if wr.write_frame(frame).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        loop {
            let frame = rd
                .read_frame(&mut |_| async { Ok::<_, WebSocketError>(()) })
                .await?;
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text | OpCode::Binary => {
                    let payload = Bytes::copy_from_slice(&frame.payload);
                    for (member, tx) in room().lock().expect("room").iter() {
                        if *member != id {
                            let _ = tx.send((frame.opcode, payload.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    room().lock().expect("room").remove(&id);
    writer.abort();
    result
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let fan_out = req.uri().path() == "/broadcast";
    let (resp, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let _ = if fan_out {
            broadcast(fut).await
        } else {
            echo(fut).await
        };
    });
    Ok(resp)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key).context("TLS certificate")?),
        _ => None,
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await.context("bind")?;
        println!("baseline listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let http = http1::Builder::new();
                let _ = match tls {
                    None => {
                        http.serve_connection(TokioIo::new(stream), service_fn(handle))
                            .with_upgrades()
                            .await
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            http.serve_connection(TokioIo::new(stream), service_fn(handle))
                                .with_upgrades()
                                .await
                        }
                        Err(_) => return,
                    },
                };
            });
        }
    })
}
