//! `donate gateway`: an OpenAI-compatible HTTP API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`) in front of `local_lm` donors,
//! each request a `prompt` job of the `chat` extension (docs/PROTOCOL.md
//! §10.9) on the least loaded donor serving the model asked for.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use donate_host::NodeAddr;
use donate_proto::{
    Capability, ChatMessage, ClientConfig, FinishReason, NodeTrust, PartialOutput, PromptRequest,
    SamplingParams, SecureClientConfig, Usage,
};
use donate_tokio::Client;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Failure, GatewayArgs};

/// A donor the gateway sends jobs to.
struct Donor {
    addr: NodeAddr,
    /// Secure mode: the key pinned (a first-use key once learned).
    secure: Mutex<Option<SecureClientConfig>>,
    /// Requests running on it now (for the choice of donor).
    in_flight: AtomicUsize,
    /// The model its last `hello` named, and when (refreshed when stale).
    model: Mutex<Option<(String, Instant)>>,
    /// Connections that answered a request, kept for the next one (no
    /// connect, `hello` or secure handshake then), with when they were put back.
    idle: Mutex<Vec<(Client, Instant)>>,
}

/// Idle connections kept per donor.
const MAX_IDLE_PER_DONOR: usize = 8;
/// How long an idle donor connection is kept (well under a node's 300 s
/// idle timeout).
const IDLE_FOR: Duration = Duration::from_secs(30);

impl Donor {
    /// A connection kept from an earlier request, if one is fresh enough.
    fn take_idle(&self) -> Option<Client> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((client, at)) = idle.pop() {
            if at.elapsed() < IDLE_FOR {
                return Some(client);
            }
        }
        None
    }

    /// Keeps `client`, which has just answered a request in full.
    fn put_back(&self, client: Client) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(_, at)| at.elapsed() < IDLE_FOR);
        if idle.len() < MAX_IDLE_PER_DONOR {
            idle.push((client, Instant::now()));
        }
    }
}

/// What every request handler shares.
struct Gateway {
    donors: Vec<Donor>,
    /// Accepted bearer keys (re-read when the file changes); `None`: no key
    /// needed (loopback, or --insecure).
    keys: Option<Mutex<ApiKeys>>,
    /// Requests running now, by key name, against each key's concurrency.
    running: Mutex<HashMap<String, usize>>,
    /// `--key-concurrency`: a key's limit unless its line sets one.
    key_concurrency: usize,
    /// HTTP connections: permits held by open ones (`--max-connections`).
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    /// Connections closed on arrival because `--max-connections` were open.
    refused_connections: std::sync::atomic::AtomicU64,
    /// Seconds since the epoch at start, the `created` of every model.
    started: u64,
    /// What `/metrics` reports.
    metrics: GatewayMetrics,
    /// Conversations' donors: the hash of a model and a conversation so far
    /// (its reply included) → the donor that answered it, so that the next
    /// turn goes there (a donor-side prompt cache pays off).
    affinity: Mutex<HashMap<u64, String>>,
    /// Where the next tie between equally loaded donors starts.
    turn: AtomicUsize,
}

/// Conversations [`Gateway::affinity`] remembers before it starts over.
const MAX_AFFINITY: usize = 4096;

/// The hash naming a conversation of `model`.
fn conversation_key(model: &str, messages: &[ChatMessage]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    for m in messages {
        (&m.role, &m.content).hash(&mut h);
    }
    h.finish()
}

/// How long a donor's model name is trusted before its `hello` is read again.
const MODEL_TTL: Duration = Duration::from_secs(10);
/// Longest a donor may take to connect and say hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the gateway until the process is stopped.
pub fn run(args: GatewayArgs) -> Result<(), Failure> {
    let exposed = !args.listen.ip().is_loopback();
    let keys = match &args.api_keys {
        Some(path) => Some(Mutex::new(ApiKeys::load(path)?)),
        None if exposed && !args.insecure => {
            return Err(Failure::from(format!(
                "refusing to listen on {} without --api-keys FILE: anyone on the network could use your donors (pass --insecure to allow it)",
                args.listen
            )))
        }
        None => None,
    };
    if keys.is_none() && exposed {
        tracing::warn!(listen = %args.listen, "the gateway takes requests from anyone (--insecure)");
    }
    let donors = donors(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let gateway = Arc::new(Gateway {
        donors,
        keys,
        running: Mutex::new(HashMap::new()),
        key_concurrency: args.key_concurrency,
        connections: Arc::new(tokio::sync::Semaphore::new(args.max_connections)),
        max_connections: args.max_connections,
        refused_connections: Default::default(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        metrics: GatewayMetrics::default(),
        affinity: Mutex::new(HashMap::new()),
        turn: AtomicUsize::new(0),
    });
    let body_limits = BodyLimits {
        max: args.max_body as usize,
        timeout: Duration::from_secs_f64(args.body_timeout),
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(args.max_body as usize))
        .layer(axum::middleware::from_fn_with_state(body_limits, read_body))
        .with_state(Arc::clone(&gateway));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listening address: {e}"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("gateway listening on {scheme}://{local}");
        tracing::info!(%local, scheme, "gateway listening");
        let header_timeout = Duration::from_secs_f64(args.header_timeout);
        serve_http(listener, app, &gateway, header_timeout, tls).await;
        Ok(())
    })
}

