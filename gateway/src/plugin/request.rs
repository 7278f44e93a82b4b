//! The upgrade request as a connection keeps it for `on-resume`: one
//! allocation instead of one per string.
//!
//! A connection that hibernates or migrates gives its new instance the
//! request it opened with (`resume.on-resume` in `wit/plugin.wit`). Kept as
//! the WIT record, a request with ten headers is some twenty-five small
//! heap strings and vectors (about 0.9 KiB with the allocator's rounding);
//! packed, it is its bytes plus four bytes per string, rebuilt only when an
//! instance that exports `on-resume` needs it.

use crate::bindings::wasmgate::plugin::types::{Header, Request};

/// A [`Request`] packed into one buffer: each string as a little-endian
/// `u32` length and its UTF-8 bytes, in the order method, path, query
/// (flag byte then string), remote address, header count, header names and
/// values, subprotocol count, subprotocols.
#[derive(Debug, Clone)]
pub struct PackedRequest(Box<[u8]>);

impl PackedRequest {
    /// Packs `request`.
    pub fn pack(request: &Request) -> PackedRequest {
        let strings = [&request.method, &request.path, &request.remote_addr]
            .into_iter()
            .chain(request.query.iter())
            .chain(request.headers.iter().flat_map(|h| [&h.name, &h.value]))
            .chain(request.subprotocols.iter());
        let len: usize = strings.map(|s| 4 + s.len()).sum::<usize>() + 1 + 8;
        let mut out = Vec::with_capacity(len);
        put(&mut out, &request.method);
        put(&mut out, &request.path);
        match &request.query {
            Some(q) => {
                out.push(1);
                put(&mut out, q);
            }
            None => out.push(0),
        }
        put(&mut out, &request.remote_addr);
        put_count(&mut out, request.headers.len());
        for h in &request.headers {
            put(&mut out, &h.name);
            put(&mut out, &h.value);
        }
        put_count(&mut out, request.subprotocols.len());
        for p in &request.subprotocols {
            put(&mut out, p);
        }
        PackedRequest(out.into_boxed_slice())
    }

    /// The request as it was packed.
    pub fn unpack(&self) -> Request {
        let mut r = Reader(&self.0);
        let method = r.string();
        let path = r.string();
        let query = (r.byte() == 1).then(|| r.string());
        let remote_addr = r.string();
        let headers = (0..r.count())
            .map(|_| Header {
                name: r.string(),
                value: r.string(),
            })
            .collect();
        let subprotocols = (0..r.count()).map(|_| r.string()).collect();
        Request {
            method,
            path,
            query,
            headers,
            remote_addr,
            subprotocols,
        }
    }
}

fn put(out: &mut Vec<u8>, s: &str) {
    put_count(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    // Requests are bounded by hyper's header limits, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// Reads back what [`PackedRequest::pack`] wrote. The buffer is only ever
/// written by `pack`, so a short read (impossible) yields empty values
/// rather than a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn count(&mut self) -> usize {
        let b = self.take(4);
        let n = <[u8; 4]>::try_from(b).map_or(0, u32::from_le_bytes);
        n as usize
    }

    fn string(&mut self) -> String {
        let n = self.count();
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn a_packed_request_unpacks_to_the_same_request() {
        let request = Request {
            method: "GET".into(),
            path: "/chat".into(),
            query: Some("room=a&é=1".into()),
            headers: vec![header("host", "example.com"), header("x-empty", "")],
            remote_addr: "127.0.0.1:5000".into(),
            subprotocols: vec!["v1".into(), "v2.chat".into()],
        };
        let packed = PackedRequest::pack(&request);
        assert_eq!(format!("{:?}", packed.unpack()), format!("{request:?}"));
        let no_query = Request {
            query: None,
            headers: vec![],
            subprotocols: vec![],
            ..request
        };
        assert_eq!(
            format!("{:?}", PackedRequest::pack(&no_query).unpack()),
            format!("{no_query:?}")
        );
    }
}
