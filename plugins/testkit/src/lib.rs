//! `testkit`: a plugin for the end-to-end tests, not an example.
//!
//! It exercises the host API on command. Each text message is one command;
//! the answer is a text message `ok <value>` or `err <error>`.
//!
//! Query parameters of the upgrade: `reject=<status>` refuses it with that
//! status and the body `rejected by testkit`; `watch=1` joins the `watchers`
//! room, which is told `closed <id> <code> <reason>` whenever a connection of
//! the route runs `on-close` (also logged as `on-close <id> <code> <reason>`); `trap-open=1` traps in `on-open`.
//! Every `on-open` is logged as `on-open <id>`, so that tests can match
//! opens with closes. The route
//! config `protocols` (comma-separated) lists the subprotocols it can speak:
//! it selects the first of the client's offers that is on that list.
//!
//! `on-resume` is logged as `on-resume <id>`.
//!
//! Commands: `id`, `resumed` (how many times `on-resume` ran on this
//! instance), `hits` (counts its calls in guest memory: per connection
//! with one instance each, per route on a shared instance), `echo <text>`, `send <id> <text>`, `close <code> <reason>`,
//! `close-other <id> <code>`, `join <room>`, `leave <room>`,
//! `broadcast <room> <text>` (excluding the sender), `size <room>`,
//! `members <room>`, `meta-set <key> <value>`, `meta-get <id> <key>`,
//! `config <key>`, `timer <ms>` (one shot), `timer-other <id> <ms>`,
//! `trap`, `spin` (loops forever), `spin-on-timer <ms>` (sets a one-shot
//! timer whose `on-timer` loops forever), `spin-on-close` (its `on-close`
//! will loop forever), `grow <MiB>` (allocates and touches memory),
//! `print <text>` (writes to stdout and stderr), `sleep <ms>` (blocks),
//! `random` (16 bytes each from `wasi:random/random` and
//! `wasi:random/insecure`, as two hex strings), `random <n>` (n bytes from
//! each; answers their lengths), `handles <n>` (creates n WASI pollables,
//! two handles each in the host's table, and never drops them),
//! `out-write <n>` (one `write` of n bytes to stdout, without
//! `check-write`), `poll <n>` (one `poll` of a list naming one ready
//! pollable n times; answers how many were ready).
//!
//! Hostile commands, for the containment tests; each that returns answers
//! `ok <done> <first error or "none">`: `recurse` (until the wasm stack
//! overflows), `flood-self <n>` (sends to itself), `flood-room <room> <n>`
//! (broadcasts), `timers <n>` (one-hour timers), `rooms <n>` (joins `r0`,
//! `r1`...), `meta-flood <n> <bytes>` (entries of that size), `log-flood
//! <lines>` (1 KiB lines to stdout and through `log`), `env <KEY>`, `read
//! <path>`, `write <path> <text>`, `connect <ip:port>` (WASI the route may
//! not grant; answers `ok <value>` or `err <why>`).
//! With the route config `spin_on_timer = "yes"`, every `on-timer` loops
//! forever (this survives hibernation, unlike `spin-on-timer`).
//! Binary messages are echoed. On a `deliver = "fragments"` route, each
//! message's final fragment is answered with
//! `fragments <text|binary> <count> bytes <total>`.

use std::time::Duration;

use std::cell::Cell;

use wasmgate_sdk::{
    config, export, log, room, Connection, Fragment, GatewayError, Handler, Message, OpenResponse,
    Request,
};

thread_local! {
    // The message being streamed on a `deliver = "fragments"` route.
    static FRAGMENTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    // How many times `on-resume` ran on this instance.
    static RESUMED: Cell<u64> = const { Cell::new(0) };
    // How many times `hits` ran on this instance.
    static HITS: Cell<u64> = const { Cell::new(0) };
    // `on-timer` loops forever (`spin-on-timer`).
    static SPIN_ON_TIMER: Cell<bool> = const { Cell::new(false) };
    // `on-close` loops forever (`spin-on-close`).
    static SPIN_ON_CLOSE: Cell<bool> = const { Cell::new(false) };
}

struct Testkit;

fn answer<T: std::fmt::Display>(conn: Connection, r: Result<T, GatewayError>) {
    let text = match r {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("err {}", error_name(&e)),
    };
    let _ = conn.send_text(&text);
}

/// The first directory the route grants (`dirs`), if any.
fn granted_dir() -> Option<wasip2::filesystem::types::Descriptor> {
    wasip2::filesystem::preopens::get_directories().into_iter().next().map(|(dir, _)| dir)
}

