//! TLS for clients: the one connector the client library, the CLI and
//! loadgen share, and the stream type that is either plain or TLS.
//!
//! A [`TlsConnector`] trusts either the PEM certificates of one file
//! (`--ca FILE`: a private CA, or a self-signed server certificate) or the
//! system's certificate store, and verifies the server's name against the
//! host part of the address it dials (a DNS name or an IP address). It
//! offers the ALPN the server's port expects: `swiftlet` on the protocol
//! port, `http/1.1` for WSS ([`TlsConnector::for_http`]); a server on the
//! wrong port then refuses the handshake instead of misreading the bytes.
//!
//! The crypto provider is ring, like the server's (see the workspace
//! Cargo.toml for why).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;

/// ALPN of the protocol port.
pub const ALPN_SWIFTLET: &[u8] = b"swiftlet";
/// ALPN of the HTTP port (WSS).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a TLS client could not be set up or could not connect.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("no trusted certificate in the system store ({0}); pass --ca FILE")]
    NoSystemRoots(String),
    #[error("{0:?} is not a host name or IP address to verify the server's certificate against")]
    BadServerName(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS flags of the CLI and loadgen (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Speak TLS to the server (it runs with --tls-cert), trusting the
    /// system's CA store unless --ca is given.
    #[arg(long)]
    pub tls: bool,
    /// Trust the PEM certificate(s) in FILE (a private CA, or the server's
    /// self-signed certificate) instead of the system's store; implies --tls.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Check the server's certificate for NAME instead of the host dialled
    /// (e.g. when dialling an IP address the certificate does not name);
    /// implies --tls.
    #[arg(long, value_name = "NAME")]
    pub tls_name: Option<String>,
}

impl TlsArgs {
    /// The connector these flags ask for, or `None` for plain TCP.
    pub fn connector(&self) -> Result<Option<TlsConnector>, TlsError> {
        if !self.tls && self.ca.is_none() && self.tls_name.is_none() {
            return Ok(None);
        }
        let mut c = TlsConnector::new(self.ca.as_deref())?;
        if let Some(name) = &self.tls_name {
            c = c.with_server_name(name)?;
        }
        Ok(Some(c))
    }
}

/// Connects TLS over an established stream. Cheap to clone (two `Arc`s).
#[derive(Clone)]
pub struct TlsConnector {
    inner: tokio_rustls::TlsConnector,
    /// Where the trusted certificates came from, for messages.
    trust: Arc<str>,
    /// The name to verify instead of the host dialled.
    name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// Trust the certificates in the PEM file `ca` (a CA, or the server's
    /// own self-signed certificate), or, with `None`, the system's store.
    /// Offers ALPN `swiftlet` (the protocol port).
    pub fn new(ca: Option<&Path>) -> Result<TlsConnector, TlsError> {
        let (roots, trust) = match ca {
            Some(path) => (roots_from_file(path)?, path.display().to_string()),
            None => (system_roots()?, "the system store".to_owned()),
        };
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_SWIFTLET.to_vec()];
        Ok(TlsConnector {
            inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
            trust: trust.into(),
            name: None,
        })
    }

    /// Verify the server's certificate for `name` whatever host is dialled.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsConnector, TlsError> {
        self.name = Some(
            ServerName::try_from(name.to_owned())
                .map_err(|_| TlsError::BadServerName(name.to_owned()))?,
        );
        Ok(self)
    }

    /// The same trust, offering ALPN `http/1.1` (for WSS and HTTPS).
    pub fn for_http(&self) -> TlsConnector {
        let mut config = (**self.inner.config()).clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        TlsConnector {
            inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
            trust: self.trust.clone(),
            name: self.name.clone(),
        }
    }

    /// TLS over `stream`, verifying the certificate against the host part
    /// of `addr` (`host:port`, `[v6]:port`, or a bare host).
    pub async fn connect<S>(&self, addr: &str, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.inner.connect(name, stream).await
    }
}

/// The name a server's certificate must carry, from the address dialled.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host_of(addr);
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadServerName(host.to_owned()))
}

/// The host part of `host:port`, `[v6]:port`, `[v6]` or `host`.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Certificates the store holds but rustls cannot use are skipped, as
    // every browser does.
    let (_added, _skipped) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "it is empty".to_owned(), ToString::to_string);
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(roots)
}

/// A connection that speaks TLS or not, as one type for the code above it.
// The TLS variant is boxed: rustls's state is a kilobyte or more, and a
// plain connection should not carry its size.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    /// The underlying socket.
    pub fn get_ref(&self) -> &S {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.get_ref().0,
        }
    }

    /// The protocol agreed by ALPN, on TLS.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(t) => t.get_ref().1.alpn_protocol(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    /// `stream` as is, or with TLS through `tls` (verified against `addr`).
    pub async fn connect(
        stream: S,
        tls: Option<&TlsConnector>,
        addr: &str,
    ) -> io::Result<MaybeTls<S>> {
        Ok(match tls {
            None => MaybeTls::Plain(stream),
            Some(c) => MaybeTls::Tls(Box::new(c.connect(addr, stream).await?)),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(t) => t.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_what_the_certificate_is_checked_against() {
        assert_eq!(host_of("chat.example.com:7400"), "chat.example.com");
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
        assert!(server_name("127.0.0.1:7400").is_ok());
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("swiftlet-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let err = TlsConnector::new(Some(&path)).expect_err("refused");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let missing = TlsConnector::new(Some(&dir.join("missing.pem"))).expect_err("refused");
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