/// `--tls-cert` and `--tls-key`: a TLS acceptor offering HTTP/1.1, or why not.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, Failure> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(key)
            .map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Failure::from(format!(
                "--tls-key {} is readable by others: chmod 600 it",
                key.display()
            )));
        }
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(Failure::from(format!(
            "--tls-cert {} holds no PEM certificate",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?;
    // ring, already built for snow, rather than aws-lc (a large C build); its
    // provider lacks post-quantum key exchange, hence rustls' deprecation.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            format!(
                "--tls-cert {} and --tls-key {} do not make a certificate: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts HTTP/1.1 connections (over TLS with `tls`) until Ctrl-C /
/// SIGTERM: at most `--max-connections` open (more are closed as they
/// arrive), each given `header_timeout` for its TLS handshake and for every
/// request's headers (an idle keep-alive connection included). On shutdown,
/// open connections finish the request they are on, for up to 10 s.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    gateway: &Gateway,
    header_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut last_warned: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "gateway: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&gateway.connections).try_acquire_owned() else {
            gateway.refused_connections.fetch_add(1, Ordering::Relaxed);
            if last_warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                last_warned = Some(Instant::now());
                tracing::warn!(
                    max = gateway.max_connections,
                    "gateway: --max-connections are open; closing new ones"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stopped = stopped.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, service, header_timeout, stopped).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(stream, service, header_timeout, stopped).await
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "gateway: TLS handshake failed"),
                    Err(_) => tracing::debug!("gateway: TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }
    let _ = stop.send(true);
    let all = u32::try_from(gateway.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        gateway.connections.acquire_many(all),
    )
    .await;
}

/// Serves one connection's requests until it closes, or until `stopped`
/// says the gateway shuts down (then after the request under way).
async fn serve_connection<S>(
    stream: S,
    service: hyper_util::service::TowerToHyperService<Router>,
    header_timeout: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `--max-body` and `--body-timeout`, for [`read_body`].
#[derive(Clone, Copy)]
struct BodyLimits {
    max: usize,
    timeout: Duration,
}

/// Reads a request's whole body before its handler runs: within
/// `--body-timeout` (408 past it, so a client trickling its body cannot hold
/// a connection) and `--max-body` (413).
async fn read_body(
    State(limits): State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max));
    match read.await {
        Ok(Ok(bytes)) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            next.run(request).await
        }
        Ok(Err(_)) => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is over {} bytes (the gateway's --max-body)",
                limits.max
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_too_large"),
        }
        .into_response(),
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s (the gateway's --body-timeout)",
                limits.timeout.as_secs_f64()
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("body_timeout"),
        }
        .into_response(),
    }
}

/// The donors, each with its secure settings when `--key` is given (each
/// node's key pinned from `--node-key` or known_nodes, as `donate batch` does).
fn donors(args: &GatewayArgs) -> Result<Vec<Donor>, Failure> {
    let keypair = match &args.key {
        Some(path) => Some(crate::secure::load_keypair(path)?),
        None => None,
    };
    let known = crate::secure::known_nodes_path();
    args.nodes
        .iter()
        .map(|addr| {
            let secure = match &keypair {
                None => None,
                Some(keypair) => {
                    let pinned = match &known {
                        Some(file) => crate::secure::known_node(file, &addr.to_string())?,
                        None => None,
                    };
                    let trust = match (pinned, args.trust_on_first_use) {
                        (Some(key), _) => NodeTrust::Pinned(key.fingerprint()),
                        (None, true) => NodeTrust::AnyKey,
                        (None, false) => {
                            return Err(Failure::from(format!(
                                "the key of {addr} is not known: connect once with `donate status --addr {addr} --key KEY --trust-on-first-use`, or pass --trust-on-first-use"
                            )))
                        }
                    };
                    Some(SecureClientConfig {
                        keypair: keypair.clone(),
                        trust,
                    })
                }
            };
            Ok(Donor {
                addr: addr.clone(),
                secure: Mutex::new(secure),
                in_flight: AtomicUsize::new(0),
                model: Mutex::new(None),
                idle: Mutex::new(Vec::new()),
            })
        })
        .collect()
}