fn error_name(e: &GatewayError) -> String {
    match e {
        GatewayError::Closed => "closed".into(),
        GatewayError::UnknownConnection => "unknown-connection".into(),
        GatewayError::TooLarge => "too-large".into(),
        GatewayError::Backpressure => "backpressure".into(),
        GatewayError::LimitReached => "limit-reached".into(),
        GatewayError::NotOwner => "not-owner".into(),
        GatewayError::InvalidArgument(why) => format!("invalid-argument {why}"),
    }
}

fn arg_id(s: &str) -> Connection {
    Connection::from_id(s.parse().unwrap_or(u64::MAX))
}

impl Handler for Testkit {
    fn on_open(conn: Connection, req: &Request) -> OpenResponse {
        log::info(&format!("on-open {}", conn.id()));
        if req.query_param("trap-open").is_some() {
            panic!("testkit: trap in on-open as asked");
        }
        if let Some(status) = req.query_param("reject") {
            return OpenResponse::reject(status.parse().unwrap_or(400), "rejected by testkit");
        }
        if req.query_param("watch").is_some() {
            let _ = conn.join("watchers");
        }
        let speaks = config("protocols").unwrap_or_default();
        let chosen = req
            .subprotocols
            .iter()
            .find(|offer| speaks.split(',').any(|p| p.trim() == offer.as_str()));
        match chosen {
            Some(p) => OpenResponse::accept_with(p),
            None => OpenResponse::accept(),
        }
    }

