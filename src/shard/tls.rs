//! TLS on the shard's own sockets: the certificate the listeners serve
//! ([`TlsConfig`], reloaded on SIGHUP), and one connection's TLS state
//! ([`TlsSession`]), driven from the shard's buffers.
//!
//! # Why rustls's unbuffered API
//!
//! Density is swiftlet's headline, and a buffered `rustls::ServerConnection`
//! keeps a 4 KiB receive buffer per connection for as long as the
//! connection lives (it is resized to 4 KiB before every read and never
//! freed), plus its plaintext and ciphertext queues. Its unbuffered twin,
//! [`UnbufferedServerConnection`], keeps no I/O buffer at all: the caller
//! hands it the ciphertext and takes the records it produces. So a TLS
//! connection here holds only what TLS itself needs (the keys, the
//! handshake state) plus two byte vectors that are empty, with no heap,
//! whenever the connection is idle: `rx` for a record that arrived in part,
//! `tx` for sealed records the socket did not take yet. Ciphertext is read
//! into a second shard-wide scratch buffer, and the plaintext records come
//! out into the shard's usual scratch buffer, where the framing code finds
//! them exactly as it finds a plain connection's bytes.
//!
//! Measured (a counting allocator, 1,000 TLS 1.3 sessions held after their
//! handshakes, ring): a buffered `ServerConnection` keeps 7,427 B of heap
//! per connection, this one 3,234 B in 6 allocations: the session struct
//! (1,144 B, most of it rustls's inline state), the traffic key schedule
//! (640 B, kept for KeyUpdate), the two record keys (560 B each: ring's
//! AEAD key is one size whatever the suite, so preferring ChaCha20 saves
//! nothing) and a little more. What remains is rustls's own; the next step
//! down would be to take the traffic secrets out of rustls after the
//! handshake and seal records with ring directly (about 150 B a
//! connection), at the price of owning the record layer.
//!
//! # Reload
//!
//! [`TlsConfig`] holds the current `ServerConfig` of each listener behind
//! a lock that is taken for a pointer copy per accepted connection. A
//! reload builds the new configs completely (certificate chain parsed, key
//! parsed and matched to the certificate) before swapping them in, so a bad
//! file leaves the old certificate serving; connections already
//! established keep the config they were accepted with (rustls holds it by
//! `Arc`), so nothing is dropped. The session-ticket key survives reloads,
//! so a ticket issued before one still resumes after it.
//!
//! # What this never does
//!
//! It never blocks (there is no socket here: the shard does the reads and
//! writes), and it never holds plaintext beyond one call: what a read
//! decrypts goes straight to the caller's buffer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::ServerConfig;

/// ALPN of the protocol port. A client may offer it, and should; one that
/// offers only other protocols (`h2`, `http/1.1`: a browser or an HTTP
/// client at the wrong port) is refused in the handshake.
pub const ALPN_SWIFTLET: &[u8] = b"swiftlet";
/// ALPN of the HTTP port: HTTP/1.1 only (the bridge speaks no HTTP/2).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The first byte of every TLS handshake record. A connection to a TLS
/// port whose first byte is anything else is not speaking TLS, and is told
/// so in plaintext instead of being answered with a TLS alert it cannot read.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// TLS 1.3 tickets sent after a full handshake: one, so a reconnecting
/// client resumes (one round trip, no certificate signature) without the
/// server keeping anything per session (stateless tickets).
const TICKETS_PER_HANDSHAKE: usize = 1;

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate both listeners serve, replaceable while running.
pub struct TlsConfig {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// Issues and opens session tickets; kept across reloads.
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The protocol port's config (ALPN `swiftlet`).
    tcp: RwLock<Arc<ServerConfig>>,
    /// The HTTP port's config (ALPN `http/1.1`).
    http: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Load the PEM certificate chain and private key at these paths.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsConfig, TlsError> {
        let ticketer = provider::Ticketer::new()?;
        let (tcp, http) = build(cert_path, key_path, &ticketer)?;
        Ok(TlsConfig {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            ticketer,
            tcp: RwLock::new(tcp),
            http: RwLock::new(http),
        })
    }

