//! A real anvil node for a test: started on 127.0.0.1 with a port it picks itself (read from
//! its "Listening on" line, no sleeping), stopped when the handle drops.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;

/// anvil's well-known development keys (mnemonic "test test ... junk"); they hold 10,000 ETH
/// each on a fresh anvil and nothing anywhere that matters.
pub const DEV_KEYS: [&str; 5] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
];

/// A development key as a signer.
pub fn dev_signer(i: usize) -> PrivateKeySigner {
    DEV_KEYS[i].parse().expect("a valid dev key")
}

/// Finds a tool installed by scripts/install-tools, or on PATH.
pub fn tool(name: &str) -> PathBuf {
    let tools = std::env::var_os("PAYSTREAM_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/paystream/tools"))
        });
    if let Some(dir) = tools {
        let candidate = dir.join("bin").join(name);
        if candidate.exists() {
            return candidate;
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} not found: run scripts/install-tools (scripts/test does)")
        })
}

/// A running anvil.
pub struct Anvil {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Anvil {
    /// Starts anvil on 127.0.0.1 on a port of its choosing.
    pub fn start() -> Self {
        let mut child = Command::new(tool("anvil"))
            .args(["--host", "127.0.0.1", "--port", "0", "--chain-id", "31337"])
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
            Ok(addr) => Self {
                child,
                url: format!("http://{addr}"),
            },
            Err(_) => {
                let _ = child.kill();
                panic!("anvil did not report its listening address within 60 s");
            }
        }
    }
}

impl Anvil {
    /// Calls a JSON-RPC method of anvil (`evm_increaseTime`, `evm_mine`, `evm_setAutomine`).
    pub async fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let response: serde_json::Value = reqwest::Client::new()
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(response.get("error").is_none(), "{method}: {response}");
        response["result"].clone()
    }

    /// Moves the chain's time forward by `secs` and mines a block at the new time.
    pub async fn increase_time(&self, secs: u64) {
        self.rpc("evm_increaseTime", serde_json::json!([secs]))
            .await;
        self.rpc("evm_mine", serde_json::json!([])).await;
    }
}

impl Anvil {
    /// Stops the node now (a chain that no longer answers).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.stop();
    }
}
