//! A tiny DNS server for probes and traffic tests (moved here from `kernel/probe.rs` so every
//! kernel test can use it).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Ns, SRV4};

/// Answers DNS queries on a UDP socket inside a namespace: same id, QR and RA set, RD copied,
/// the question echoed; NXDOMAIN for names whose first label starts with `nx`, else NOERROR with
/// one A record (198.18.0.1). Stopped and joined on `Drop`.
#[derive(Debug)]
pub struct DnsServer {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds `addr` (UDP) in `ns` and starts answering.
    pub fn start(ns: &Ns, addr: SocketAddr) -> DnsServer {
        let sock = match ns.run(move || super::bind_retrying(|| UdpSocket::bind(addr))) {
            Ok(s) => s,
            Err(e) => panic!("DNS server bind {addr}: {e}"),
        };
        if let Err(e) = sock.set_read_timeout(Some(Duration::from_millis(20))) {
            panic!("set_read_timeout: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    if let Some(reply) = dns_answer(&buf[..n]) {
                        // Counted before the send (taken back if it fails), so a client that
                        // has the answer always sees it counted (issue 10).
                        a.fetch_add(1, Ordering::SeqCst);
                        if sock.send_to(&reply, peer).is_err() {
                            a.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
        DnsServer { stop, answered, handle: Some(handle) }
    }

    /// Answers sent so far. An answer the client has received is already counted.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The answer to query `q`, or `None` for anything that is not a one-question query.
pub fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || q[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    loop {
        let l = *q.get(i)? as usize;
        i += 1;
        if l == 0 {
            break;
        }
        i += l;
    }
    let qend = i + 4;
    if q.len() < qend {
        return None;
    }
    let nx = q.get(13..15) == Some(b"nx");
    let mut r = q[..qend].to_vec();
    r[2] = 0x80 | (q[2] & 0x01);
    r[3] = 0x80 | if nx { 3 } else { 0 };
    r[6..12].copy_from_slice(&[0, u8::from(!nx), 0, 0, 0, 0]);
    if !nx {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&SRV4.octets());
    }
    Some(r)
}
