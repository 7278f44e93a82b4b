//! `auth`: token-checked connections.
//!
//! The route config `users` maps tokens to user names:
//! `users = "s3cret=alice,hunter2=bob"`. A client presents its token as
//! `Authorization: Bearer <token>` or `?token=<token>`. Without a valid token
//! the upgrade is refused with 401 and a plain-text body. On success the user
//! name is stored in the connection's metadata (`user`), the client is greeted
//! with `hello, <user>`, and each text message is answered with
//! `<user>: <message>`.

use wasmgate_sdk::{config, export, Connection, Handler, Header, Message, OpenResponse, Reject, Request};

struct Auth;

fn user_for(token: &str) -> Option<String> {
    let users = config("users")?;
    users.split(',').find_map(|entry| {
        let (t, user) = entry.trim().split_once('=')?;
        (!t.is_empty() && t == token).then(|| user.trim().to_owned())
    })
}

fn token(req: &Request) -> Option<String> {
    if let Some(h) = req.header("authorization") {
        if let Some(t) = h.strip_prefix("Bearer ") {
            return Some(t.trim().to_owned());
        }
    }
    req.query_param("token")
}

impl Handler for Auth {
    fn on_open(conn: Connection, req: &Request) -> OpenResponse {
        let Some(user) = token(req).as_deref().and_then(user_for) else {
            return OpenResponse::Reject(Reject {
                status: 401,
                headers: vec![
                    Header { name: "www-authenticate".into(), value: "Bearer".into() },
                    Header { name: "content-type".into(), value: "text/plain; charset=utf-8".into() },
                ],
                body: b"missing or invalid token".to_vec(),
            });
        };
        if conn.set_metadata("user", &user).is_err() {
            return OpenResponse::reject(503, "cannot store the session");
        }
        let _ = conn.send_text(&format!("hello, {user}"));
        OpenResponse::accept()
    }

    fn on_message(conn: Connection, msg: Message) {
        if let Message::Text(text) = msg {
            let user = conn.metadata("user").ok().flatten().unwrap_or_default();
            let _ = conn.send_text(&format!("{user}: {text}"));
        }
    }
}

export!(Auth);
