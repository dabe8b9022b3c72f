//! A TCP proxy on loopback that can stop forwarding mid-command: the stalled server that
//! timeouts must survive (the connection stays open, nothing moves either way).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Forwards every connection made to [`StallProxy::port`] to `target`.
#[derive(Debug)]
pub struct StallProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl StallProxy {
    /// Starts forwarding to `127.0.0.1:target`.
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stalled = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let (s, st, h, all) = (
            Arc::clone(&stalled),
            Arc::clone(&stop),
            Arc::clone(&held),
            Arc::clone(&streams),
        );
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        for stream in [&client, &server] {
                            if let Ok(copy) = stream.try_clone() {
                                all.lock().unwrap_or_else(|e| e.into_inner()).push(copy);
                            }
                        }
                        for (from, to) in [(&client, &server), (&server, &client)] {
                            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                                continue;
                            };
                            let (s, h) = (Arc::clone(&s), Arc::clone(&h));
                            std::thread::spawn(move || pump(from, to, &s, &h));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            stalled,
            stop,
            held,
            streams,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding: what arrives from now on is held, connections stay open.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwards again, what was held first.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// How many chunks arrived while stalled (proof that a command was cut mid-way).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool, held: &AtomicUsize) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            held.fetch_add(1, Ordering::SeqCst);
            while stalled.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        for stream in self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