/// One bearer key of `--api-keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyInfo {
    /// Its name (for logs and limits).
    name: String,
    /// Its own concurrency limit (`concurrency=N` on its line), if set.
    concurrency: Option<usize>,
}

/// The `--api-keys` file's keys, re-read when the file changes.
struct ApiKeys {
    path: std::path::PathBuf,
    keys: HashMap<String, KeyInfo>,
    /// The file's length and modification time when read.
    stamp: Option<(u64, SystemTime)>,
    /// When the file was last looked at.
    checked: Instant,
}

/// How often the `--api-keys` file is looked at for changes.
const KEYS_RECHECK: Duration = Duration::from_secs(1);

impl ApiKeys {
    fn load(path: &std::path::Path) -> Result<ApiKeys, Failure> {
        let stamp = file_stamp(path);
        Ok(ApiKeys {
            path: path.to_owned(),
            keys: read_api_keys(path)?,
            stamp,
            checked: Instant::now(),
        })
    }

    /// The key's entry, the file read again first if it changed (a file that
    /// became unreadable or invalid keeps the keys read before, logged).
    fn get(&mut self, key: &str) -> Option<KeyInfo> {
        if self.checked.elapsed() >= KEYS_RECHECK {
            self.checked = Instant::now();
            let stamp = file_stamp(&self.path);
            if stamp != self.stamp {
                self.stamp = stamp;
                match read_api_keys(&self.path) {
                    Ok(keys) => {
                        tracing::info!(keys = keys.len(), "gateway: --api-keys read again");
                        self.keys = keys;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "gateway: --api-keys changed and cannot be used; keeping the keys read before")
                    }
                }
            }
        }
        self.keys.get(key).cloned()
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// `--api-keys FILE`: one key per line, `KEY` or `NAME KEY`, optionally
/// followed by `concurrency=N`; `#` starts a comment. Refused when others may
/// read it.
fn read_api_keys(path: &std::path::Path) -> Result<HashMap<String, KeyInfo>, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("cannot read --api-keys {}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Failure::from(format!(
                "--api-keys {} is readable by others: chmod 600 it",
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --api-keys {}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    let lines = text
        .lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    for (at, line) in lines {
        let bad = |why: &str| {
            Failure::from(format!(
                "--api-keys {} line {}: {why} (a line is `KEY`, or `NAME KEY [concurrency=N]`)",
                path.display(),
                at + 1
            ))
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, key, options) = match words.as_slice() {
            [key] => (format!("key{}", at + 1), *key, &[][..]),
            [name, key, options @ ..] => ((*name).to_owned(), *key, options),
            [] => continue,
        };
        let mut concurrency = None;
        for option in options {
            match option.split_once('=') {
                Some(("concurrency", n)) => {
                    concurrency = Some(
                        n.parse::<usize>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| bad(&format!("{option} is not a positive number")))?,
                    )
                }
                _ => return Err(bad(&format!("unknown option {option:?}"))),
            }
        }
        keys.insert(key.to_owned(), KeyInfo { name, concurrency });
    }
    if keys.is_empty() {
        return Err(Failure::from(format!(
            "--api-keys {} holds no key: one per line, `NAME KEY`",
            path.display()
        )));
    }
    Ok(keys)
}

// ---- errors in OpenAI's shape ----

/// An error answer: `{"error":{"message","type","param","code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad_request(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("no_donor"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = e.status();
        ApiError {
            status,
            message: format!("the request body is not valid: {}", e.body_text()),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
}

/// Checks the bearer key; the key's entry, or the 401 answer.
fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
    let Some(keys) = &gateway.keys else {
        return Ok(KeyInfo {
            name: "anonymous".to_owned(),
            concurrency: None,
        });
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let found = given.and_then(|k| keys.lock().unwrap_or_else(|p| p.into_inner()).get(k));
    match found {
        Some(key) => Ok(key),
        None => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: match given {
                None => "no API key: send `Authorization: Bearer KEY` (a key from the gateway's --api-keys file)".to_owned(),
                Some(_) => "the API key is not one the gateway knows".to_owned(),
            },
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }),
    }
}

/// One running request of a key, counted against its concurrency until dropped.
struct KeySlot {
    gateway: Arc<Gateway>,
    name: String,
}

