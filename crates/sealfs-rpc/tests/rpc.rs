//! The wire protocol between real sockets on loopback.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sealfs_rpc::frame::{read_frame, Header, Kind, HEADER_BYTES};
use sealfs_rpc::{
    auth, Client, ClientConfig, ClusterKey, Handler, Request, Response, RpcError, Server,
    ServerConfig, Status,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO: u16 = 1;
const SLEEP: u16 = 2;
/// Makes the in-process test's handler panic.
const FAIL: u16 = 3;
/// Answers with more metadata than a frame carries.
const TOO_BIG: u16 = 4;

struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, req: Request) -> Response {
        match req.op {
            ECHO => Response::ok(req.meta, req.data),
            SLEEP => {
                let ms: u64 = sealfs_rpc::decode_meta(&req.meta).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Response::ok(Bytes::new(), Bytes::new())
            }
            TOO_BIG => Response::ok(
                Bytes::from(vec![0; sealfs_rpc::frame::META_BYTES_MAX as usize + 1]),
                Bytes::new(),
            ),
            op => Response::error(Status::UnknownOp as u16, format!("unknown operation {op}")),
        }
    }
}

fn key() -> ClusterKey {
    ClusterKey::from_secret(b"test cluster secret")
}

async fn server() -> sealfs_rpc::ServerHandle {
    Server::bind(
        "127.0.0.1:0",
        key(),
        ServerConfig::default(),
        Arc::new(Echo),
    )
    .await
    .unwrap()
}

/// A client of `srv` with the default settings.
fn client_of(srv: &sealfs_rpc::ServerHandle) -> Client {
    Client::new(srv.addr().to_string(), key(), ClientConfig::default())
}

fn echo(meta: &[u8], data: Bytes) -> Request {
    Request {
        op: ECHO,
        epoch: 7,
        meta: Bytes::copy_from_slice(meta),
        data,
    }
}

const SECOND: Duration = Duration::from_secs(10);

