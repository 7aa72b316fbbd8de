//! Resume tokens across processes (issue 11): two `paystream serve` processes on one real
//! redis-server share the token secret. A token from one resumes on the other; expired, forged
//! (another key, `alg: none`, another algorithm), reused and other-channel tokens are refused
//! with `bad_resume_token` and 4401 and change nothing; of two resumes racing with one token on
//! two processes, exactly one wins.

mod common;

use alloy::primitives::{Address, B256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::anvil::dev_signer;
use common::serve::{Fleet, SECRET, Server, free_port};
use common::stack::Client;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::channel::ChannelDomain;
use paystream::protocol::{ClientMessage, ServerMessage};
use paystream::session::resume::ResumeClaims;
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, StoredChannel};

const FAST: &str = r#"
[session]
heartbeat_ms = 1000
resume_window_secs = 60
[limits]
lease_ttl_ms = 1500
"#;

struct Two {
    fleet: Fleet,
    a: Server,
    b: Server,
    domain: ChannelDomain,
}

async fn two() -> Two {
    let fleet = Fleet::start().await;
    let (pa, pb) = (free_port(), free_port());
    let a = fleet.serve(pa, &format!("http://127.0.0.1:{pa}"), FAST);
    let b = fleet.serve(pb, &format!("http://127.0.0.1:{pb}"), FAST);
    let domain = ChannelDomain::new(fleet.chain_id, fleet.contract);
    Two {
        fleet,
        a,
        b,
        domain,
    }
}

impl Two {
    async fn channel(&self, salt: u8) -> B256 {
        Channels::at(
            RpcBackend::connect(&self.fleet.anvil.url, dev_signer(1))
                .await
                .unwrap(),
            self.fleet.contract,
        )
        .open(
            self.fleet.payee(),
            Address::ZERO,
            B256::repeat_byte(salt),
            10_000,
            3_600,
        )
        .await
        .unwrap()
        .0
    }

    /// A session opened on `server` and left (the connection dropped): its token.
    async fn parked(&self, server: &Server, channel: B256) -> String {
        let mut c = Client::connect(&server.url, self.domain, channel).await;
        let ServerMessage::Session { resume_token, .. } = c.open(1, 100).await else {
            panic!("no session");
        };
        c.send(&ClientMessage::Request {
            body: serde_json::json!({ "maxTokens": 5 }),
        })
        .await;
        c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
            .await;
        drop(c);
        // Parked once the server saw the drop: its lease is given back.
        server
            .wait_metric_until("paystream_leases_held", |held| held == 0)
            .await;
        resume_token
    }

    async fn stored(&self, channel: B256) -> (StoredChannel, Option<Vec<(String, String)>>) {
        let store = RedisStore::connect(&self.fleet.redis.url, "ps:")
            .await
            .unwrap();
        let record = {
            let client = redis::Client::open(self.fleet.redis.url.as_str()).unwrap();
            let mut conn = client.get_connection().unwrap();
            let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(format!("ps:sess:{{{channel}}}"))
                .query(&mut conn)
                .unwrap();
            fields.sort();
            (!fields.is_empty()).then_some(fields)
        };
        (store.load(channel).await.unwrap().unwrap(), record)
    }
}

/// The claims inside a token (not checked: the attacker's view).
fn claims_of(token: &str) -> ResumeClaims {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn sign(claims: &ResumeClaims, alg: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// Presents `token` to `server`; returns what came back and the close code.
async fn resume(
    server: &Server,
    domain: ChannelDomain,
    channel: B256,
    token: &str,
) -> (ServerMessage, Option<u16>) {
    let mut c = Client::connect(&server.url, domain, channel).await;
    c.send(&ClientMessage::Resume {
        token: token.to_string(),
    })
    .await;
    let first = c.recv().await.expect("an answer");
    if matches!(first, ServerMessage::Session { .. }) {
        return (first, None);
    }
    let (_, code) = c.drain().await;
    (first, code)
}

fn is_bad_token(m: &ServerMessage) -> bool {
    matches!(m, ServerMessage::Error { code, retriable: false, .. } if code == "bad_resume_token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_on_every_process_and_change_nothing() {
    let two = two().await;
    let (x, y) = (two.channel(1).await, two.channel(2).await);
    let token = two.parked(&two.a, x).await;
    let _other = two.parked(&two.b, y).await;
    let before = two.stored(x).await;
    let claims = claims_of(&token);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let none = {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        format!("{header}.{body}.")
    };
    let forged = [
        (
            "another key",
            sign(
                &claims,
                Algorithm::HS256,
                b"not the fleet's secret, but 32+ bytes",
            ),
        ),
        ("alg none", none),
        (
            "another algorithm",
            sign(&claims, Algorithm::HS512, SECRET.as_bytes()),
        ),
        (
            "expired",
            sign(
                &ResumeClaims {
                    iat: now - 7_200,
                    exp: now - 3_600,
                    ..claims.clone()
                },
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
        (
            "another channel",
            sign(
                &ResumeClaims {
                    ch: y,
                    ..claims.clone()
                },
                Algorithm::HS256,
                SECRET.as_bytes(),
            ),
        ),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, bad) in &forged {
        for server in [&two.a, &two.b] {
            let (answer, code) = resume(server, two.domain, x, bad).await;
            assert!(is_bad_token(&answer), "{what}: {answer:?}");
            assert_eq!(code, Some(4401), "{what}");
        }
    }
    // Nothing changed: the channel's state, the session record (its token id included).
    assert_eq!(two.stored(x).await, before);

    // The real token still works, on the other process; then it is spent, everywhere.
    let (answer, _) = resume(&two.b, two.domain, x, &token).await;
    assert!(
        matches!(
            answer,
            ServerMessage::Session {
                nonce: 1,
                cumulative: 100,
                consumed: 5,
                ..
            }
        ),
        "{answer:?}"
    );
    for server in [&two.a, &two.b] {
        let (answer, code) = resume(server, two.domain, x, &token).await;
        assert!(is_bad_token(&answer), "reused: {answer:?}");
        assert_eq!(code, Some(4401));
    }
    assert_eq!(
        two.b
            .metric("paystream_sessions_resumed_total{from=\"remote\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resumes_racing_on_two_processes_one_wins() {
    let two = two().await;
    for round in 0..5u8 {
        let x = two.channel(10 + round).await;
        let token = two.parked(&two.a, x).await;
        let before = two.stored(x).await.0;
        let (on_a, on_b) = tokio::join!(
            resume(&two.a, two.domain, x, &token),
            resume(&two.b, two.domain, x, &token),
        );
        let won: Vec<_> = [&on_a, &on_b]
            .into_iter()
            .filter(|(m, _)| matches!(m, ServerMessage::Session { .. }))
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {on_a:?} {on_b:?}");
        let lost = if matches!(on_a.0, ServerMessage::Session { .. }) {
            &on_b
        } else {
            &on_a
        };
        assert!(is_bad_token(&lost.0), "round {round}: {lost:?}");
        assert_eq!(lost.1, Some(4401));
        // The loser changed nothing: the money records are as they were.
        assert_eq!(two.stored(x).await.0, before);
    }
}