impl KeySlot {
    /// A slot for `key`, or the 429 answer when its requests already run at its limit.
    fn take(gateway: &Arc<Gateway>, key: KeyInfo) -> Result<KeySlot, ApiError> {
        // Without --api-keys every request is one anonymous user's: no
        // per-key limit then (the donors' queues and --max-connections bound it).
        let limit = match gateway.keys {
            Some(_) => key.concurrency.unwrap_or(gateway.key_concurrency),
            None => usize::MAX,
        };
        let mut running = gateway.running.lock().unwrap_or_else(|p| p.into_inner());
        let count = running.entry(key.name.clone()).or_default();
        if *count >= limit {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "the key `{}` has {limit} requests running, its limit: wait for one to finish",
                    key.name
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("concurrency_limit"),
            });
        }
        *count += 1;
        Ok(KeySlot {
            gateway: Arc::clone(gateway),
            name: key.name,
        })
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut running = self
            .gateway
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = running.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.name);
            }
        }
    }
}

impl Gateway {
    fn count(&self, route: &'static str, status: StatusCode) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: status.as_u16(),
            })
            .inc();
    }

    /// The model a donor serves (its `hello`'s `local_lm_path`, file name
    /// only), read again when stale; `None` when it cannot be reached.
    async fn donor_model(&self, donor: &Donor) -> Option<String> {
        if let Some((name, at)) = &*donor.model.lock().unwrap_or_else(|p| p.into_inner()) {
            if at.elapsed() < MODEL_TTL {
                return Some(name.clone());
            }
        }
        let client = connect(donor).await.ok()?;
        let name = model_name(&client.hello().local_lm_path);
        *donor.model.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((name.clone(), Instant::now()));
        Some(name)
    }

    /// The models the donors serve, each with the donors holding it.
    async fn models(&self) -> Vec<(String, Vec<String>)> {
        let names =
            futures_util::future::join_all(self.donors.iter().map(|d| self.donor_model(d))).await;
        let mut models: Vec<(String, Vec<String>)> = Vec::new();
        for (donor, name) in self.donors.iter().zip(names) {
            let Some(name) = name else { continue };
            match models.iter_mut().find(|(n, _)| *n == name) {
                Some((_, donors)) => donors.push(donor.addr.to_string()),
                None => models.push((name, vec![donor.addr.to_string()])),
            }
        }
        models
    }

    /// The donor that answered this conversation's earlier turns, if known.
    fn preferred(&self, model: &str, request: &PromptRequest) -> Option<String> {
        let (_, earlier) = request.messages.split_last()?;
        let key = conversation_key(model, earlier);
        let affinity = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        affinity.get(&key).cloned()
    }

    /// Remembers that `donor` answered `request` with `reply`.
    fn remember(&self, model: &str, request: &PromptRequest, reply: &str, donor: &Donor) {
        if request.messages.is_empty() {
            return;
        }
        let mut turns = request.messages.clone();
        turns.push(ChatMessage::new("assistant", reply));
        let key = conversation_key(model, &turns);
        let mut affinity = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        if affinity.len() >= MAX_AFFINITY {
            affinity.clear();
        }
        affinity.insert(key, donor.addr.to_string());
    }

    /// The donors serving `model`, least loaded first.
    async fn donors_for(&self, model: &str) -> Result<Vec<&Donor>, ApiError> {
        let models = self.models().await;
        if models.is_empty() {
            return Err(ApiError::unavailable(
                "no donor is reachable: check the gateway's --node addresses",
            ));
        }
        let Some((_, addrs)) = models.iter().find(|(name, _)| name == model) else {
            let known: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{model}` does not exist here; the donors serve: {}",
                    known.join(", ")
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            });
        };
        // Equally loaded donors take turns.
        let n = self.donors.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut donors: Vec<(usize, &Donor)> = self
            .donors
            .iter()
            .enumerate()
            .filter(|(_, d)| addrs.contains(&d.addr.to_string()))
            .collect();
        donors.sort_by_key(|(i, d)| (d.in_flight.load(Ordering::Relaxed), (i + n - start) % n));
        Ok(donors.into_iter().map(|(_, d)| d).collect())
    }
}

/// A model's name from a node's `local_lm_path`: its file name.
fn model_name(path: &str) -> String {
    let name = std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |n| n.to_string_lossy().into_owned());
    match name.is_empty() {
        true => "donate".to_owned(),
        false => name,
    }
}

async fn connect(donor: &Donor) -> donate_tokio::Result<Client> {
    let config = ClientConfig::default();
    let secure = donor
        .secure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let connecting = async {
        match &secure {
            None => Client::connect_with(&donor.addr, config).await,
            Some(secure) => Client::connect_secure(&donor.addr, config, secure.clone()).await,
        }
    };
    let client = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(donate_tokio::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{} did not answer within {CONNECT_TIMEOUT:?}", donor.addr),
            )))
        }
    };
    // Trust on first use: the key learned now is the one from here on.
    if let (Some(secure), Some(key)) = (&secure, client.node_key()) {
        if secure.trust == NodeTrust::AnyKey {
            let addr = donor.addr.to_string();
            if let Some(file) = crate::secure::known_nodes_path() {
                if let Err(e) = crate::secure::record_node(&file, &addr, key) {
                    tracing::warn!(donor = %addr, error = %e.message, "cannot record the donor's key");
                }
            }
            let mut pinned = donor.secure.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = pinned.as_mut() {
                s.trust = NodeTrust::Pinned(key.fingerprint());
            }
        }
    }
    Ok(client)
}

// ---- handlers ----

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let up = gateway
        .models()
        .await
        .iter()
        .map(|(_, d)| d.len())
        .sum::<usize>();
    let status = match up {
        0 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (
        status,
        Json(json!({"status": if up > 0 {"ok"} else {"no_donor"}, "donors": gateway.donors.len(), "donors_up": up})),
    )
        .into_response()
}

async fn metrics(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&gateway, &headers) {
        return e.into_response();
    }
    let text = gateway.metrics.encode(&gateway);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The gateway's counters and histograms (`prometheus-client`'s, atomics
/// and a lock per histogram inside); gauges are read at scrape time.
struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    /// Seconds from a streamed request's arrival to its first token's text.
    first_token: Histogram,
    /// A finished request's completion tokens over the seconds they took
    /// (from the first token when streamed).
    tokens_per_second: Histogram,
    /// Donors that could not be reached or were lost mid-request.
    donor_failures: Family<DonorLabels, Counter>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            requests: Family::default(),
            // 1 ms .. ~16 s.
            first_token: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 1 .. ~4000 tokens/s.
            tokens_per_second: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            donor_failures: Family::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DonorLabels {
    donor: String,
}

impl GatewayMetrics {
    /// A donor failed a request (unreachable, or lost mid-answer).
    fn donor_failed(&self, donor: &Donor) {
        let label = DonorLabels {
            donor: donor.addr.to_string(),
        };
        self.donor_failures.get_or_create(&label).inc();
    }

    /// `tokens` generated over `seconds`.
    fn finished(&self, tokens: i64, seconds: f64) {
        if tokens > 0 && seconds > 0.0 {
            self.tokens_per_second.observe(tokens as f64 / seconds);
        }
    }

    /// The OpenMetrics text, names prefixed `donate_gateway_`.
    fn encode(&self, gateway: &Gateway) -> String {
        let mut registry = Registry::with_prefix("donate_gateway");
        registry.register(
            "requests",
            "Completion requests answered, by route and HTTP status",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Seconds from a streamed request's arrival to its first token",
            Unit::Seconds,
            self.first_token.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Completion tokens per second of finished requests",
            self.tokens_per_second.clone(),
        );
        registry.register(
            "donor_failures",
            "Donors unreachable or lost mid-request",
            self.donor_failures.clone(),
        );
        let in_flight = Family::<DonorLabels, Gauge>::default();
        for donor in &gateway.donors {
            let label = DonorLabels {
                donor: donor.addr.to_string(),
            };
            in_flight
                .get_or_create(&label)
                .set(donor.in_flight.load(Ordering::Relaxed) as i64);
        }
        registry.register(
            "donor_in_flight",
            "Requests running on each donor",
            in_flight,
        );
        let open = Gauge::<i64>::default();
        open.set((gateway.max_connections - gateway.connections.available_permits()) as i64);
        registry.register("connections_open", "HTTP connections open now", open);
        let refused = Counter::<u64>::default();
        refused.inc_by(gateway.refused_connections.load(Ordering::Relaxed));
        registry.register(
            "connections_refused",
            "HTTP connections closed on arrival at --max-connections",
            refused,
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such route: the gateway serves /v1/chat/completions, /v1/completions, /v1/models and /health".to_owned(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
    .into_response()
}

fn model_object(gateway: &Gateway, name: &str, donors: &[String]) -> Value {
    json!({"id": name, "object": "model", "created": gateway.started, "owned_by": "donate", "donors": donors})
}

async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&gateway, &headers) {
        return e.into_response();
    }
    let data: Vec<Value> = gateway
        .models()
        .await
        .iter()
        .map(|(name, donors)| model_object(&gateway, name, donors))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if let Err(e) = authorize(&gateway, &headers) {
        return e.into_response();
    }
    let models = gateway.models().await;
    match models.iter().find(|(name, _)| *name == id) {
        Some((name, donors)) => Json(model_object(&gateway, name, donors)).into_response(),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{id}` does not exist here"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
        .into_response(),
    }
}

