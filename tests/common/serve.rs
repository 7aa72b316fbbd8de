//! `paystream serve` as real processes for the crash, failover and fencing tests: a fleet (a
//! real anvil with the contract deployed, a real redis-server, one shared resume token secret)
//! that starts server processes on ports chosen at run time, kills, freezes and thaws them by
//! PID, and reads their `/metrics`; and a TCP balancer in front of them, as a load balancer with
//! health checks would be.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use alloy::primitives::Address;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, Channels};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::anvil::{Anvil, DEV_KEYS, dev_signer};
use super::faults::{TempDir, signal};
use super::redis::Redis;

/// The resume token secret every server of a fleet shares.
pub const SECRET: &str = "the fleet's shared resume token secret, 32+ bytes";

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The chain and store several server processes share.
pub struct Fleet {
    pub anvil: Anvil,
    pub redis: Redis,
    pub contract: Address,
    pub chain_id: u64,
    dir: TempDir,
}

/// A `paystream serve` process.
pub struct Server {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    logs: mpsc::Receiver<String>,
}

impl Fleet {
    pub async fn start() -> Self {
        let anvil = Anvil::start();
        let redis = Redis::start();
        let deployer = RpcBackend::connect(&anvil.url, dev_signer(0))
            .await
            .unwrap();
        let chain_id = deployer.chain_id();
        let contract = Channels::deploy(deployer).await.unwrap().address();
        Self {
            anvil,
            redis,
            contract,
            chain_id,
            dir: TempDir::new("fleet"),
        }
    }

    /// Starts a server on `port` whose clients reach it at `public_url`, with `extra` TOML
    /// appended to the configuration (`[session]` and `[limits]` sections), and waits until it
    /// serves.
    pub fn serve(&self, port: u16, public_url: &str, extra: &str) -> Server {
        self.serve_on(port, public_url, &self.redis.url, extra)
    }

    /// As [`Fleet::serve`], reaching Redis at `redis_url` (a proxy in front of the fleet's).
    pub fn serve_on(&self, port: u16, public_url: &str, redis_url: &str, extra: &str) -> Server {
        let config = self.dir.path().join(format!("serve-{port}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
listen = "127.0.0.1:{port}"
public_url = "{public_url}"
[chain]
rpc_url = "{rpc}"
contract = "{contract}"
[store]
kind = "redis"
redis_url = "{redis}"
[tariff]
perMessage = {{ amount = "1", per = "1" }}
[resources.tokens]
kind = "token_generator"
tokens_per_sec = 40
max_tokens = 1000
{extra}
"#,
                rpc = self.anvil.url,
                contract = self.contract,
                redis = redis_url,
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("PAYSTREAM_PAYEE_KEY", DEV_KEYS[2])
            .env("PAYSTREAM_JWT_SECRET", SECRET)
            .env_remove("PAYSTREAM_JWT_SECRET_FILE")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let server = Server {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            logs,
        };
        server.wait_log("serving");
        server
    }

    /// The payee every server of the fleet serves.
    pub fn payee(&self) -> Address {
        dev_signer(2).address()
    }
}

impl Server {
    /// Waits (up to 60 s) for a log line containing `text`.
    pub fn wait_log(&self, text: &str) -> String {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the server logs {text:?} within 60 s"));
            if line.contains(text) {
                return line;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        signal(self.pid(), "KILL");
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process is frozen (its sockets stay open).
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// The value of a metric line starting with `name` (labels included) in `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = super::stack::http_get(&self.url, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }

    /// Waits (up to 30 s) until a metric reaches at least `value`.
    pub async fn wait_metric(&self, name: &str, value: u64) -> u64 {
        self.wait_metric_until(name, |v| v >= value).await
    }

    /// Waits (up to 30 s, looking every 50 ms) until a metric satisfies `done`: the server's
    /// own account of an event the test cannot see on its sockets.
    pub async fn wait_metric_until(&self, name: &str, done: impl Fn(u64) -> bool) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.metric(name).await;
            if done(now) {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is {now}, still not as waited for"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A frozen process must be thawed to die.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP balancer on 127.0.0.1: each connection goes to the preferred backend, or the next one
/// that accepts it (as a load balancer's health check would route around a dead server).
pub struct Balancer {
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    preferred: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Balancer {
    pub async fn start(backends: Vec<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let preferred = Arc::new(AtomicUsize::new(0));
        let prefer = preferred.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let first = prefer.load(Ordering::Relaxed);
                let backends = backends.clone();
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let port = backends[(first + i) % backends.len()];
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                            let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Self {
            port,
            url: format!("http://127.0.0.1:{port}"),
            preferred,
            task,
        }
    }

    /// New connections go to backend `i` first.
    pub fn prefer(&self, i: usize) {
        self.preferred.store(i, Ordering::Relaxed);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