    /// Read the files again and serve what they now hold to new
    /// connections. On any error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (tcp, http) = build(&self.cert_path, &self.key_path, &self.ticketer)?;
        *self.tcp.write() = tcp;
        *self.http.write() = http;
        Ok(())
    }

    /// A server session for a connection just accepted on the protocol
    /// port (`http == false`) or the HTTP port.
    pub fn session(&self, http: bool) -> Result<Box<TlsSession>, rustls::Error> {
        let config = if http {
            self.http.read().clone()
        } else {
            self.tcp.read().clone()
        };
        Ok(Box::new(TlsSession {
            conn: UnbufferedServerConnection::new(config)?,
            rx: Vec::new(),
            tx: Vec::new(),
            started: false,
            close_sent: false,
        }))
    }
}

/// Both listeners' configs from the files: the same certificate and
/// ticketer, each with its own ALPN.
fn build(
    cert_path: &Path,
    key_path: &Path,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let make = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
        let mut c = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            // Checks that the key signs for the certificate's public key.
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| TlsError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                reason: e.to_string(),
            })?;
        c.alpn_protocols = vec![alpn.to_vec()];
        c.ticketer = ticketer.clone();
        c.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
        // Resumption is by stateless ticket only: a per-node cache of
        // sessions would be memory per recent client, and would not
        // survive a restart or reach another node anyway.
        c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(c))
    };
    Ok((make(ALPN_SWIFTLET)?, make(ALPN_HTTP1)?))
}

/// What one batch of ciphertext gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Plaintext bytes written to the front of the output buffer.
    pub plain: usize,
    /// The peer sent close_notify: it will send nothing more.
    pub peer_closed: bool,
}

/// One connection's TLS: rustls's state, and the ciphertext the shard's
/// buffers cannot hold between turns.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// The front of a record whose rest has not arrived (less than one
    /// record, ≤ 16.7 KiB); no heap when none is pending.
    rx: Vec<u8>,
    /// Sealed records the socket has not taken; no heap when none.
    tx: Vec<u8>,
    /// Some bytes arrived (the first was checked to be TLS).
    started: bool,
    /// close_notify is queued or sent.
    close_sent: bool,
}

impl TlsSession {
    /// True once a byte was received (see [`TLS_HANDSHAKE_BYTE`]).
    pub fn started(&self) -> bool {
        self.started
    }

    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// The handshake is complete: application data flows both ways.
    pub fn established(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// The partial record kept from the last read (moved out).
    pub fn take_rx(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.rx)
    }

    /// Put back a partial record taken with [`Self::take_rx`] (the read
    /// that was to complete it failed).
    pub fn restore_rx(&mut self, bytes: &[u8]) {
        self.rx = bytes.to_vec();
    }

    /// close_notify was queued.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Sealed records waiting for the socket.
    pub fn tx(&self) -> &[u8] {
        &self.tx
    }

    /// The socket took the first `n` bytes of [`Self::tx`].
    pub fn consume_tx(&mut self, n: usize) {
        if n >= self.tx.len() {
            self.tx = Vec::new();
        } else {
            self.tx.drain(..n);
        }
    }

    /// Memory this session's byte buffers hold (what the connection's
    /// budget counts; the rest is rustls's fixed state).
    pub fn buffered(&self) -> usize {
        self.rx.capacity() + self.tx.len()
    }