/// Fields of both completion requests; the unsupported ones are read only
/// to refuse them by name.
#[derive(Debug, Deserialize)]
struct CompletionBody {
    model: String,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    n: Option<i64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    response_format: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// Most tokens one request may ask for.
const MAX_TOKENS: i64 = 8192;
/// Most `stop` strings (the node takes 16, each 1–256 bytes).
const MAX_STOPS: usize = 16;

impl CompletionBody {
    /// Refuses what the gateway cannot do, naming the field.
    fn check(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "n",
                "only n=1 is supported: send one request per choice",
            ));
        }
        let unsupported = [
            ("tools", self.tools.is_some()),
            ("tool_choice", self.tool_choice.is_some()),
            ("functions", self.functions.is_some()),
            (
                "logprobs",
                self.logprobs
                    .as_ref()
                    .is_some_and(|v| v != &Value::Bool(false) && !v.is_null()),
            ),
            ("top_logprobs", self.top_logprobs.is_some()),
            (
                "response_format",
                self.response_format
                    .as_ref()
                    .is_some_and(|v| v.get("type").and_then(Value::as_str) != Some("text")),
            ),
        ];
        if let Some((param, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(ApiError::bad_request(
                param,
                format!("`{param}` is not supported by this gateway"),
            ));
        }
        for (param, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_request(param, format!("`{param}` is not supported (the donors take llama.cpp's repeat penalty); leave it at 0")));
            }
        }
        Ok(())
    }

    fn max_out(&self) -> Result<i64, ApiError> {
        let asked = self.max_completion_tokens.or(self.max_tokens).unwrap_or(0);
        match asked {
            n if n < 0 => Err(ApiError::bad_request(
                "max_tokens",
                "max_tokens must be positive",
            )),
            n if n > MAX_TOKENS => Err(ApiError::bad_request(
                "max_tokens",
                format!("max_tokens is at most {MAX_TOKENS}"),
            )),
            n => Ok(n),
        }
    }

    fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::bad_request("stop", "stop is a string or an array of strings")
                })?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "stop",
                    "stop is a string or an array of strings",
                ))
            }
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::bad_request(
                "stop",
                format!("at most {MAX_STOPS} stop strings, each 1 to 256 bytes"),
            ));
        }
        if self.seed.is_some_and(|s| s < 0) {
            return Err(ApiError::bad_request("seed", "seed must not be negative"));
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|s| s as u64),
            stop,
            ..SamplingParams::default()
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// A message's text: a string, or the array of `text` parts.
fn message_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => Ok(text),
                    (kind, _) => Err(ApiError::bad_request(
                        "messages",
                        format!(
                            "content parts of type {} are not supported: only text",
                            kind.unwrap_or("(none)")
                        ),
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::bad_request(
            "messages",
            "a message's content is a string or an array of text parts",
        )),
    }
}

