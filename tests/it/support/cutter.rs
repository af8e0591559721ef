//! A TCP proxy in front of a store emulator that resets connections the way a flaky network
//! does: a request never reaches the store, or reaches it and its reply is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which requests are cut.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// One request in n, at random, half before the store sees it and half after it
    /// answered (at random, not every n-th: with requests in flight side by side, a fixed
    /// stride can cut one request's every retry).
    OneIn(u32),
    /// Requests whose first line contains one of these, after the store answered: the first
    /// of each request line, the third, and so on, so every second try gets through.
    RepliesTo(&'static [&'static str]),
}

/// The proxy, listening on loopback until dropped.
pub struct Cutter {
    /// `http://127.0.0.1:<port>`, to use in place of the store's endpoint.
    pub endpoint: String,
    counts: Arc<Counts>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    tries: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    lost_requests: AtomicUsize,
    lost_replies: AtomicUsize,
}

impl Cutter {
    /// Proxies to `upstream` (`http://host:port`), cutting what `cut` says.
    pub fn start(upstream: &str, cut: Cut) -> Cutter {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http:// endpoint")
            .to_string();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let counts = Arc::new(Counts::default());
        let shared = Arc::clone(&counts);
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counts) = (upstream.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = relay(client, server, cut, &counts).await;
                    }
                });
            }
        });
        Cutter {
            endpoint,
            counts,
            _runtime: runtime,
        }
    }

    /// Requests that never reached the store.
    pub fn lost_requests(&self) -> usize {
        self.counts.lost_requests.load(Ordering::SeqCst)
    }

    /// Requests the store carried out whose reply never reached the client.
    pub fn lost_replies(&self) -> usize {
        self.counts.lost_replies.load(Ordering::SeqCst)
    }

    /// Requests seen.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

/// Copies bytes both ways until either side closes or a cut is due.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    cut: Cut,
    counts: &Counts,
) -> std::io::Result<()> {
    let (mut from_client, mut from_server) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut reply_lost = false;
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                if starts_request(&from_client[..n]) {
                    match verdict(&from_client[..n], cut, counts) {
                        Verdict::Pass => {}
                        Verdict::LoseRequest => {
                            counts.lost_requests.fetch_add(1, Ordering::SeqCst);
                            return reset(client);
                        }
                        Verdict::LoseReply => reply_lost = true,
                    }
                }
                server.write_all(&from_client[..n]).await?;
            }
            read = server.read(&mut from_server) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                if reply_lost {
                    counts.lost_replies.fetch_add(1, Ordering::SeqCst);
                    return reset(client);
                }
                client.write_all(&from_server[..n]).await?;
            }
        }
    }
}

enum Verdict {
    Pass,
    LoseRequest,
    LoseReply,
}

/// What becomes of the request that `chunk` begins.
fn verdict(chunk: &[u8], cut: Cut, counts: &Counts) -> Verdict {
    counts.requests.fetch_add(1, Ordering::SeqCst);
    match cut {
        Cut::OneIn(n) if fastrand::u32(..n) != 0 => Verdict::Pass,
        Cut::OneIn(_) if fastrand::bool() => Verdict::LoseRequest,
        Cut::OneIn(_) => Verdict::LoseReply,
        Cut::RepliesTo(needles) => {
            let line = chunk.split(|&b| b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            if !needles.iter().any(|needle| line.contains(needle)) {
                return Verdict::Pass;
            }
            let mut tries = counts.tries.lock().unwrap();
            let tried = tries.entry(line.into_owned()).or_default();
            *tried += 1;
            if *tried % 2 == 1 {
                Verdict::LoseReply
            } else {
                Verdict::Pass
            }
        }
    }
}

/// True when `chunk` begins an HTTP request (the clients here send one at a time).
fn starts_request(chunk: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"PUT ", b"POST ", b"DELETE "]
        .iter()
        .any(|method| chunk.starts_with(method))
}

/// Closes `client` with a reset, as a dropped connection looks to the other end.
fn reset(client: TcpStream) -> std::io::Result<()> {
    client.set_zero_linger()?;
    drop(client);
    Ok(())
}