    /// Run `cipher` (whole records, possibly followed by the front of one
    /// more) through the handshake or the record layer. Plaintext goes to
    /// the front of `plain_out`, handshake answers to [`Self::tx`], and a
    /// trailing partial record is kept for the next call. `plain_out` must
    /// be at least as long as `cipher` (a record's plaintext is shorter
    /// than the record).
    ///
    /// An error ends the connection; the alert that tells the peer why is
    /// then in [`Self::tx`] (see [`Self::queue_alert`]).
    pub fn open(
        &mut self,
        cipher: &mut [u8],
        plain_out: &mut [u8],
    ) -> Result<Opened, rustls::Error> {
        let mut opened = Opened::default();
        let mut start = 0;
        loop {
            let status = self.conn.process_tls_records(&mut cipher[start..]);
            let discard = status.discard;
            let mut done = false;
            match status.state? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let payload = record?.payload;
                        let end = opened.plain + payload.len();
                        let Some(to) = plain_out.get_mut(opened.plain..end) else {
                            return Err(rustls::Error::General(
                                "plaintext larger than its records".into(),
                            ));
                        };
                        to.copy_from_slice(payload);
                        opened.plain = end;
                    }
                }
                ConnectionState::ReadEarlyData(mut records) => {
                    // 0-RTT is not enabled (max_early_data_size is 0), so
                    // this does not happen; were it to, the data is ignored
                    // rather than run twice on a replay.
                    while records.next_record().is_some() {}
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.tx, |buf| encode.encode(buf))?;
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Queued in `tx`; the shard writes it this turn.
                    transmit.done();
                }
                ConnectionState::PeerClosed => opened.peer_closed = true,
                ConnectionState::Closed => {
                    opened.peer_closed = true;
                    done = true;
                }
                // Everything whole was consumed: wait for more bytes.
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => done = true,
                _ => done = true,
            }
            start += discard;
            if done {
                break;
            }
        }
        let rest = &cipher[start..];
        if !rest.is_empty() {
            self.rx = rest.to_vec();
        }
        Ok(opened)
    }

    /// Seal `plain` into records at the end of [`Self::tx`]. False when the
    /// handshake is not complete (nothing was sealed).
    pub fn seal(&mut self, plain: &[u8]) -> Result<bool, rustls::Error> {
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::WriteTraffic(mut write) => {
                    if !plain.is_empty() {
                        encrypt_into(&mut self.tx, plain.len(), |buf| write.encrypt(plain, buf))?;
                    }
                    return Ok(true);
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.tx, |buf| encode.encode(buf))?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::ReadTraffic(mut records) => {
                    // `open` drains every record it decrypts; nothing waits.
                    while records.next_record().is_some() {}
                }
                ConnectionState::PeerClosed => {}
                _ => return Ok(false),
            }
        }
    }

    /// Queue close_notify (once), so the peer can tell a complete close
    /// from a cut connection. Nothing when the handshake is not complete.
    pub fn queue_close_notify(&mut self) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::WriteTraffic(mut write)) => {
                    let _ = encrypt_into(&mut self.tx, 0, |buf| write.queue_close_notify(buf));
                    return;
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.tx, |buf| encode.encode(buf)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::PeerClosed) => {}
                _ => return,
            }
        }
    }

    /// After [`Self::open`] failed: move the alert rustls queued for the
    /// peer (if any) into [`Self::tx`].
    pub fn queue_alert(&mut self) {
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.tx, |buf| encode.encode(buf)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }
}

/// Append what `encode` writes to `tx`, growing it to the size it asks for.
fn encode_into(
    tx: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    let mut want = 512;
    loop {
        let at = tx.len();
        tx.resize(at + want, 0);
        match encode(&mut tx[at..]) {
            Ok(n) => {
                tx.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > want =>
            {
                tx.truncate(at);
                want = required_size;
            }
            Err(e) => {
                tx.truncate(at);
                return Err(rustls::Error::General(format!(
                    "encoding a TLS record: {e}"
                )));
            }
        }
    }
}

/// Append what `encrypt` seals of `len` plaintext bytes to `tx`, growing it
/// to the size it asks for.
fn encrypt_into(
    tx: &mut Vec<u8>,
    len: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    // Records carry at most 16 KiB; each adds a header, a content type
    // byte, padding of none, and an AEAD tag (or, in TLS 1.2, an explicit
    // nonce and a tag): 64 bytes covers every suite offered.
    let mut want = len + (len / 16_384 + 1) * 64;
    loop {
        let at = tx.len();
        tx.resize(at + want, 0);
        match encrypt(&mut tx[at..]) {
            Ok(n) => {
                tx.truncate(at + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > want =>
            {
                tx.truncate(at);
                want = required_size;
            }
            Err(e) => {
                tx.truncate(at);
                return Err(rustls::Error::General(format!("sealing a TLS record: {e}")));
            }
        }
    }
}