    fn on_message(conn: Connection, msg: Message) {
        let text = match msg {
            Message::Text(text) => text,
            bin @ Message::Binary(_) => {
                let _ = conn.send(&bin);
                return;
            }
        };
        let mut parts = text.splitn(3, ' ');
        let cmd = parts.next().unwrap_or("");
        let a = parts.next().unwrap_or("");
        let b = parts.next().unwrap_or("");
        match cmd {
            "id" => answer(conn, Ok(conn.id())),
            "resumed" => answer(conn, Ok(RESUMED.get())),
            "hits" => {
                HITS.set(HITS.get() + 1);
                answer(conn, Ok(HITS.get()))
            }
            "echo" => answer(conn, Ok(text.split_once(' ').map(|x| x.1).unwrap_or(""))),
            "send" => answer(conn, arg_id(a).send_text(b).map(|_| "sent")),
            "close" => {
                if let Err(e) = conn.close(a.parse().unwrap_or(0), b) {
                    answer::<&str>(conn, Err(e));
                }
            }
            "close-other" => answer(conn, arg_id(a).close(b.parse().unwrap_or(0), "").map(|_| "closing")),
            "join" => answer(conn, conn.join(a).map(|_| "joined")),
            "leave" => answer(conn, conn.leave(a)),
            "broadcast" => answer(conn, room(a).broadcast_text(b, Some(conn))),
            "size" => answer(conn, Ok(room(a).size())),
            "members" => {
                let mut ids: Vec<u64> = room(a).members().into_iter().map(Connection::id).collect();
                ids.sort_unstable();
                let list: Vec<String> = ids.iter().map(u64::to_string).collect();
                answer(conn, Ok(list.join(",")))
            }
            "meta-set" => answer(conn, conn.set_metadata(a, b).map(|_| "set")),
            "meta-get" => answer(
                conn,
                arg_id(a).metadata(b).map(|v| v.unwrap_or_else(|| "<none>".into())),
            ),
            "config" => answer(conn, Ok(config(a).unwrap_or_else(|| "<none>".into()))),
            "timer" => answer(
                conn,
                conn.set_timer(Duration::from_millis(a.parse().unwrap_or(1)), false),
            ),
            "timer-other" => answer(
                conn,
                arg_id(a).set_timer(Duration::from_millis(b.parse().unwrap_or(1)), false),
            ),
            "spin-on-timer" => {
                SPIN_ON_TIMER.set(true);
                answer(
                    conn,
                    conn.set_timer(Duration::from_millis(a.parse().unwrap_or(1)), false),
                )
            }
            "spin-on-close" => {
                SPIN_ON_CLOSE.set(true);
                answer(conn, Ok("set"))
            }
            "trap" => panic!("testkit: trap as asked"),
            "print" => {
                println!("testkit: {b}{a} on stdout");
                eprintln!("testkit: on stderr");
                answer(conn, Ok("printed"))
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(a.parse().unwrap_or(10)));
                answer(conn, Ok("slept"))
            }
            "spin" => spin(),
            "grow" => {
                let mib: usize = a.parse().unwrap_or(1);
                let v = vec![1u8; mib << 20];
                answer(conn, Ok(std::hint::black_box(v).len()))
            }
            "recurse" => answer(conn, Ok(recurse(std::hint::black_box(1)))),
            "flood-self" => {
                let n: u64 = a.parse().unwrap_or(1);
                let r = repeat(n, |_| conn.send_text("flood"));
                log::info(&format!("flood-self {r}"));
                answer(conn, Ok(r))
            }
            "flood-room" => {
                let n: u64 = b.parse().unwrap_or(1);
                let r = repeat(n, |_| room(a).broadcast_text("flood", Some(conn)).map(|_| ()));
                log::info(&format!("flood-room {r}"));
                answer(conn, Ok(r))
            }
            "timers" => {
                let n: u64 = a.parse().unwrap_or(1);
                let r = repeat(n, |_| conn.set_timer(Duration::from_secs(3600), false).map(|_| ()));
                log::info(&format!("timers {r}"));
                answer(conn, Ok(r))
            }
            "rooms" => {
                let n: u64 = a.parse().unwrap_or(1);
                let r = repeat(n, |i| conn.join(&format!("r{i}")));
                log::info(&format!("rooms {r}"));
                answer(conn, Ok(r))
            }
            "meta-flood" => {
                let n: u64 = a.parse().unwrap_or(1);
                let value = "v".repeat(b.parse().unwrap_or(1));
                let r = repeat(n, |i| conn.set_metadata(&format!("k{i}"), &value));
                log::info(&format!("meta-flood {r}"));
                answer(conn, Ok(r))
            }
            "log-flood" => {
                let n: u64 = a.parse().unwrap_or(1);
                let line = "x".repeat(1024);
                for _ in 0..n {
                    println!("{line}");
                    log::info(&line);
                }
                answer(conn, Ok("logged"))
            }
            // Without an argument: 16 bytes from `wasi:random/random` and
            // 16 from `wasi:random/insecure`, in hex. With `<n>`: n bytes
            // from each, answered with their lengths.
            "random" if a.is_empty() => {
                let hex = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
                let secure = hex(wasip2::random::random::get_random_bytes(16));
                let insecure = hex(wasip2::random::insecure::get_insecure_random_bytes(16));
                answer(conn, Ok(format!("{secure} {insecure}")))
            }
            "random" => {
                let n: u64 = a.parse().unwrap_or(0);
                let secure = wasip2::random::random::get_random_bytes(n).len();
                let insecure = wasip2::random::insecure::get_insecure_random_bytes(n).len();
                answer(conn, Ok(format!("{secure} {insecure}")))
            }
            // Creates n WASI pollables (one-hour deadlines) and never drops
            // them.
            "handles" => {
                let n: usize = a.parse().unwrap_or(0);
                for _ in 0..n {
                    std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(3_600_000_000_000));
                }
                answer(conn, Ok(n))
            }
            // One `output-stream.write` of n bytes to stdout, without asking
            // `check-write` first.
            "out-write" => {
                let n: usize = a.parse().unwrap_or(0);
                let out = wasip2::cli::stdout::get_stdout();
                let done = out.write(&vec![b'x'; n]).map(|()| n);
                answer(conn, done.map_err(|e| GatewayError::InvalidArgument(format!("{e:?}"))))
            }
            // One `poll` of a list naming the same ready pollable (stdout's,
            // always ready) n times; answers how many entries were ready.
            "poll" => {
                let n: usize = a.parse().unwrap_or(0);
                let out = wasip2::cli::stdout::get_stdout();
                let ready = out.subscribe();
                let list = vec![&ready; n];
                answer(conn, Ok(wasip2::io::poll::poll(&list).len()))
            }
            // Opens n listings of the first granted directory
            // (`read-directory`) and keeps them; answers how many it holds
            // and the error that stopped it, if any.
            "listings" => {
                let n: usize = a.parse().unwrap_or(0);
                let Some(dir) = granted_dir() else {
                    return answer::<&str>(conn, Err(GatewayError::InvalidArgument("no directory".into())));
                };
                let mut held = 0;
                let mut stopped = String::from("none");
                for _ in 0..n {
                    match dir.read_directory() {
                        Ok(stream) => {
                            std::mem::forget(stream);
                            held += 1;
                        }
                        Err(e) => {
                            stopped = format!("{e:?}");
                            break;
                        }
                    }
                }
                answer(conn, Ok(format!("held {held} stopped {stopped}")))
            }
            // Opens the granted file /data/<b> n times (`open-at`) and
            // keeps each open: as its descriptor, or (`opens-streamed`) as a
            // stream read from it, its descriptor dropped, or (`opens-closed`)
            // not at all. Answers how many opens succeeded and the error that
            // stopped them, if any.
            "opens" | "opens-streamed" | "opens-closed" => {
                use wasip2::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};
                let n: usize = a.parse().unwrap_or(0);
                let Some(dir) = granted_dir() else {
                    return answer::<&str>(conn, Err(GatewayError::InvalidArgument("no directory".into())));
                };
                let mut opened = 0;
                let mut stopped = String::from("none");
                for _ in 0..n {
                    match dir.open_at(PathFlags::empty(), b, OpenFlags::empty(), DescriptorFlags::READ) {
                        Ok(file) => {
                            opened += 1;
                            match cmd {
                                "opens" => std::mem::forget(file),
                                "opens-streamed" => match file.read_via_stream(0) {
                                    Ok(stream) => std::mem::forget(stream),
                                    Err(e) => {
                                        stopped = format!("{e:?}");
                                        break;
                                    }
                                },
                                _ => drop(file),
                            }
                        }
                        Err(e) => {
                            stopped = format!("{e:?}");
                            break;
                        }
                    }
                }
                answer(conn, Ok(format!("opened {opened} stopped {stopped}")))
            }
            // Sets the times of /data/<a> to now (`set-times-at`,
            // following a last symbolic link unless <b> is `nofollow`).
            "touch" => {
                use wasip2::filesystem::types::{NewTimestamp, PathFlags};
                let Some(dir) = granted_dir() else {
                    return answer::<&str>(conn, Err(GatewayError::InvalidArgument("no directory".into())));
                };
                let follow = if b == "nofollow" { PathFlags::empty() } else { PathFlags::SYMLINK_FOLLOW };
                match dir.set_times_at(follow, a, NewTimestamp::Now, NewTimestamp::Now) {
                    Ok(()) => answer(conn, Ok("touched")),
                    Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(format!("{e:?}")))),
                }
            }
            // The number of entries in one listing of the first granted
            // directory.
            "list" => {
                let Some(dir) = granted_dir() else {
                    return answer::<&str>(conn, Err(GatewayError::InvalidArgument("no directory".into())));
                };
                match dir.read_directory() {
                    Ok(stream) => {
                        let mut count = 0;
                        while let Ok(Some(_)) = stream.read_directory_entry() {
                            count += 1;
                        }
                        answer(conn, Ok(count))
                    }
                    Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(format!("{e:?}")))),
                }
            }
            "env" => match std::env::var(a) {
                Ok(v) => answer(conn, Ok(v)),
                Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(e.to_string()))),
            },
            "read" => match std::fs::read_to_string(a) {
                Ok(v) => answer(conn, Ok(v)),
                Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(e.to_string()))),
            },
            "write" => match std::fs::write(a, b) {
                Ok(()) => answer(conn, Ok("written")),
                Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(e.to_string()))),
            },
            "connect" => match std::net::TcpStream::connect(a) {
                Ok(_) => answer(conn, Ok("connected")),
                Err(e) => answer::<&str>(conn, Err(GatewayError::InvalidArgument(e.to_string()))),
            },
            _ => answer::<&str>(conn, Err(GatewayError::InvalidArgument(format!("unknown command {cmd:?}")))),
        }
    }

    fn on_close(conn: Connection, code: u16, reason: String) {
        log::info(&format!("on-close {} {code} {reason}", conn.id()));
        if SPIN_ON_CLOSE.get() {
            spin();
        }
        let _ = room("watchers").broadcast_text(&format!("closed {} {code} {reason}", conn.id()), None);
    }

    fn on_fragment(conn: Connection, fragment: Fragment) {
        let (count, bytes) = if fragment.first { (0, 0) } else { FRAGMENTS.get() };
        let now = (count + 1, bytes + fragment.data.len() as u64);
        FRAGMENTS.set(now);
        if fragment.fin {
            let kind = if fragment.text { "text" } else { "binary" };
            let _ = conn.send_text(&format!("fragments {kind} {} bytes {}", now.0, now.1));
        }
    }

    fn on_timer(conn: Connection, timer: u64) {
        if SPIN_ON_TIMER.get() || config("spin_on_timer").as_deref() == Some("yes") {
            spin();
        }
        let _ = conn.send_text(&format!("timer {timer}"));
    }

    fn on_resume(conn: Connection, _req: &Request) {
        log::info(&format!("on-resume {}", conn.id()));
        RESUMED.set(RESUMED.get() + 1);
    }
}

/// Loops forever.
fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Recurses without end: each frame keeps a little of the stack.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let pad = std::hint::black_box([depth; 8]);
    recurse(pad[7] + 1) + pad[0]
}

/// Runs `f` up to `n` times, stopping at its first error:
/// `<how many succeeded> <the error's name or "none">`.
fn repeat(n: u64, mut f: impl FnMut(u64) -> Result<(), GatewayError>) -> String {
    for i in 0..n {
        if let Err(e) = f(i) {
            return format!("{i} {}", error_name(&e));
        }
    }
    format!("{n} none")
}

export!(Testkit);
