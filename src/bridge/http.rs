//! HTTP/1.1 on the shards: parse one request (headers with httparse, then a
//! `Content-Length` body), decide what it asks for, and build responses.
//!
//! Every response closes the connection (`Connection: close`): the endpoints
//! here are a sync fallback, a health check, metrics and a page, none of
//! which gains from keep-alive enough to justify a second request state
//! machine in the shard. Requests are bounded before they are buffered:
//! 8 KiB of headers, bodies up to the frame limit.

use swiftlet_protocol::{pb, ErrorCode};

/// Largest accepted request head.
pub const MAX_HEAD: usize = 8 * 1024;

/// A parsed request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    pub websocket_key: Option<String>,
    pub upgrade_websocket: bool,
    pub body: Vec<u8>,
}

/// Why bytes are not an acceptable request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head over 8 KiB")]
    HeadTooLarge,
    #[error("request body over the limit")]
    BodyTooLarge,
}

/// Parse a request from the front of `buf`. `Ok(None)`: not all there yet.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    // httparse sees at most MAX_HEAD bytes: a byte past the limit cannot
    // make a head Malformed that is already too large, so the answer does
    // not depend on how the reads split the request.
    let head_len = match req.parse(&buf[..buf.len().min(MAX_HEAD)]) {
        // The limit holds however the head arrived: whole in one read too.
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        ..Request::default()
    };
    let mut content_length = 0usize;
    let mut connection_upgrade = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        match h.name.to_ascii_lowercase().as_str() {
            "host" => out.host = Some(value),
            "origin" => out.origin = Some(value),
            "authorization" => out.authorization = Some(value),
            "sec-websocket-key" => out.websocket_key = Some(value),
            "upgrade" => out.upgrade_websocket = value.eq_ignore_ascii_case("websocket"),
            "connection" => connection_upgrade = value.to_ascii_lowercase().contains("upgrade"),
            "content-length" => {
                content_length = value
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad Content-Length".into()))?;
            }
            "transfer-encoding" => {
                return Err(HttpError::Malformed(
                    "chunked bodies are not accepted".into(),
                ))
            }
            _ => {}
        }
    }
    out.upgrade_websocket &= connection_upgrade;
    if content_length > max_body {
        return Err(HttpError::BodyTooLarge);
    }
    if buf.len() < head_len + content_length {
        return Ok(None);
    }
    out.body = buf[head_len..head_len + content_length].to_vec();
    Ok(Some((out, head_len + content_length)))
}

/// The value of query parameter `name`.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `503` with `Retry-After: 1` and `text` (a connection past a cap),
/// without the JSON body: it is written before anything is known of the
/// request.
pub fn busy(text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

impl HttpError {
    /// The answer to a request refused by [`parse`]: `413` for a head or
    /// body over its limit, `400` for a malformed one.
    pub fn answer(&self) -> Vec<u8> {
        let code = match self {
            HttpError::BodyTooLarge | HttpError::HeadTooLarge => ErrorCode::BodyTooLarge,
            HttpError::Malformed(_) => ErrorCode::InvalidRequest,
        };
        error(code, &self.to_string())
    }
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A JSON response.
pub fn json(status: u16, body: &impl serde::Serialize) -> Vec<u8> {
    match serde_json::to_vec(body) {
        Ok(b) => response(status, "application/json", &b),
        Err(_) => response(
            500,
            "application/json",
            br#"{"code":2007,"error":"INTERNAL"}"#,
        ),
    }
}

/// The HTTP status that goes with a protocol error code.
pub fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::AuthFailed | ErrorCode::TokenExpired | ErrorCode::TokenRevoked => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::NotFound => 404,
        ErrorCode::BodyTooLarge | ErrorCode::FrameTooLarge => 413,
        ErrorCode::RateLimited | ErrorCode::TooManyConnections => 429,
        // Retry later: the request is fine (a disconnected poll, too, may
        // poll again at once; section 10 says reconnect with backoff).
        ErrorCode::StoreUnavailable
        | ErrorCode::ShuttingDown
        | ErrorCode::Unavailable
        | ErrorCode::HomeUnavailable
        | ErrorCode::Disconnected => 503,
        ErrorCode::NotHome => 421,
        ErrorCode::Internal => 500,
        _ => 400,
    }
}