/// A SLEEP call with a 100 ms deadline ended by it.
fn assert_sleep_timed_out_at_100_ms(err: &RpcError) {
    assert!(
        matches!(
            err,
            RpcError::Timeout {
                op: SLEEP,
                ms: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_one_connection() {
    let srv = server().await;
    let client = Arc::new(client_of(&srv));
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u32 {
                let tag = format!("{t}/{i}");
                let data = Bytes::from(vec![(t ^ i) as u8; (i as usize * 997) % 70_000]);
                let r = c
                    .call(echo(tag.as_bytes(), data.clone()), SECOND)
                    .await
                    .unwrap()
                    .into_result()
                    .unwrap();
                assert_eq!(&r.meta[..], tag.as_bytes());
                assert_eq!(r.data, data);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(client.connects(), 1);
    assert_eq!(srv.accepted(), 1, "2560 requests over one connection");
    // Bulk data goes through untouched.
    let big = Bytes::from(
        (0..16u32 << 20)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let r = client
        .call(echo(b"big", big.clone()), SECOND)
        .await
        .unwrap();
    assert_eq!(r.data, big);
}

/// Frames of every size from many callers at once, some of the callers dropped at any point of
/// their send (here by a timeout around the call): no half frame is left behind, and every other
/// call gets its own bytes back over the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_and_large_frames_never_corrupt_the_stream() {
    let srv = server().await;
    let client = Arc::new(client_of(&srv));
    // Connected first: a caller cancelled while connecting drops a connection that was never
    // used, which is not what this test looks for.
    client
        .call(echo(b"hello", Bytes::new()), SECOND)
        .await
        .unwrap();
    let pattern = |t: u32, i: u32, len: usize| -> Bytes {
        (0..len as u32)
            .map(|k| (k.wrapping_mul(31) ^ t.wrapping_mul(7) ^ i) as u8)
            .collect::<Vec<u8>>()
            .into()
    };
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = 0;
            for i in 0..24u32 {
                // Sizes on both sides of the connection's 64 KiB read buffer, past the socket's
                // buffer, and a few MiB.
                let len = match (t + i) % 6 {
                    0 => 0,
                    1 => 4096,
                    2 => 65_000,
                    3 => 66_000,
                    4 => 700_000,
                    _ => 3 << 20,
                };
                let tag = format!("{t}/{i}");
                let data = pattern(t, i, len);
                let call = c.call(echo(tag.as_bytes(), data.clone()), SECOND);
                if (t + i) % 3 == 0 {
                    // Dropped after a few microseconds: mid-send, mid-queue or while waiting.
                    let _ = tokio::time::timeout(Duration::from_micros(50 * i as u64), call).await;
                    continue;
                }
                let r = call.await.unwrap().into_result().unwrap();
                assert_eq!(&r.meta[..], tag.as_bytes());
                assert!(r.data == data, "call {tag}: the data came back changed");
                answered += 1;
            }
            answered
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert!(answered >= 200, "{answered} calls answered");
    assert_eq!(client.connects(), 1, "the connection never broke");
    assert_eq!(srv.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_calls_and_late_responses_are_dropped() {
    let srv = server().await;
    let client = client_of(&srv);
    let slow = Request {
        op: SLEEP,
        epoch: 0,
        meta: sealfs_rpc::encode_meta(&600u64).unwrap(),
        data: Bytes::new(),
    };
    let err = client
        .call(slow, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_sleep_timed_out_at_100_ms(&err);
    // The connection is still good, and the late response (in 500 ms) is dropped quietly.
    for _ in 0..10 {
        client.call(echo(b"x", Bytes::new()), SECOND).await.unwrap();
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    assert_eq!(client.connects(), 1);
    // The server applies the deadline too: it stops the handler and says so.
    let slower = Request {
        op: SLEEP,
        epoch: 0,
        meta: sealfs_rpc::encode_meta(&5000u64).unwrap(),
        data: Bytes::new(),
    };
    let started = std::time::Instant::now();
    assert!(client
        .call(slower, Duration::from_millis(200))
        .await
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cluster_secret_is_refused() {
    let srv = server().await;
    let intruder = Client::new(
        srv.addr().to_string(),
        ClusterKey::from_secret(b"guess"),
        ClientConfig::default(),
    );
    let err = intruder
        .call(echo(b"x", Bytes::new()), SECOND)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cluster secret"), "{err}");
    assert_eq!(srv.accepted(), 0);
    let friend = client_of(&srv);
    friend.call(echo(b"x", Bytes::new()), SECOND).await.unwrap();
}

async fn authed(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    auth::client(&mut s, &key()).await.unwrap();
    s
}

/// Reads until the server closes; returns the frames it sent first.
async fn until_closed(s: &mut TcpStream) -> Vec<sealfs_rpc::Frame> {
    let mut frames = Vec::new();
    let read = async {
        while let Ok(f) = read_frame(s).await {
            frames.push(f);
        }
    };
    tokio::time::timeout(SECOND, read)
        .await
        .expect("the server closes the connection");
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let srv = server().await;
    let good = client_of(&srv);
    good.call(echo(b"before", Bytes::new()), SECOND)
        .await
        .unwrap();
    let valid = Header {
        kind: Kind::Request,
        op: ECHO,
        status: 0,
        deadline_ms: 0,
        id: 5,
        epoch: 0,
        meta_len: 0,
        data_len: 0,
    };

    // Bad magic.
    let mut s = authed(srv.addr()).await;
    let mut h = valid.encode();
    h[0] = b'X';
    s.write_all(&h).await.unwrap();
    let frames = until_closed(&mut s).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].header.status, Status::BadFrame as u16);
    assert!(String::from_utf8_lossy(&frames[0].meta).contains("magic"));

    // A data length of 4 GiB: refused from the header, nothing allocated.
    let mut s = authed(srv.addr()).await;
    let mut h = valid.encode();
    h[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&h).await.unwrap();
    let frames = until_closed(&mut s).await;
    assert!(String::from_utf8_lossy(&frames[0].meta).contains("over the limit"));

    // A response where a request belongs, and a truncated frame.
    let mut s = authed(srv.addr()).await;
    s.write_all(
        &Header {
            kind: Kind::Response,
            ..valid
        }
        .encode(),
    )
    .await
    .unwrap();
    until_closed(&mut s).await;
    let mut s = authed(srv.addr()).await;
    s.write_all(
        &Header {
            meta_len: 100,
            ..valid
        }
        .encode(),
    )
    .await
    .unwrap();
    s.write_all(b"only part of it").await.unwrap();
    s.shutdown().await.unwrap();
    until_closed(&mut s).await;

    // Garbage instead of a handshake.
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    s.write_all(&[0x42u8; 48]).await.unwrap();
    let mut buf = [0u8; HEADER_BYTES];
    let n = tokio::time::timeout(SECOND, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");

    // An unknown operation is an error response, not a closed connection.
    let r = good
        .call(
            Request {
                op: 999,
                ..Default::default()
            },
            SECOND,
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::UnknownOp as u16);
    // The well-behaved client never noticed any of it.
    good.call(echo(b"after", Bytes::new()), SECOND)
        .await
        .unwrap();
    assert_eq!(good.connects(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_with_backoff_after_a_restart() {
    let srv = server().await;
    let addr = srv.addr();
    let client = Client::new(addr.to_string(), key(), ClientConfig::default());
    client.call(echo(b"1", Bytes::new()), SECOND).await.unwrap();
    srv.shutdown().await;
    let err = client
        .call(echo(b"2", Bytes::new()), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RpcError::ConnectionLost(_) | RpcError::Unreachable { .. }
        ),
        "{err}"
    );
    // Back on the same port: the next calls get through on a new connection.
    let srv = Server::bind(
        &addr.to_string(),
        key(),
        ServerConfig::default(),
        Arc::new(Echo),
    )
    .await
    .unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if client
            .call(echo(b"3", Bytes::new()), Duration::from_secs(2))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "reconnected");
    assert_eq!(client.connects(), 2);
    assert_eq!(srv.accepted(), 1);
    // Nobody listening at all: a clear error within the deadline, not a hang.
    srv.shutdown().await;
    let started = std::time::Instant::now();
    let err = client
        .call(echo(b"4", Bytes::new()), Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
}

/// Holds each request 300 ms and records the most request bytes it held at once.
#[derive(Default)]
struct Holding {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Handler for Holding {
    async fn handle(&self, req: Request) -> Response {
        use std::sync::atomic::Ordering::SeqCst;
        let n = req.meta.len() + req.data.len();
        let held = self.now.fetch_add(n, SeqCst) + n;
        self.peak.fetch_max(held, SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.now.fetch_sub(n, SeqCst);
        Response::ok(Bytes::new(), Bytes::new())
    }
}

/// The bytes of requests a server holds for one connection are bounded: past the bound a
/// frame waits unread until others are answered, and every call still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_stay_within_a_connections_byte_budget() {
    const MIB: usize = 1 << 20;
    let holding = Arc::new(Holding::default());
    let cfg = ServerConfig {
        request_bytes_per_connection: 100 * MIB,
        ..ServerConfig::default()
    };
    let srv = Server::bind("127.0.0.1:0", key(), cfg, holding.clone())
        .await
        .unwrap();
    let body = Bytes::from(vec![7u8; 40 * MIB]);
    // Six calls of 40 MiB at once on one connection.
    let client = Arc::new(client_of(&srv));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (c, body) = (client.clone(), body.clone());
        calls.spawn(async move { c.call(echo(b"", body), Duration::from_secs(60)).await });
    }
    while let Some(r) = calls.join_next().await {
        assert_eq!(r.unwrap().unwrap().status, 0);
    }
    let peak = holding.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak >= 40 * MIB, "{peak}");
    assert!(peak <= 100 * MIB, "held {} MiB at once", peak / MIB);
    assert_eq!(client.connects(), 1);
    srv.shutdown().await;
}

/// A handler's answer too large for a frame fails its call alone: the connection and the
/// calls on it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_past_the_frame_bounds_fails_only_its_call() {
    let srv = server().await;
    let c = client_of(&srv);
    let before = c.call(echo(b"one", Bytes::new()), SECOND).await.unwrap();
    assert_eq!(&before.meta[..], b"one");
    let big = Request {
        op: TOO_BIG,
        ..Default::default()
    };
    let (r, other) = tokio::join!(
        c.call(big, SECOND),
        c.call(echo(b"beside", Bytes::from_static(b"it")), SECOND)
    );
    let r = r.unwrap();
    assert_eq!(r.status, Status::Internal as u16);
    assert!(
        String::from_utf8_lossy(&r.meta).contains("1048577 metadata"),
        "{:?}",
        String::from_utf8_lossy(&r.meta)
    );
    assert_eq!(&other.unwrap().meta[..], b"beside");
    assert_eq!(
        &c.call(echo(b"after", Bytes::new()), SECOND)
            .await
            .unwrap()
            .meta[..],
        b"after"
    );
    assert_eq!(c.connects(), 1, "the connection was dropped");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_does_not_parse_is_an_error() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Lookup {
        parent: u64,
        name: String,
    }
    let m = sealfs_rpc::encode_meta(&Lookup {
        parent: 1,
        name: "a".into(),
    })
    .unwrap();
    assert_eq!(
        sealfs_rpc::decode_meta::<Lookup>(&m).unwrap(),
        Lookup {
            parent: 1,
            name: "a".into()
        }
    );
    assert!(sealfs_rpc::decode_meta::<Lookup>(&m[..m.len() - 1]).is_err());
    assert!(sealfs_rpc::decode_meta::<Lookup>(&[0xff; 40]).is_err());
}

/// Counts the requests its handler finished.
struct Finishing(Arc<std::sync::atomic::AtomicUsize>);

#[async_trait]
impl Handler for Finishing {
    async fn handle(&self, req: Request) -> Response {
        assert_ne!(req.op, FAIL, "a handler that fails");
        let r = Echo.handle(req).await;
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }
}

/// A server in the client's own process is called directly: no connection, the bulk bytes not
/// copied, the same deadlines (the handler not cancelled halfway when the caller gives up, but
/// stopped a little past the deadline); once it is removed, calls go over the network again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_in_this_process_are_called_directly_with_the_same_deadlines() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let srv = server().await;
    let addr = srv.addr().to_string();
    let finished = Arc::new(AtomicUsize::new(0));
    let near = sealfs_rpc::InProcess::default();
    near.add(addr.clone(), Arc::new(Finishing(finished.clone())));
    let client =
        Client::new(addr.clone(), key(), ClientConfig::default()).with_in_process(near.clone());
    let data = Bytes::from(vec![7u8; 1 << 20]);
    let r = client
        .call(echo(b"near", data.clone()), SECOND)
        .await
        .unwrap()
        .into_result()
        .unwrap();
    assert_eq!(&r.meta[..], b"near");
    assert_eq!(r.data.as_ptr(), data.as_ptr(), "the bytes were not copied");
    assert_eq!(finished.load(Ordering::SeqCst), 1);

    let sleep = |ms: u64| Request {
        op: SLEEP,
        epoch: 0,
        meta: sealfs_rpc::encode_meta(&ms).unwrap(),
        data: Bytes::new(),
    };
    // Given up on at its deadline, finished by the handler within the grace.
    let err = client
        .call(sleep(130), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_sleep_timed_out_at_100_ms(&err);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "the handler ran to its end"
    );
    // Far past the deadline: stopped.
    let started = std::time::Instant::now();
    assert!(client
        .call(sleep(3000), Duration::from_millis(100))
        .await
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "the handler was stopped"
    );
    // A handler that panics fails its call at once (its task is lost, as a connection would
    // be), and the next call is answered.
    let started = std::time::Instant::now();
    let failed = Request {
        op: FAIL,
        epoch: 0,
        meta: Bytes::new(),
        data: Bytes::new(),
    };
    let err = client.call(failed, SECOND).await.unwrap_err();
    assert!(matches!(err, RpcError::ConnectionLost(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    client
        .call(echo(b"again", Bytes::new()), SECOND)
        .await
        .unwrap();
    assert_eq!(finished.load(Ordering::SeqCst), 3);
    assert_eq!(client.connects(), 0);
    assert_eq!(srv.accepted(), 0);

    near.remove(&addr);
    let r = client
        .call(echo(b"far", data.clone()), SECOND)
        .await
        .unwrap();
    assert_eq!(r.data, data);
    assert_eq!(client.connects(), 1);
    assert_eq!(srv.accepted(), 1);
    assert_eq!(finished.load(Ordering::SeqCst), 3);
}
