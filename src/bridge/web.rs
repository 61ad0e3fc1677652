//! The web chat page, embedded in the binary so `swiftlet serve` needs no
//! files beside it. The page's protobuf code parses `/swiftlet.proto` at
//! load time, so the wire schema has one source: `protocol/proto`.

/// The file served at `path`, with its content type.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", include_bytes!("web/index.html")),
        "/static/app.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("web/app.js"),
        ),
        "/static/client.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("web/client.js"),
        ),
        "/static/style.css" => ("text/css; charset=utf-8", include_bytes!("web/style.css")),
        "/static/protobuf.min.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("web/protobuf.min.js"),
        ),
        "/swiftlet.proto" => (
            "text/plain; charset=utf-8",
            include_bytes!("../../protocol/proto/swiftlet.proto"),
        ),
        _ => return None,
    })
}