fn chat_messages(messages: &[Value]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let role = match role {
                "developer" => "system",
                r if ChatMessage::ROLES.contains(&r) => r,
                r => {
                    return Err(ApiError::bad_request(
                        "messages",
                        format!("a message's role is system, user or assistant, not {r:?}"),
                    ))
                }
            };
            Ok(ChatMessage::new(
                role,
                &message_text(m.get("content").unwrap_or(&Value::Null))?,
            ))
        })
        .collect()
}

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn route(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
) -> Response {
    let response = complete(&gateway, &headers, body, Endpoint::Chat).await;
    gateway.count(Endpoint::Chat.route(), response.status());
    response
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
) -> Response {
    let response = complete(&gateway, &headers, body, Endpoint::Completion).await;
    gateway.count(Endpoint::Completion.route(), response.status());
    response
}

async fn complete(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
    endpoint: Endpoint,
) -> Response {
    let arrived = Instant::now();
    match prepare(gateway, headers, body, endpoint).await {
        Ok((body, request, slot)) => match body.stream {
            true => stream(Arc::clone(gateway), body, request, endpoint, slot, arrived).await,
            false => {
                let response = whole(gateway, &body, &request, endpoint, arrived).await;
                drop(slot);
                response
            }
        },
        Err(e) => e.into_response(),
    }
}

/// The job a request asks for.
async fn prepare(
    gateway: &Arc<Gateway>,
    headers: &HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
    endpoint: Endpoint,
) -> Result<(CompletionBody, PromptRequest, KeySlot), ApiError> {
    let key = authorize(gateway, headers)?;
    let Json(body) = body?;
    body.check()?;
    let mut request = match endpoint {
        Endpoint::Chat => {
            let messages = body
                .messages
                .as_deref()
                .ok_or_else(|| ApiError::bad_request("messages", "messages is required"))?;
            PromptRequest::chat(chat_messages(messages)?, 0)
        }
        Endpoint::Completion => {
            let prompt = match &body.prompt {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                    items[0].as_str().unwrap_or_default().to_owned()
                }
                _ => return Err(ApiError::bad_request("prompt", "prompt is one string")),
            };
            PromptRequest {
                raw: true,
                ..PromptRequest::text(&prompt, 0)
            }
        }
    };
    request.max_out = body.max_out()?;
    request.sampling = body.sampling()?;
    // Counted once the request is known good, until its answer is sent.
    let slot = KeySlot::take(gateway, key)?;
    Ok((body, request, slot))
}

