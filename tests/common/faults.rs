//! Fault injection for the settler's tests: an anvil that can be stopped and started again
//! from its saved state, and a TCP proxy that can drop the RPC connections.
//!
//! - [`RestartableAnvil`]: a real anvil on 127.0.0.1 with `--dump-state FILE`; [`stop`] sends it
//!   SIGTERM (anvil writes its state on the way out) and waits for it to exit, [`restart`]
//!   starts it again on the same port with `--load-state FILE`. Mined blocks, receipts,
//!   balances and nonces survive; the transaction pool does not.
//! - [`Proxy`]: a TCP proxy on 127.0.0.1 (a port chosen at run time) in front of a node, told
//!   what to do with [`Proxy::set`]: forward, drop every connection, refuse connections (it stops
//!   listening), lose the node's answer to `eth_sendRawTransaction` (the node has the
//!   transaction, the client gets a closed connection), hold every answer back a while (a
//!   slow store or node), or cut a connection as it carries given bytes (one request lost on
//!   its way: an outage at a chosen step).
//! - [`Guard`]: a child process killed (SIGKILL, by its id) when the test ends.
//!
//! [`stop`]: RestartableAnvil::stop
//! [`restart`]: RestartableAnvil::restart

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::anvil::tool;

/// A directory of its own under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "paystream-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("a temporary directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends `signal` (`TERM`, `KILL`, ...) to the process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Waits up to `limit` for `child` to exit (polling every 10 ms); `None` if it did not.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process, killed by its id (SIGKILL) and reaped when the guard drops.
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL now, and the exit status (within 10 s).
    pub fn kill(&mut self) -> ExitStatus {
        signal(self.0.id(), "KILL");
        wait_exit(&mut self.0, Duration::from_secs(10)).expect("a SIGKILLed process exits")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Calls a JSON-RPC method of the node at `url`: its result, or its error.
pub async fn try_rpc(
    url: &str,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let response: serde_json::Value = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    match response.get("error") {
        Some(error) => Err(error.to_string()),
        None => Ok(response["result"].clone()),
    }
}

/// Calls a JSON-RPC method of the node at `url`, failing the test on an error.
pub async fn rpc(url: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    try_rpc(url, method, params)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// Starts anvil with `args`; its child and its listening address, or `None` when it exits
/// before listening (its port taken).
fn spawn_anvil(args: &[String]) -> Option<(Child, String)> {
    let mut child = Command::new(tool("anvil"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("anvil starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(addr) = line.strip_prefix("Listening on ") {
                let _ = tx.send(addr.trim().to_string());
                sent = true;
            }
            // Keep draining so anvil never blocks on a full pipe.
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Some((child, addr)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // It exited (or closed its output) without listening.
            let _ = child.kill();
            let _ = child.wait();
            None
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("anvil did not report its listening address within 60 s");
        }
    }
}

/// An anvil that keeps its state across a stop and a restart on the same port.
pub struct RestartableAnvil {
    child: Option<Child>,
    /// Its port (the same after a restart).
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where its state is written on exit and read on restart.
    pub state: PathBuf,
}

impl RestartableAnvil {
    fn args(port: u16, state: &Path, load: bool) -> Vec<String> {
        let mut args: Vec<String> = [
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--chain-id",
            "31337",
            "--dump-state",
            state.to_str().expect("a UTF-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if load {
            args.push("--load-state".into());
            args.push(state.to_str().expect("a UTF-8 path").into());
        }
        args
    }

    /// Starts anvil on a port of its choosing, writing its state to `state` when stopped.
    pub fn start(state: PathBuf) -> Self {
        let (child, addr) =
            spawn_anvil(&Self::args(0, &state, false)).expect("anvil listens on a fresh port");
        let port = addr
            .parse::<SocketAddr>()
            .expect("anvil's listening address")
            .port();
        Self {
            child: Some(child),
            port,
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops anvil gracefully (SIGTERM): it writes its state to [`Self::state`] and exits.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("anvil is running");
        // Whatever a previous run left must not pass for this one's dump.
        let _ = std::fs::remove_file(&self.state);
        signal(child.id(), "TERM");
        match wait_exit(&mut child, Duration::from_secs(30)) {
            Some(_) => {}
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("anvil did not exit within 30 s of SIGTERM");
            }
        }
        let written = std::fs::metadata(&self.state).map_or(0, |m| m.len());
        assert!(written > 0, "anvil wrote no state to {:?}", self.state);
    }

    /// Starts anvil again on the same port from the state it wrote when stopped.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "anvil is still running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((child, _)) = spawn_anvil(&Self::args(self.port, &self.state, true)) {
                self.child = Some(child);
                return;
            }
            // The port is not free yet (a socket closing): bounded, short retries.
            assert!(
                Instant::now() < deadline,
                "anvil could not listen on port {} again within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        rpc(&self.url, method, params).await
    }
}

impl Drop for RestartableAnvil {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the proxy does with the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Forward,
    /// Cuts every open connection (before it forwards another byte) and closes every new one
    /// as soon as it is accepted.
    Drop,
    /// Cuts every open connection and stops listening: connecting is refused.
    Refuse,
    /// Forwards, but a connection that carries `eth_sendRawTransaction` is cut as soon as the
    /// node starts to answer it: the node has the transaction, the client gets no answer.
    LoseSendAnswers,
    /// Forwards, holding each answer back this long (every round trip through the proxy takes
    /// at least that).
    Slow(Duration),
    /// Forwards, but a connection whose client sends these bytes is cut before they are
    /// forwarded: that request never reaches the node (or the store), the client gets a closed
    /// connection. Other connections, and later ones, are forwarded.
    CutOn(&'static [u8]),
}

impl Mode {
    fn forwards(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::LoseSendAnswers | Self::Slow(_) | Self::CutOn(_)
        )
    }
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted and forwarded.
    pub forwarded: AtomicU64,
    /// Connections cut (open ones by `Drop`/`Refuse`, new ones by `Drop`).
    pub cut: AtomicU64,
    /// Answers to `eth_sendRawTransaction` the client never got.
    pub lost_sends: AtomicU64,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
pub struct Proxy {
    /// Where it listens (the same port across `Refuse` and back).
    pub addr: SocketAddr,
    /// `http://ADDR`.
    pub url: String,
    pub stats: Arc<ProxyStats>,
    mode: watch::Sender<Mode>,
    applied: watch::Receiver<Mode>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, mode_rx) = watch::channel(Mode::Forward);
        let (applied_tx, applied) = watch::channel(Mode::Forward);
        let stats = Arc::new(ProxyStats::default());
        let task = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            mode_rx,
            applied_tx,
            stats.clone(),
        ));
        Self {
            addr,
            url: format!("http://{addr}"),
            stats,
            mode,
            applied,
            task,
        }
    }

    /// Switches to `mode`, and returns once the proxy acts on it (no request sent after this
    /// returns is forwarded under the previous mode; under `Refuse` nothing listens).
    pub async fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        let mut applied = self.applied.clone();
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|m| *m == mode))
            .await
            .expect("the proxy applies its mode within 10 s")
            .expect("the proxy runs");
    }

    pub fn lost_sends(&self) -> u64 {
        self.stats.lost_sends.load(Ordering::Relaxed)
    }

    pub fn cut(&self) -> u64 {
        self.stats.cut.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Its connections live in the accept loop's JoinSet: aborted with it.
        self.task.abort();
    }
}

