//! permessage-deflate (RFC 7692) through the binary, with a raw client that
//! compresses and decompresses with flate2 itself: what is negotiated,
//! messages both ways, context takeover, and hostile compressed input
//! (bombs, bad data, RSV1 where it does not belong). Autobahn's 12.* and
//! 13.* cases (`./dev autobahn`) cover the rest of the RFC.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::support::*;

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// A route serving the echo plugin with `extra` route keys.
fn echo_gateway(name: &str, extra: &str) -> Gateway {
    Gateway::start(
        name,
        &format!(
            "[[route]]\npath = \"/e\"\nplugin = \"{}\"\nmax_message_size = \"1MiB\"\n{extra}",
            plugin("echo")
        ),
    )
}

/// The response's `Sec-WebSocket-Extensions` value, if any.
fn extensions(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

/// `message` compressed as one permessage-deflate message by `z`.
fn deflate(z: &mut Compress, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut input = message;
    loop {
        let before = z.total_in();
        z.compress_vec(input, &mut out, FlushCompress::Sync)
            .expect("compress");
        input = &input[(z.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A permessage-deflate message decompressed by `z`.
fn inflate(z: &mut Decompress, data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("decompress");
    out
}

fn raw_deflater() -> Compress {
    Compress::new_with_window_bits(Compression::default(), false, 15)
}

fn raw_inflater() -> Decompress {
    Decompress::new_with_window_bits(false, 15)
}

#[tokio::test]
async fn an_offer_is_accepted_and_messages_come_back_compressed_above_the_minimum_size() {
    let gw = echo_gateway("deflate-echo", "compression = \"on\"\n");
    let (mut raw, head) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    assert_eq!(
        extensions(&head).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        "{head}"
    );
    let text = "a compressed message, a compressed message, a compressed message ✓".repeat(20);
    raw.send_frame(0xC1, &deflate(&mut raw_deflater(), text.as_bytes()), true)
        .await;
    let (b0, payload) = raw.read_frame().await.expect("echo");
    assert_eq!(b0, 0xC1, "FIN, RSV1 and text");
    assert!(payload.len() < text.len() / 4, "{} bytes", payload.len());
    assert_eq!(inflate(&mut raw_inflater(), &payload), text.as_bytes());

    // Under compression_min_size (64 bytes by default): sent as it is.
    raw.send_frame(0xC2, &deflate(&mut raw_deflater(), b"tiny"), true)
        .await;
    let (b0, payload) = raw.read_frame().await.expect("echo");
    assert_eq!((b0, payload.as_slice()), (0x82, &b"tiny"[..]));

    // Data that does not shrink (random bytes) comes back uncompressed.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..2000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    raw.send_frame(0xC2, &deflate(&mut raw_deflater(), &noise), true)
        .await;
    let (b0, payload) = raw.read_frame().await.expect("echo");
    assert_eq!((b0, payload.as_slice()), (0x82, noise.as_slice()));

    // An uncompressed message on the same connection is fine too.
    raw.send_frame(0x81, b"plain", true).await;
    let (b0, payload) = raw.read_frame().await.expect("echo");
    assert_eq!((b0, payload.as_slice()), (0x81, &b"plain"[..]));
}

#[tokio::test]
async fn a_compressed_message_in_fragments_is_reassembled_and_validated() {
    let gw = echo_gateway("deflate-fragments", "compression = \"on\"\n");
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    let text = "€uro ".repeat(500);
    let wire = deflate(&mut raw_deflater(), text.as_bytes());
    let (a, rest) = wire.split_at(wire.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    raw.send_frame(0x41, a, true).await; // RSV1 on the first frame only
    raw.send_frame(0x00, b, true).await;
    raw.send_frame(0x80, c, true).await;
    let (b0, payload) = raw.read_frame().await.expect("echo");
    assert_eq!(b0, 0xC1);
    assert_eq!(inflate(&mut raw_inflater(), &payload), text.as_bytes());

    // Compressed text that is not UTF-8 once decompressed: 1007.
    let bad = deflate(&mut raw_deflater(), &[b'o', b'k', 0xC3, 0x28]);
    raw.send_frame(0xC1, &bad, true).await;
    assert_eq!(raw.expect_close().await, 1007);
}

#[tokio::test]
async fn with_context_takeover_both_sides_keep_their_window() {
    let gw = echo_gateway(
        "deflate-takeover",
        "compression = \"on\"\ncompression_context_takeover = true\n",
    );
    let (mut raw, head) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    assert_eq!(extensions(&head).as_deref(), Some("permessage-deflate"));
    let (mut ours, mut theirs) = (raw_deflater(), raw_inflater());
    let text = "the same long sentence, sent again and again, compresses to little ".repeat(4);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        // Our compressor keeps its window: the later messages refer back to
        // the first, which only a decompressor that kept it can read.
        raw.send_frame(0xC1, &deflate(&mut ours, text.as_bytes()), true)
            .await;
        let (b0, payload) = raw.read_frame().await.expect("echo");
        assert_eq!(b0, 0xC1);
        sizes.push(payload.len());
        assert_eq!(inflate(&mut theirs, &payload), text.as_bytes());
    }
    assert!(
        sizes[1] < sizes[0] / 2,
        "the gateway kept its window: {sizes:?}"
    );
}

#[tokio::test]
async fn a_route_without_compression_declines_and_rsv1_is_then_a_protocol_error() {
    let gw = echo_gateway("deflate-off", "");
    let (mut raw, head) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    assert_eq!(extensions(&head), None, "{head}");
    raw.send_frame(0xC1, &deflate(&mut raw_deflater(), b"hello"), true)
        .await;
    assert_eq!(raw.expect_close().await, 1002);
}

#[tokio::test]
async fn rsv1_on_a_continuation_or_a_ping_is_a_protocol_error() {
    let gw = echo_gateway("deflate-rsv1", "compression = \"on\"\n");
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    raw.send_frame(0x01, b"part", true).await;
    raw.send_frame(0xC0, b"rest", true).await;
    assert_eq!(raw.expect_close().await, 1002);
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    raw.send_frame(0xC9, b"ping", true).await;
    assert_eq!(raw.expect_close().await, 1002);
}

#[tokio::test]
async fn data_that_does_not_decompress_closes_with_1007() {
    let gw = echo_gateway("deflate-garbage", "compression = \"on\"\n");
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    raw.send_frame(0xC2, &[0xff; 32], true).await;
    assert_eq!(raw.expect_close().await, 1007);
}

/// The peak resident set size of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_with_1009_before_it_is_inflated() {
    let gw = echo_gateway("deflate-bomb", "compression = \"on\"\n");
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    // Warm up (buffers, the shared decompressor), then measure the peak.
    raw.send_frame(0xC2, &deflate(&mut raw_deflater(), &[7u8; 1000]), true)
        .await;
    raw.read_frame().await.expect("echo");
    let before = peak_rss_kib(gw.pid());
    // 64 MiB of zeros compress to about 64 KiB: a frame well under
    // max_frame_size (1 MiB) that would inflate to 64x max_message_size.
    let zeros = vec![0u8; 64 << 20];
    let mut z = Compress::new_with_window_bits(Compression::best(), false, 15);
    let bomb = deflate(&mut z, &zeros);
    drop(zeros);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    raw.send_frame(0xC2, &bomb, true).await;
    assert_eq!(raw.expect_close().await, 1009);
    let grew = peak_rss_kib(gw.pid()).saturating_sub(before);
    assert!(grew < 16 << 10, "the gateway's peak RSS grew by {grew} KiB");
    // The gateway goes on serving.
    let (mut other, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    other.send_frame(0x81, b"still here", true).await;
    assert_eq!(other.read_frame().await.expect("echo").1, b"still here");
}

#[tokio::test]
async fn a_bad_compression_key_is_an_error_naming_it() {
    let (ok, _, err) = check_output(
        "deflate-config",
        "[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\ncompression = \"yes\"\ncompression_level = 12\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:4: compression: ") && err.contains(r#""on" or "off""#),
        "{err}"
    );
    assert!(
        err.contains("gateway.toml:5: compression_level: must be 1 (fastest) to 9"),
        "{err}"
    );
}

/// The CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // After the command name in parentheses: fields 14 and 15 are utime and
    // stime.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test]
async fn compressed_messages_over_the_rate_are_dropped_without_being_decompressed() {
    let gw = echo_gateway(
        "deflate-rate-drop",
        "compression = \"on\"\nmax_messages_per_second = 2\nrate_exceeded = \"drop\"\n",
    );
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    // Each frame is about 1 KiB and inflates to 1 MiB (max_message_size):
    // 2,000 of them would be 2 GiB to inflate.
    let bomb = deflate(&mut raw_deflater(), &vec![0u8; 1 << 20]);
    assert!(bomb.len() < 4 << 10, "{}", bomb.len());
    let before = cpu_ticks(gw.pid());
    for _ in 0..2000 {
        raw.send_frame(0xC2, &bomb, true).await;
    }
    // The rate lets two through (their echoes come back, 1 MiB each,
    // compressed), and drops the rest unread.
    let mut echoes = 0;
    while let Ok(Some((b0, _))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), raw.read_frame()).await
    {
        assert_eq!(b0 & 0x0F, 0x2, "a binary echo, not a close");
        echoes += 1;
    }
    assert!((1..=3).contains(&echoes), "{echoes} echoes");
    // Inflating 2 GiB takes seconds of CPU; skipping it, a fraction.
    let used = cpu_ticks(gw.pid()) - before;
    assert!(used < 80, "the gateway used {used} ticks of CPU");
    // The connection is still open and served once the rate allows.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    raw.send_frame(0x81, b"after", true).await;
    assert_eq!(raw.read_frame().await.expect("echo").1, b"after");
}

#[tokio::test]
async fn a_compressed_message_over_the_rate_closes_with_1008_when_the_route_closes() {
    let gw = echo_gateway(
        "deflate-rate-close",
        "compression = \"on\"\nmax_messages_per_second = 1\n",
    );
    let (mut raw, _) = Raw::connect_with(gw.addr, "/e", OFFER).await;
    let wire = deflate(&mut raw_deflater(), &[b'x'; 300]);
    for _ in 0..3 {
        raw.send_frame(0xC1, &wire, true).await;
    }
    assert_eq!(raw.expect_close().await, 1008);
}