/// A job on one donor, counted in its load while it runs.
struct Running<'a> {
    donor: &'a Donor,
}

impl<'a> Running<'a> {
    fn on(donor: &'a Donor) -> Self {
        donor.in_flight.fetch_add(1, Ordering::Relaxed);
        Running { donor }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.donor.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection on a donor that can take the job.
struct Picked<'a> {
    client: Client,
    running: Running<'a>,
    /// Kept from an earlier request: if it fails before answering, it may
    /// only have gone stale (the donor closed it), so the donor is not blamed.
    reused: bool,
}

/// A connected donor able to take `request` (it agreed `chat`), trying the
/// donors of the model in order of load (a kept connection first, else a new
/// one); the donor of the conversation's earlier turns first unless it is
/// busier than the least loaded.
async fn pick<'a>(
    gateway: &'a Gateway,
    model: &str,
    request: &PromptRequest,
) -> Result<Picked<'a>, ApiError> {
    let mut last = String::new();
    let mut donors = gateway.donors_for(model).await?;
    if let Some(addr) = gateway.preferred(model, request) {
        let least = donors
            .first()
            .map_or(0, |d| d.in_flight.load(Ordering::Relaxed));
        if let Some(at) = donors.iter().position(|d| {
            d.addr.to_string() == addr && d.in_flight.load(Ordering::Relaxed) <= least
        }) {
            let donor = donors.remove(at);
            donors.insert(0, donor);
        }
    }
    for donor in donors {
        if let Some(client) = donor.take_idle() {
            return Ok(Picked {
                client,
                running: Running::on(donor),
                reused: true,
            });
        }
        match connect(donor).await {
            Ok(client) if client.capabilities().contains(Capability::Chat) => {
                return Ok(Picked {
                    client,
                    running: Running::on(donor),
                    reused: false,
                })
            }
            Ok(_) => last = format!("{} does not offer the chat extension", donor.addr),
            Err(e) => {
                *donor.model.lock().unwrap_or_else(|p| p.into_inner()) = None;
                gateway.metrics.donor_failed(donor);
                last = format!("{}: {e}", donor.addr);
            }
        }
    }
    Err(ApiError::unavailable(format!(
        "no donor of `{model}` could take the request ({last})"
    )))
}

fn new_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{nanos:x}{n:x}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

fn finish_str(usage: &Usage) -> &'static str {
    match usage.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The job failed on the donor: 400 for what the request asked wrong, 503
/// for a donor that could not run it.
fn job_failed(result: &donate_proto::message::PromptResult) -> ApiError {
    match result.code.as_str() {
        "bad_input" => ApiError::bad_request("messages", result.error.clone()),
        "queue_full" => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the donors are busy: {}", result.error),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        },
        _ => ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "the donor failed the job: {} ({})",
                result.error, result.code
            ),
            kind: "server_error",
            param: None,
            code: None,
        },
    }
}

async fn whole(
    gateway: &Gateway,
    body: &CompletionBody,
    request: &PromptRequest,
    endpoint: Endpoint,
    arrived: Instant,
) -> Response {
    // A donor lost before it answers: the request goes to the next one (a
    // kept connection that went stale is replaced without counting).
    let mut last = None;
    let mut tries = 0;
    while tries < gateway.donors.len().max(1) {
        let Picked {
            mut client,
            running,
            reused,
        } = match pick(gateway, &body.model, request).await {
            Ok(picked) => picked,
            Err(e) => return e.into_response(),
        };
        let answer = match client.submit_prompt(request).await {
            Ok(id) => client.wait_prompt(id).await,
            Err(e) => Err(e),
        };
        let result = match answer {
            Ok(result) => result,
            Err(donate_tokio::Error::PromptFailed(result)) => {
                return job_failed(&result).into_response()
            }
            Err(e) => {
                if !reused {
                    tries += 1;
                    gateway.metrics.donor_failed(running.donor);
                }
                last = Some(e.to_string());
                continue;
            }
        };
        running.donor.put_back(client);
        gateway.remember(&body.model, request, &result.text, running.donor);
        let usage = result.usage.unwrap_or_default();
        let seconds = arrived.elapsed().as_secs_f64();
        gateway.metrics.finished(usage.completion_tokens, seconds);
        let (id, created) = (new_id(endpoint), now_secs());
        let body = match endpoint {
            Endpoint::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                    "finish_reason": finish_str(&usage), "logprobs": null}],
                "usage": usage_json(&usage),
            }),
            Endpoint::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": result.text, "finish_reason": finish_str(&usage), "logprobs": null}],
                "usage": usage_json(&usage),
            }),
        };
        // Which donor answered, for operators (and the affinity test).
        let donor = running.donor.addr.to_string();
        return ([("x-donate-donor", donor)], Json(body)).into_response();
    }
    ApiError::unavailable(format!(
        "every donor was lost before answering ({})",
        last.unwrap_or_default()
    ))
    .into_response()
}