/// Binds `addr` again after `Refuse` (bounded retries while the old socket closes).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the proxy could not listen on {addr} again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    applied: watch::Sender<Mode>,
    stats: Arc<ProxyStats>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        let current = *mode.borrow_and_update();
        if current == Mode::Refuse {
            // Closing the socket refuses new connections (and resets those not yet accepted).
            listener = None;
        } else if listener.is_none() {
            listener = Some(rebind(addr).await);
        }
        applied.send_replace(current);
        while connections.try_join_next().is_some() {}
        let accepted = match &listener {
            Some(l) => tokio::select! {
                accepted = l.accept() => accepted.ok(),
                changed = mode.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some((client, _)) = accepted else {
            continue;
        };
        if !mode.borrow().forwards() {
            stats.cut.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        connections.spawn(relay(client, upstream, mode.clone(), stats.clone()));
    }
}

const SEND_METHOD: &[u8] = b"eth_sendRawTransaction";

/// Forwards one connection until either side closes or the mode cuts it.
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    stats: Arc<ProxyStats>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once the client sent `eth_sendRawTransaction` under `LoseSendAnswers`.
    let swallow = AtomicBool::new(false);
    let (up_mode, down_mode, mut cut_mode) = (mode.clone(), mode.clone(), mode);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        // The end of what was read before, so a method name split across reads is found.
        let mut window: Vec<u8> = Vec::new();
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let now = *up_mode.borrow();
            if !now.forwards() {
                stats.cut.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let pattern = match now {
                Mode::LoseSendAnswers => Some(SEND_METHOD),
                Mode::CutOn(pattern) => Some(pattern),
                _ => None,
            };
            if let Some(pattern) = pattern {
                window.extend_from_slice(&buf[..n]);
                if window.windows(pattern.len()).any(|w| w == pattern) {
                    if let Mode::CutOn(_) = now {
                        stats.cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    swallow.store(true, Ordering::SeqCst);
                }
                let keep = window.len().saturating_sub(pattern.len());
                window.drain(..keep);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if swallow.load(Ordering::SeqCst) {
                // The node processed the transaction and answers: the client never hears it.
                stats.lost_sends.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let now = *down_mode.borrow();
            if !now.forwards() {
                stats.cut.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Mode::Slow(delay) = now {
                tokio::time::sleep(delay).await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let cut = async {
        let _ = cut_mode.wait_for(|m| !m.forwards()).await;
        stats.cut.fetch_add(1, Ordering::Relaxed);
    };
    // Whichever ends first ends the connection: both sockets close when this returns.
    tokio::select! {
        () = up => {}
        () = down => {}
        () = cut => {}
    }
}
