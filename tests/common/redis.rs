//! A real redis-server for a test, on 127.0.0.1 and a free port chosen at run time, stopped
//! when the handle drops.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running redis-server.
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// Starts redis-server (no persistence: tests need speed, not durability).
    pub fn start() -> Self {
        for _ in 0..5 {
            if let Some(redis) = Self::try_start(free_port()) {
                return redis;
            }
        }
        panic!("redis-server did not start (is it installed? scripts/install-tools installs it)");
    }

    /// Starts on a given port (used to restart on the same port after a stop).
    pub fn try_start(port: u16) -> Option<Self> {
        Self::try_start_with(port, &[])
    }

    /// Starts on `port` with more arguments.
    fn try_start_with(port: u16, extra: &[&str]) -> Option<Self> {
        let bin = super::anvil::tool("redis-server");
        let mut child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = tx.send(true);
                } else if line.contains("Address already in use")
                    || line.contains("Could not create server TCP")
                {
                    let _ = tx.send(false);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => Some(Self {
                child,
                port,
                url: format!("redis://127.0.0.1:{port}/"),
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// Makes Redis refuse every write (`maxmemory` 1 byte, no eviction: writes and scripts
    /// fail with OOM, reads work), or take them again: a store that is up but refuses.
    pub fn refuse_writes(&self, refuse: bool) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction")
            .query(&mut conn)
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(if refuse { "1" } else { "0" })
            .query(&mut conn)
            .unwrap();
    }

    /// Stops the server now (to test an outage).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback, formed with
/// `redis-cli --cluster create`; every node is stopped when it drops.
pub struct RedisCluster {
    nodes: Vec<Redis>,
    _dir: super::faults::TempDir,
}

impl RedisCluster {
    /// Starts three cluster-enabled redis-servers, joins them, and waits until every node says
    /// the cluster is `ok` (all 16,384 slots served).
    pub fn start() -> Self {
        let dir = super::faults::TempDir::new("cluster");
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let port = free_port();
            let conf = dir.path().join(format!("nodes-{port}.conf"));
            let conf = conf.to_str().unwrap().to_string();
            let dir_arg = dir.path().to_str().unwrap().to_string();
            if let Some(node) = Redis::try_start_with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--dir",
                    &dir_arg,
                ],
            ) {
                nodes.push(node);
            }
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new(super::anvil::tool("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster create: {status}");
        let cluster = Self { nodes, _dir: dir };
        // The nodes learn of each other by gossip: each says `cluster_state:ok` once it does.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            let client = redis::Client::open(node.url.as_str()).unwrap();
            let mut conn = client.get_connection().unwrap();
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not form: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }
}
