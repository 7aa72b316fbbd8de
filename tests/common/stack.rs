//! A whole PayStream stack for a test: a real anvil with the contract deployed, a real
//! redis-server, and the server on 127.0.0.1 with a port chosen at run time; plus a payer that
//! opens channels and a WebSocket client that speaks the protocol.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use futures_util::{SinkExt, StreamExt};
use k256::ecdsa::SigningKey;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, ChannelChain, Channels};
use paystream::channel::{ChannelDomain, ChannelState, signature};
use paystream::meter::Tariff;
use paystream::protocol::{
    ClientMessage, ServerMessage, SignedStateMsg, decode_server, encode_client,
};
use paystream::server::resource::{Resource, TokenGenerator};
use paystream::server::{self, Limits, ServerState};
use paystream::session::SessionParams;
use paystream::store::redis::RedisStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::anvil::{Anvil, dev_signer};
use super::faults::Proxy;
use super::redis::Redis;

/// 10^18.
pub const ETH: u128 = 1_000_000_000_000_000_000;

/// The running stack.
pub struct Stack {
    pub anvil: Anvil,
    pub redis: Redis,
    /// The proxy the server reaches Redis through, when [`Options::store_proxy`] asked for one.
    pub store_proxy: Option<Proxy>,
    pub contract: Address,
    pub chain_id: u64,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub state: Arc<ServerState<Channels<RpcBackend>, RedisStore>>,
    /// The payer (dev key 1) on the contract.
    pub payer: Channels<RpcBackend>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// What a test may change before the server starts.
pub struct Options {
    pub tariff: Tariff,
    pub params: Box<dyn FnOnce(&mut SessionParams)>,
    pub limits: Box<dyn FnOnce(&mut Limits)>,
    pub tokens_per_sec: u32,
    /// Served as `/ws/tokens` instead of the token generator.
    pub resource: Option<Arc<dyn Resource>>,
    /// How long the server's chain backend waits for a transaction to be mined.
    pub tx_timeout: Option<Duration>,
    /// The server reaches Redis through a [`Proxy`] (to slow its store down, or cut it).
    pub store_proxy: bool,
}

impl Options {
    pub fn new(tariff_json: &str) -> Self {
        Self {
            tariff: Tariff::from_json(tariff_json).unwrap(),
            params: Box::new(|_| {}),
            limits: Box::new(|_| {}),
            tokens_per_sec: 0,
            resource: None,
            tx_timeout: None,
            store_proxy: false,
        }
    }
}

pub fn payer_key() -> SigningKey {
    SigningKey::from_slice(dev_signer(1).to_bytes().as_slice()).unwrap()
}

pub fn payee() -> Address {
    dev_signer(2).address()
}

impl Stack {
    pub async fn start(options: Options) -> Self {
        let anvil = Anvil::start();
        let redis = Redis::start();
        let deployer = RpcBackend::connect(&anvil.url, dev_signer(0))
            .await
            .unwrap();
        let contract = Channels::deploy(deployer).await.unwrap().address();
        let mut payee_backend = RpcBackend::connect(&anvil.url, dev_signer(2))
            .await
            .unwrap();
        if let Some(timeout) = options.tx_timeout {
            payee_backend = payee_backend.with_tx_timeout(timeout);
        }
        let chain_id = payee_backend.chain_id();
        let chain = Channels::at(payee_backend, contract);
        let store_proxy = if options.store_proxy {
            Some(Proxy::start(([127, 0, 0, 1], redis.port).into()).await)
        } else {
            None
        };
        let store_url = store_proxy
            .as_ref()
            .map_or(redis.url.clone(), |p| format!("redis://{}/", p.addr));
        let store = RedisStore::connect(&store_url, "ps:").await.unwrap();
        let mut params = SessionParams::new(
            ChannelDomain::new(chain_id, contract),
            payee(),
            Address::ZERO,
            options.tariff,
            1_000,
        );
        (options.params)(&mut params);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut resources: paystream::server::resource::Resources = Default::default();
        let tokens: Arc<dyn Resource> = options.resource.unwrap_or_else(|| {
            Arc::new(TokenGenerator {
                tokens_per_sec: options.tokens_per_sec,
                default_max_tokens: 100,
            })
        });
        resources.insert("tokens".into(), tokens);
        let payee_key = SigningKey::from_slice(dev_signer(2).to_bytes().as_slice()).unwrap();
        let mut state = ServerState::new(
            params,
            chain,
            store,
            resources,
            Some(payee_key),
            url.clone(),
        );
        (options.limits)(&mut state.limits);
        let state = Arc::new(state);
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(server::run(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        let payer = Channels::at(
            RpcBackend::connect(&anvil.url, dev_signer(1))
                .await
                .unwrap(),
            contract,
        );
        Self {
            anvil,
            redis,
            store_proxy,
            contract,
            chain_id,
            url,
            state,
            payer,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Opens a native-ETH channel from the payer to `payee` with `deposit`.
    pub async fn open_channel(&self, payee: Address, salt: u8, deposit: u128) -> B256 {
        self.payer
            .open(payee, Address::ZERO, B256::repeat_byte(salt), deposit, 3600)
            .await
            .unwrap()
            .0
    }

    pub fn domain(&self) -> ChannelDomain {
        ChannelDomain::new(self.chain_id, self.contract)
    }

    pub async fn client(&self, channel: B256) -> Client {
        Client::connect(&self.url, self.domain(), channel).await
    }

    /// A bare WebSocket client (answers no Ping by itself).
    pub async fn raw(&self) -> super::raw::Raw {
        super::raw::Raw::connect(&self.url).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    /// The id of the payer's native-ETH channel to this server's payee with `salt` bytes.
    pub fn read_channel_id(&self, salt: u8) -> B256 {
        paystream::channel::ChannelKey {
            chain_id: self.chain_id,
            contract: self.contract,
            payer: dev_signer(1).address(),
            payee: payee(),
            token: Address::ZERO,
            salt: B256::repeat_byte(salt),
        }
        .channel_id()
    }

    pub async fn read_channel(&self, id: B256) -> paystream::channel::ChannelInfo {
        self.payer.read_channel(id).await.unwrap().unwrap()
    }
}

/// A voucher message for `channel` signed with `key`.
pub fn sign_voucher(
    domain: &ChannelDomain,
    key: &SigningKey,
    channel: B256,
    nonce: u64,
    cumulative: u128,
) -> SignedStateMsg {
    SignedStateMsg::sign(domain, key, channel, nonce, cumulative)
}

/// A protocol client for tests: signs with the payer's key.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    pub domain: ChannelDomain,
    pub channel: B256,
    pub key: SigningKey,
    pub close_code: Option<u16>,
}

impl Client {
    pub async fn connect(http_url: &str, domain: ChannelDomain, channel: B256) -> Self {
        let url = format!("{}/ws/tokens", http_url.replacen("http", "ws", 1));
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Self {
            ws,
            domain,
            channel,
            key: payer_key(),
            close_code: None,
        }
    }

    /// A voucher for this channel signed with `self.key`.
    pub fn voucher(&self, nonce: u64, cumulative: u128) -> SignedStateMsg {
        let state = ChannelState {
            channelId: self.channel,
            nonce,
            cumulative,
        };
        let sig = signature::sign_digest(&self.key, &self.domain.state_digest(&state));
        SignedStateMsg {
            channel_id: self.channel,
            nonce,
            cumulative,
            signature: signature::to_bytes(&sig).to_vec().into(),
        }
    }

    pub async fn send(&mut self, message: &ClientMessage) {
        self.send_text(&encode_client(message)).await;
    }

    /// Sends without failing the test when the server already closed (a flood test races the
    /// server's close).
    pub async fn try_send(&mut self, message: &ClientMessage) -> bool {
        self.ws
            .send(Message::Text(encode_client(message).into()))
            .await
            .is_ok()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .expect("send");
    }

    /// The next protocol message, or `None` when the server closed (its code is kept). Fails
    /// the test after 30 s of silence.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("the server answers within 30 s");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(decode_server(&text).expect("valid server message"));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.close_code = frame.map(|f| u16::from(f.code));
                    // Complete the closing handshake: tungstenite queued our reply.
                    let _ = self.ws.flush().await;
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Reads until `pred` matches, returning everything read (the match last).
    pub async fn recv_until(
        &mut self,
        pred: impl Fn(&ServerMessage) -> bool,
    ) -> Vec<ServerMessage> {
        let mut seen = Vec::new();
        // Bounded as a whole, not only per message: periodic `usage` must not keep a test
        // waiting forever for a message that never comes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Some(m) = self.recv().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching message within 30 s; the last ones: {:?}",
                &seen[seen.len().saturating_sub(5)..]
            );
            let done = pred(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!(
            "closed ({:?}) before the expected message; saw {seen:?}",
            self.close_code
        );
    }

    /// Opens the session with a voucher for `cumulative` at `nonce`, returning `session`.
    pub async fn open(&mut self, nonce: u64, cumulative: u128) -> ServerMessage {
        let v = self.voucher(nonce, cumulative);
        self.send(&ClientMessage::Open(v)).await;
        let mut seen = self
            .recv_until(|m| {
                matches!(
                    m,
                    ServerMessage::Session { .. } | ServerMessage::Error { .. }
                )
            })
            .await;
        seen.pop().unwrap()
    }

    /// Opens a session, failing the test with the server's answer if it is not `session`.
    pub async fn opened(&mut self, nonce: u64, cumulative: u128) -> ServerMessage {
        let reply = self.open(nonce, cumulative).await;
        assert!(
            matches!(reply, ServerMessage::Session { .. }),
            "open {nonce} refused: {reply:?}"
        );
        reply
    }

    /// Reads until the server closes or `limit` passes, returning everything read and the close
    /// code (`None` if the server did not close in time).
    pub async fn drain_for(&mut self, limit: Duration) -> (Vec<ServerMessage>, Option<u16>) {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(next) => next,
                Err(_) => return (seen, None),
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    seen.push(decode_server(&text).expect("valid server message"));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.close_code = frame.map(|f| u16::from(f.code));
                    let _ = self.ws.flush().await;
                    return (seen, self.close_code);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (seen, self.close_code),
            }
        }
    }

    /// Reads until the server closes, returning everything read and the close code.
    pub async fn drain(&mut self) -> (Vec<ServerMessage>, Option<u16>) {
        let mut seen = Vec::new();
        while let Some(m) = self.recv().await {
            seen.push(m);
        }
        (seen, self.close_code)
    }
}

/// The body of a plain HTTP/1.1 GET to the server (`path` like `/metrics`).
pub async fn http_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of an unlabelled metric in `/metrics`.
pub async fn metric(stack: &Stack, name: &str) -> Option<u64> {
    let text = http_get(&stack.url, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (up to 10 s, checking every 20 ms) until a metric reads `value`: the server's own
/// account of an event the test cannot see on its sockets (a dropped connection parked).
pub async fn wait_for_metric(stack: &Stack, name: &str, value: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(stack, name).await;
        if now == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {now:?}, waited for {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
