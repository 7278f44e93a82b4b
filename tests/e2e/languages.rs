//! The same behaviour from every guest language: the echo and chat examples
//! written in Rust, JavaScript, Python and C answer byte for byte alike,
//! with one instance per connection and with one shared instance.
//!
//! The JavaScript, Python and C examples are built by `./dev examples` (which
//! `./dev test` runs first) into `target/examples/`; a missing one fails
//! the test with that instruction rather than being skipped.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A language's examples: its name and the plugin of each example.
struct Language {
    name: &'static str,
    echo: String,
    chat: String,
}

/// Every language with its examples, checked to exist.
fn languages() -> Vec<Language> {
    let built = |file: &str| {
        let path = format!(
            "{}/../target/examples/{file}.wasm",
            env!("CARGO_MANIFEST_DIR")
        );
        assert!(
            std::path::Path::new(&path).is_file(),
            "{path} is missing: run ./dev examples (./dev test does) to build the JavaScript, Python and C examples"
        );
        path
    };
    let mut all = vec![Language {
        name: "rust",
        echo: "builtin:echo".into(),
        chat: "builtin:chat".into(),
    }];
    for (name, suffix) in [("js", "js"), ("python", "py"), ("c", "c")] {
        all.push(Language {
            name,
            echo: built(&format!("echo-{suffix}")),
            chat: built(&format!("chat-{suffix}")),
        });
    }
    all
}

/// One gateway serving every language's examples, at `/LANG/echo`,
/// `/LANG/chat` (one instance per connection) and `/LANG/echo-shared`,
/// `/LANG/chat-shared` (`isolation = "shared"`).
fn serve_all(name: &str) -> (Gateway, Vec<Language>) {
    let langs = languages();
    let mut config = String::new();
    for l in &langs {
        for (example, plugin) in [("echo", &l.echo), ("chat", &l.chat)] {
            for (suffix, isolation) in [("", "connection"), ("-shared", "shared")] {
                config.push_str(&format!(
                    "[[route]]\npath = \"/{}/{example}{suffix}\"\nplugin = \"{plugin}\"\nisolation = \"{isolation}\"\n\n",
                    l.name
                ));
            }
        }
    }
    (Gateway::start(name, &config), langs)
}

/// The route paths of one example in both isolation modes.
fn paths(lang: &Language, example: &str) -> [String; 2] {
    [
        format!("/{}/{example}", lang.name),
        format!("/{}/{example}-shared", lang.name),
    ]
}

#[tokio::test]
async fn every_language_echoes_text_and_binary_unchanged() {
    let (gw, langs) = serve_all("languages-echo");
    for lang in &langs {
        for path in paths(lang, "echo") {
            let mut a = connect(&gw.url(&path)).await;
            let mut b = connect(&gw.url(&path)).await;
            for text in ["hello", "", "ünïcödé ✓", &"x".repeat(70_000)] {
                a.send(Message::text(text)).await.expect("send");
                assert_eq!(next_text(&mut a).await, text, "{path}");
            }
            let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
            b.send(Message::binary(bytes.clone())).await.expect("send");
            match next(&mut b).await {
                Message::Binary(got) => assert_eq!(got.as_ref(), &bytes[..], "{path}"),
                other => panic!("{path}: expected binary, got {other:?}"),
            }
            // Each connection gets its own replies, shared instance or not.
            a.send(Message::text("to a")).await.expect("send");
            b.send(Message::text("to b")).await.expect("send");
            assert_eq!(next_text(&mut a).await, "to a", "{path}");
            assert_eq!(next_text(&mut b).await, "to b", "{path}");
        }
    }
}

#[tokio::test]
async fn every_language_chat_welcomes_announces_relays_and_says_goodbye_alike() {
    let (gw, langs) = serve_all("languages-chat");
    for lang in &langs {
        for path in paths(lang, "chat") {
            let url = |q: &str| gw.url(&format!("{path}?{q}"));
            let mut ana = connect(&url("room=lobby&name=ana")).await;
            assert_eq!(
                next_text(&mut ana).await,
                r#"{"members":1,"name":"ana","room":"lobby","type":"welcome"}"#,
                "{path}"
            );
            let mut bob = connect(&url("room=lobby&name=bob")).await;
            assert_eq!(
                next_text(&mut bob).await,
                r#"{"members":2,"name":"bob","room":"lobby","type":"welcome"}"#,
                "{path}"
            );
            assert_eq!(
                next_text(&mut ana).await,
                r#"{"name":"bob","room":"lobby","type":"join"}"#,
                "{path}"
            );
            send(&mut bob, "hi \"ana\" \\ ✓").await;
            assert_eq!(
                next_text(&mut ana).await,
                r#"{"from":"bob","room":"lobby","text":"hi \"ana\" \\ ✓","type":"message"}"#,
                "{path}"
            );
            // The sender hears nothing of its own message: its next frame is
            // ana's.
            send(&mut ana, "hey").await;
            assert_eq!(
                next_text(&mut bob).await,
                r#"{"from":"ana","room":"lobby","text":"hey","type":"message"}"#,
                "{path}"
            );
            bob.close(None).await.expect("close");
            assert_eq!(
                next_text(&mut ana).await,
                r#"{"name":"bob","room":"lobby","type":"leave"}"#,
                "{path}"
            );
            // Without a name, the guest name; in another room, alone.
            let mut guest = connect(&url("room=kitchen")).await;
            let welcome = next_json(&mut guest).await;
            assert_eq!(welcome["members"], 1, "{path}");
            assert!(
                welcome["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("guest-")),
                "{path}: {welcome}"
            );
        }
    }
}

#[tokio::test]
async fn every_language_chat_refuses_bad_names_with_400_and_binary_with_1003() {
    let (gw, langs) = serve_all("languages-chat-refusals");
    for lang in &langs {
        for path in paths(lang, "chat") {
            let long = "n".repeat(65);
            for query in [format!("name={long}"), "name=".into(), "room=a%01b".into()] {
                let reply = http(gw.addr, &upgrade_request(&format!("{path}?{query}"), "")).await;
                assert_eq!(reply.status, 400, "{path}?{query}: {}", reply.head);
                assert_eq!(
                    reply.body, "room and name must be 1 to 64 printable characters",
                    "{path}?{query}"
                );
            }
            let mut ws = connect(&gw.url(&format!("{path}?name=ana"))).await;
            next_text(&mut ws).await;
            ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
            let reason = expect_close(&mut ws, 1003).await;
            assert_eq!(reason, "chat accepts text messages only", "{path}");
        }
    }
}
