//! A bare WebSocket client for the tests a library client cannot play: one that never answers
//! Pings (every WebSocket library answers them by itself), or writes frames without ever
//! reading. It speaks just enough RFC 6455: the upgrade, masked text and pong frames out,
//! unmasked frames in.

use std::time::Duration;

use paystream::protocol::{ClientMessage, ServerMessage, decode_server, encode_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw WebSocket connection.
pub struct Raw {
    pub stream: TcpStream,
    /// The close code, once the server closed.
    pub close_code: Option<u16>,
    /// Ping payloads received and not answered.
    pub pings: Vec<Vec<u8>>,
    /// A fragmented message being received: its opcode and the payload so far (the server
    /// sends protocol messages over 316 bytes in fragments).
    fragments: Option<(u8, Vec<u8>)>,
}

/// A frame from the server.
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

impl Raw {
    /// Connects to `http://host:port` and upgrades `/ws/tokens`.
    pub async fn connect(http_url: &str) -> Self {
        let host = http_url.strip_prefix("http://").unwrap();
        let mut stream = TcpStream::connect(host).await.unwrap();
        let request = format!(
            "GET /ws/tokens HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        Self {
            stream,
            close_code: None,
            pings: Vec::new(),
            fragments: None,
        }
    }

    /// A masked frame with `opcode` and `payload`.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Writes a text frame; `false` once the server has gone.
    pub async fn send_text(&mut self, text: &str) -> bool {
        self.stream
            .write_all(&Self::frame(0x1, text.as_bytes()))
            .await
            .is_ok()
    }

    /// Writes a text frame whose payload is `bytes`, valid UTF-8 or not.
    pub async fn send_bytes_as_text(&mut self, bytes: &[u8]) -> bool {
        self.stream
            .write_all(&Self::frame(0x1, bytes))
            .await
            .is_ok()
    }

    /// Writes a protocol message; `false` once the server has gone.
    pub async fn send(&mut self, message: &ClientMessage) -> bool {
        self.send_text(&encode_client(message)).await
    }

    /// `count` unsolicited Pong frames in one write (a client may send them at any time; the
    /// server answers none); `false` once the server has gone.
    pub async fn pongs(&mut self, count: usize) -> bool {
        let batch: Vec<u8> = (0..count).flat_map(|_| Self::frame(0xA, b"")).collect();
        self.stream.write_all(&batch).await.is_ok()
    }

    /// Answers the oldest unanswered Ping.
    pub async fn pong(&mut self) {
        let payload = if self.pings.is_empty() {
            Vec::new()
        } else {
            self.pings.remove(0)
        };
        self.stream
            .write_all(&Self::frame(0xA, &payload))
            .await
            .unwrap();
    }

    /// The next frame (a fragmented message whole, as its last fragment arrives; a control
    /// frame between its fragments as it comes), or `None` when the connection ended.
    pub async fn frame_in(&mut self) -> Option<Frame> {
        loop {
            let (fin, opcode, payload) = self.wire_frame().await?;
            let (opcode, payload) = match opcode {
                0x0 => {
                    let (first, mut so_far) = self
                        .fragments
                        .take()
                        .expect("a continuation frame follows a first fragment");
                    so_far.extend_from_slice(&payload);
                    (first, so_far)
                }
                0x1 | 0x2 => {
                    assert!(
                        self.fragments.is_none(),
                        "a new message inside a fragmented one"
                    );
                    (opcode, payload)
                }
                _ => {
                    assert!(fin, "control frames are never fragmented");
                    (opcode, payload)
                }
            };
            if !fin {
                self.fragments = Some((opcode, payload));
                continue;
            }
            return Some(Self::frame_of(opcode, payload));
        }
    }

    /// One frame off the wire: its FIN bit, opcode and payload.
    async fn wire_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head).await.ok()?;
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0f;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b).await.ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await.ok()?;
        Some((fin, opcode, payload))
    }

    fn frame_of(opcode: u8, payload: Vec<u8>) -> Frame {
        match opcode {
            0x1 => Frame::Text(String::from_utf8(payload).unwrap()),
            0x2 => Frame::Binary(payload),
            0x9 => Frame::Ping(payload),
            0xA => Frame::Pong,
            0x8 => Frame::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            other => panic!("unexpected opcode {other}"),
        }
    }

    /// The next protocol message, keeping (not answering) Pings; `None` when the server
    /// closed. Fails the test after 30 s of silence.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.frame_in())
                .await
                .expect("the server answers within 30 s")?;
            match frame {
                Frame::Text(text) => return Some(decode_server(&text).unwrap()),
                Frame::Ping(payload) => self.pings.push(payload),
                Frame::Binary(_) | Frame::Pong => {}
                Frame::Close(code) => {
                    self.close_code = code;
                    return None;
                }
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
}
