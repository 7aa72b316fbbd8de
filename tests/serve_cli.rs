//! `paystream serve` as a process: configured by a TOML file and the environment, it serves the
//! 402 challenge and `/healthz` against a real anvil and redis-server, and exits cleanly on
//! SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::anvil::{Anvil, DEV_KEYS, dev_signer};
use common::redis::Redis;
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_from_a_config_file_and_stops_on_sigterm() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = Channels::deploy(
        RpcBackend::connect(&anvil.url, dev_signer(0))
            .await
            .unwrap(),
    )
    .await
    .unwrap()
    .address();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("paystream-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{port}"
[chain]
rpc_url = "http://placeholder"
contract = "0x0000000000000000000000000000000000000001"
[tariff]
perMessage = {{ amount = "3", per = "1000" }}
[resources.tokens]
kind = "token_generator"
"#
        ),
    )
    .unwrap();
    // The RPC URL, contract and Redis URL come from the environment, over the file's values.
    // Killed if the test fails before it stops the server itself.
    let mut child = common::faults::Guard(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("PAYSTREAM_PAYEE_KEY", DEV_KEYS[2])
            .env("PAYSTREAM_RPC_URL", &anvil.url)
            .env("PAYSTREAM_CONTRACT", contract.to_string())
            .env("PAYSTREAM_REDIS_URL", &redis.url)
            .env(
                "PAYSTREAM_JWT_SECRET",
                "a shared secret of at least 32 bytes, for tests",
            )
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait for the "serving" log line: the listener is bound. Logs to a pipe carry no colour
    // codes (issue 13: they did).
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("paystream serve logs that it is serving");
        assert!(!line.contains('\u{1b}'), "an escape code in {line:?}");
        if line.contains("serving") {
            break;
        }
    }
    let body = http_get(port, "/healthz").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    compose_healthcheck_passes(port);
    // Transparent huge pages are off for the server (they made its idle memory 35 MiB, not 18).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    if let Some(thp) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(thp.split_whitespace().nth(1), Some("0"), "{thp}");
    }
    let challenge = http_get(port, "/tokens").await;
    assert!(challenge.starts_with("HTTP/1.1 402"), "{challenge}");
    assert!(
        challenge
            .to_lowercase()
            .contains(&contract.to_string().to_lowercase()),
        "the challenge names the contract"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs docker-compose.yml's healthcheck of the engine against a live server on `port`, as
/// Docker would: `CMD` runs its arguments as they are, `CMD-SHELL` runs its string with
/// `/bin/sh -c` (dash in the engine's Debian image, as on this machine's Debian). It failed
/// always before: `/dev/tcp` is a bash feature, and dash has none.
fn compose_healthcheck_passes(port: u16) {
    let compose = std::fs::read_to_string(
        std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("docker-compose.yml"),
    )
    .unwrap();
    let engine = compose
        .split("\n  engine:")
        .nth(1)
        .expect("docker-compose.yml has an engine service");
    let line = engine
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("test: "))
        .expect("the engine has a healthcheck test");
    // The test is a flow sequence of double-quoted strings: JSON reads it the same way.
    let test: Vec<String> = serde_json::from_str(line).expect("a JSON-compatible test array");
    let argv: Vec<String> = test
        .iter()
        .map(|a| a.replace("127.0.0.1/8080", &format!("127.0.0.1/{port}")))
        .collect();
    let status = match argv[0].as_str() {
        "CMD" => Command::new(&argv[1]).args(&argv[2..]).status(),
        "CMD-SHELL" => Command::new("/bin/sh").arg("-c").arg(&argv[1]).status(),
        other => panic!("a healthcheck test starts with CMD or CMD-SHELL, not {other}"),
    }
    .unwrap();
    assert!(
        status.success(),
        "the compose healthcheck {argv:?} failed: {status}"
    );
}

/// `PAYSTREAM_LOG_FORMAT=json`: one JSON object a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_lines_on_request() {
    let anvil = Anvil::start();
    let contract = Channels::deploy(
        RpcBackend::connect(&anvil.url, dev_signer(0))
            .await
            .unwrap(),
    )
    .await
    .unwrap()
    .address();
    let dir = common::faults::TempDir::new("serve-json");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:0"
[chain]
rpc_url = "{}"
contract = "{contract}"
[store]
kind = "memory"
[tariff]
perMessage = {{ amount = "3", per = "1000" }}
[resources.tokens]
kind = "token_generator"
"#,
            anvil.url
        ),
    )
    .unwrap();
    let mut child = common::faults::Guard(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("PAYSTREAM_PAYEE_KEY", DEV_KEYS[2])
            .env("PAYSTREAM_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let serving = lines
        .find(|l| l.contains("serving"))
        .expect("a serving line");
    let json: serde_json::Value = serde_json::from_str(&serving).expect("a JSON log line");
    assert_eq!(json["level"], "INFO");
    assert_eq!(json["fields"]["message"], "serving");
    child.kill();
}

/// With a Redis store, `serve` refuses to start without the shared resume token secret (a
/// made-up one would refuse every token after a restart), and says what to set; a file holding
/// it is taken too, and a short one is refused.
#[test]
fn serve_on_redis_needs_a_shared_token_secret() {
    let dir = common::faults::TempDir::new("serve-secret");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        r#"
listen = "127.0.0.1:1"
[chain]
rpc_url = "http://127.0.0.1:1"
contract = "0x0000000000000000000000000000000000000001"
[tariff]
perMessage = { amount = "3", per = "1000" }
[resources.tokens]
kind = "token_generator"
"#,
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_paystream"));
        cmd.args(["serve", "--config", config.to_str().unwrap()])
            .env("PAYSTREAM_PAYEE_KEY", DEV_KEYS[2])
            .env_remove("PAYSTREAM_JWT_SECRET")
            .env_remove("PAYSTREAM_JWT_SECRET_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = run(&[]);
    assert!(!ok);
    assert!(
        stderr.contains("PAYSTREAM_JWT_SECRET") && stderr.contains("PAYSTREAM_JWT_SECRET_FILE"),
        "{stderr}"
    );
    let (ok, stderr) = run(&[("PAYSTREAM_JWT_SECRET", "too short")]);
    assert!(!ok);
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    // From a file, the secret is found: serve goes on to the chain (unreachable here).
    let secret = dir.path().join("jwt");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let (ok, stderr) = run(&[("PAYSTREAM_JWT_SECRET_FILE", secret.to_str().unwrap())]);
    assert!(!ok);
    assert!(!stderr.contains("PAYSTREAM_JWT_SECRET"), "{stderr}");
    assert!(stderr.contains("connecting to"), "{stderr}");
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