/// What the streaming task hands the SSE response: an event's JSON, or the end.
enum Piece {
    Data(Value),
    Done,
}

async fn stream(
    gateway: Arc<Gateway>,
    body: CompletionBody,
    request: PromptRequest,
    endpoint: Endpoint,
    slot: KeySlot,
    arrived: Instant,
) -> Response {
    // Checked before answering 200, so that an unknown model or no donor
    // are real HTTP errors.
    if let Err(e) = gateway.donors_for(&body.model).await {
        return e.into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    let (id, created, model) = (new_id(endpoint), now_secs(), body.model.clone());
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let choice = match endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or_else(|| json!("")),
                "finish_reason": finish, "logprobs": null})
            }
        };
        let object = match endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let include_usage = body.include_usage();
    tokio::spawn(async move {
        // The key's request runs until its stream ends or its client leaves.
        let _slot = slot;
        let send = |v: Value| tx.send(Piece::Data(v)).is_ok();
        if endpoint == Endpoint::Chat
            && !send(chunk(json!({"role": "assistant", "content": ""}), None))
        {
            return;
        }
        match stream_job(&gateway, &body.model, &request, &tx, &chunk, arrived).await {
            Ok(usage) => {
                send(chunk(json!({}), Some(finish_str(&usage))));
                if include_usage {
                    let mut last = chunk(json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = usage_json(&usage);
                    send(last);
                }
            }
            Err(message) => {
                send(
                    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}),
                );
            }
        }
        let _ = tx.send(Piece::Done);
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await? {
            Piece::Data(v) => Event::default().data(v.to_string()),
            Piece::Done => Event::default().data("[DONE]"),
        };
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Runs a streamed job, each piece of text sent as a chunk; a donor lost
/// before the first piece is replaced by the next, unseen. The usage, or
/// why it failed.
async fn stream_job(
    gateway: &Gateway,
    model: &str,
    request: &PromptRequest,
    tx: &tokio::sync::mpsc::UnboundedSender<Piece>,
    chunk: &(impl Fn(Value, Option<&str>) -> Value + Sync),
    arrived: Instant,
) -> Result<Usage, String> {
    let mut first_token: Option<Instant> = None;
    let mut tries = 0;
    while tries < gateway.donors.len().max(1) {
        let Picked {
            mut client,
            running,
            reused,
        } = pick(gateway, model, request).await.map_err(|e| e.message)?;
        let id = match client.submit_prompt(request).await {
            Ok(id) => id,
            // A kept connection the donor has closed: take another.
            Err(_) if reused => continue,
            Err(e) => return Err(e.to_string()),
        };
        let waiting = client.wait_streaming(id, |partial| {
            if let PartialOutput::Text(text) = partial {
                if first_token.is_none() {
                    first_token = Some(Instant::now());
                    let seconds = arrived.elapsed().as_secs_f64();
                    gateway.metrics.first_token.observe(seconds);
                }
                let _ = tx.send(Piece::Data(chunk(json!({"content": text}), None)));
            }
        });
        // A client that goes away drops the donor connection, which
        // cancels the job there.
        let answer = tokio::select! {
            answer = waiting => answer,
            () = tx.closed() => return Err("the client went away".to_owned()),
        };
        match answer.and_then(donate_tokio::answers::prompt) {
            Ok(result) => {
                running.donor.put_back(client);
                gateway.remember(model, request, &result.text, running.donor);
                let usage = result.usage.unwrap_or_default();
                let since = first_token.unwrap_or(arrived).elapsed().as_secs_f64();
                gateway.metrics.finished(usage.completion_tokens, since);
                return Ok(usage);
            }
            Err(donate_tokio::Error::PromptFailed(result)) => {
                return Err(job_failed(&result).message)
            }
            Err(e) => {
                if !reused || first_token.is_some() {
                    tries += 1;
                    gateway.metrics.donor_failed(running.donor);
                }
                if first_token.is_none() {
                    continue;
                }
                return Err(format!("the donor was lost mid-answer: {e}"));
            }
        }
    }
    Err("every donor was lost before answering".to_owned())
}