/// A JSON error: `{"code": 3002, "error": "AUTH_FAILED", "message": "..."}`.
pub fn error(code: ErrorCode, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "code": code as i32,
        "error": code.as_str_name(),
        "message": message,
    });
    json(status_of(code), &body)
}

/// A JSON error from a protocol `Error` that says more (a cluster
/// redirect: `"redirect": {"node_id", "tcp_addr", "http_addr"}`, and
/// `"retry_after_ms"`).
pub fn refusal(e: &swiftlet_protocol::pb::Error) -> Vec<u8> {
    let code = e.code();
    let mut body = serde_json::json!({
        "code": e.code,
        "error": code.as_str_name(),
        "message": e.message,
    });
    if let Some(r) = &e.redirect {
        body["redirect"] = serde_json::json!({
            "node_id": r.node_id,
            "tcp_addr": r.tcp_addr,
            "http_addr": r.http_addr,
        });
    }
    if e.retry_after_ms > 0 {
        body["retry_after_ms"] = e.retry_after_ms.into();
    }
    json(status_of(code), &body)
}

/// The 101 answer to a WebSocket upgrade.
pub fn upgrade(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        super::ws::accept_key(key)
    )
    .into_bytes()
}

/// Origin policy for WebSocket upgrades. A page from another site must not
/// be able to open a socket with the user's credentials, so by default only
/// the server's own page (same origin as the Host header) and non-browser
/// clients (no Origin header) may; `allowed` adds origins, `*` allows any.
pub fn origin_allowed(req: &Request, allowed: &[String]) -> bool {
    let Some(origin) = req.origin.as_deref() else {
        return true;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    match (&req.host, origin.split_once("://")) {
        (Some(host), Some((_, rest))) => rest.eq_ignore_ascii_case(host),
        _ => false,
    }
}

/// The bearer token of a request.
pub fn bearer(req: &Request) -> Option<&str> {
    req.authorization
        .as_deref()
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The body of `POST /v1/messages`: a `Send` in proto3 JSON.
pub fn parse_send(body: &[u8]) -> Result<pb::Send, String> {
    serde_json::from_slice::<pb::Send>(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_in_pieces_with_bodies() {
        let raw = b"POST /v1/messages?x=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer tok\r\nContent-Length: 4\r\n\r\nabcdEXTRA";
        assert_eq!(parse(&raw[..20], 100), Ok(None));
        assert_eq!(parse(&raw[..raw.len() - 7], 100), Ok(None));
        let (req, used) = parse(raw, 100).expect("valid").expect("complete");
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.query.as_str()),
            ("POST", "/v1/messages", "x=1")
        );
        assert_eq!(bearer(&req), Some("tok"));
        assert_eq!(req.body, b"abcd");
        assert_eq!(used, raw.len() - 5);
        assert_eq!(parse(raw, 3).err(), Some(HttpError::BodyTooLarge));
        assert!(matches!(
            parse(b"\x00\x01garbage\r\n\r\n", 10),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn a_head_over_the_limit_is_refused_even_when_it_arrives_whole() {
        let long = "x".repeat(MAX_HEAD);
        let raw = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Long: {long}\r\n\r\n");
        assert_eq!(
            parse(raw.as_bytes(), 100).err(),
            Some(HttpError::HeadTooLarge)
        );
        // And while it is still arriving.
        assert_eq!(
            parse(&raw.as_bytes()[..MAX_HEAD + 10], 100).err(),
            Some(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn origins_are_checked_against_the_host() {
        let mut req = Request {
            host: Some("127.0.0.1:7480".into()),
            origin: Some("http://127.0.0.1:7480".into()),
            ..Request::default()
        };
        assert!(origin_allowed(&req, &[]));
        req.origin = Some("https://evil.example".into());
        assert!(!origin_allowed(&req, &[]));
        assert!(origin_allowed(&req, &["https://evil.example".into()]));
        req.origin = None;
        assert!(origin_allowed(&req, &[]));
    }

    #[test]
    fn sends_parse_from_proto3_json() {
        let s = parse_send(
            br#"{"clientMsgId":"c1","toUser":"bob","contentType":"text/plain","body":"aGk="}"#,
        )
        .expect("valid");
        assert_eq!(
            (s.client_msg_id.as_str(), s.to_user.as_str(), &s.body[..]),
            ("c1", "bob", &b"hi"[..])
        );
        assert!(parse_send(b"{not json").is_err());
        assert_eq!(query_param("after=5&limit=2", "limit"), Some("2"));
    }
}
