//! RPC on loopback: small round trips per second with 1 and 64 requests in flight on one
//! connection, and bulk MB/s each way, beside iperf3 (Debian's iperf3) in the same run.
//!
//! cargo run --release -p sealfs-rpc --example rpc_bench -- [--secs N] [--write docs/rpc-bench.md]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use sealfs_rpc::{
    Client, ClientConfig, ClusterKey, Handler, Request, Response, Server, ServerConfig,
};

const PING: u16 = 1;
const SINK: u16 = 2;
const SOURCE: u16 = 3;
const BULK: usize = 1 << 20;

struct Bench {
    payload: Bytes,
}

#[async_trait]
impl Handler for Bench {
    async fn handle(&self, req: Request) -> Response {
        match req.op {
            SOURCE => Response::ok(Bytes::new(), self.payload.clone()),
            _ => Response::ok(Bytes::new(), Bytes::new()),
        }
    }
}

async fn drive(
    client: Arc<Client>,
    op: u16,
    data: Bytes,
    inflight: usize,
    secs: f64,
) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (c, d, data) = (client.clone(), done.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = Request {
                    op,
                    epoch: 0,
                    meta: Bytes::new(),
                    data: data.clone(),
                };
                c.call(req, Duration::from_secs(10))
                    .await
                    .unwrap()
                    .into_result()
                    .unwrap();
                d.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

fn iperf3(secs: f64) -> Option<f64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut server = std::process::Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &format!("{}", secs.ceil() as u64),
            "-J",
        ])
        .output()
        .ok();
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8(out?.stdout).ok()?;
    // "sum_received": { ... "bits_per_second": N ... }
    let at = text.find("\"sum_received\"")?;
    let rest = &text[at..];
    let b = rest.find("\"bits_per_second\"")?;
    let num: String = rest[b + 18..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+')
        .collect();
    num.parse::<f64>().ok().map(|bps| bps / 8e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut secs = 3.0;
    let mut write: Option<String> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().expect("--secs N").parse().expect("a number"),
            "--write" => write = Some(it.next().expect("--write FILE")),
            other => panic!("unknown argument {other}"),
        }
    }
    let key = ClusterKey::from_secret(b"bench");
    let payload = Bytes::from(vec![0x5au8; BULK]);
    let srv = Server::bind(
        "127.0.0.1:0",
        key.clone(),
        ServerConfig::default(),
        Arc::new(Bench {
            payload: payload.clone(),
        }),
    )
    .await
    .unwrap();
    let client = Arc::new(Client::new(
        srv.addr().to_string(),
        key,
        ClientConfig::default(),
    ));
    let (n1, t1) = drive(client.clone(), PING, Bytes::new(), 1, secs).await;
    let (n64, t64) = drive(client.clone(), PING, Bytes::new(), 64, secs).await;
    let (ns, ts) = drive(client.clone(), SINK, payload.clone(), 8, secs).await;
    let (nr, tr) = drive(client.clone(), SOURCE, Bytes::new(), 8, secs).await;
    assert_eq!(client.connects(), 1);
    drop(srv);
    let iperf = iperf3(secs);
    let send = (ns as f64 * BULK as f64) / ts / 1e6;
    let recv = (nr as f64 * BULK as f64) / tr / 1e6;
    let mut out = vec![
        "### RPC on loopback, one connection\n".to_string(),
        "| workload | result | ratio to iperf3 | target |".into(),
        "| --- | ---: | ---: | --- |".into(),
        format!(
            "| small requests, 1 in flight | {:.0} round trips/s ({:.1} µs each) | | |",
            n1 as f64 / t1,
            t1 / n1 as f64 * 1e6
        ),
        format!(
            "| small requests, 64 in flight | {:.0} round trips/s | | |",
            n64 as f64 / t64
        ),
    ];
    let ratio = |x: f64| iperf.map_or("iperf3 not found".to_string(), |i| format!("{:.2}", x / i));
    out.push(format!(
        "| 1 MiB requests to the server, 8 in flight | {send:.0} MB/s | {} | ≥ 0.5 |",
        ratio(send)
    ));
    out.push(format!(
        "| 1 MiB responses from the server, 8 in flight | {recv:.0} MB/s | {} | ≥ 0.5 |",
        ratio(recv)
    ));
    out.push(format!(
        "| iperf3, one TCP stream, same run | {} | 1 | |",
        iperf.map_or(
            "not installed (apt-get install iperf3)".into(),
            |i| format!("{i:.0} MB/s")
        )
    ));
    let text = out.join("\n");
    println!("{text}");
    if let Some(path) = write {
        let header = format!(
            "# RPC benchmark\n\nMachine: {} cores, loopback. Command: `cargo run --release -p sealfs-rpc --example rpc_bench -- --secs {secs} --write {path}`.\n\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        std::fs::write(&path, header + &text + "\n").unwrap();
    }
}
