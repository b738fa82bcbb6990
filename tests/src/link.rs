//! A link emulator for mesh tests and benchmarks: a UDP relay in front of a server's mesh port that
//! adds one-way delay and drops a share of the datagrams, both ways.
//!
//! Written by hand because netem (the kernel's qdisc) is not available on the machines this runs
//! on (`tc qdisc add ... netem` answers "Specified qdisc kind is unknown"); where it is, network
//! namespaces with netem are the better tool. A relay per server, with the plan advertising the
//! relay's address, puts every mesh datagram to that server through it; a `victim` client address
//! limits loss and delay to one server's traffic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Result;

/// Knobs shared with a running relay.
#[derive(Debug, Default)]
pub struct LinkKnobs {
    /// Datagrams dropped, in percent (0..=100).
    pub loss_pct: AtomicU32,
    /// One-way delay added, in microseconds.
    pub delay_us: AtomicU32,
}

impl LinkKnobs {
    fn drop_now(&self) -> bool {
        rand::random::<u32>() % 100 < self.loss_pct.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(u64::from(self.delay_us.load(Ordering::Relaxed)))
    }
}

/// Relay `listen` → `target`. Knobs apply to every client, or only to `victim`.
pub async fn relay(
    listen: SocketAddr,
    target: SocketAddr,
    knobs: Arc<LinkKnobs>,
    victim: Option<SocketAddr>,
) -> Result<()> {
    let front = Arc::new(tokio::net::UdpSocket::bind(listen).await?);
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                break;
            };
            let applies = victim.is_none_or(|v| v == from);
            let back = match backs.get(&from) {
                Some(b) => b.clone(),
                None => {
                    let Ok(b) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                        break;
                    };
                    if b.connect(target).await.is_err() {
                        break;
                    }
                    let b = Arc::new(b);
                    let (front2, b2, knobs2) = (front.clone(), b.clone(), knobs.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 2048];
                        while let Ok(n) = b2.recv(&mut buf).await {
                            if applies && knobs2.drop_now() {
                                continue;
                            }
                            let data = buf[..n].to_vec();
                            let delay = if applies {
                                knobs2.delay()
                            } else {
                                Duration::ZERO
                            };
                            let front3 = front2.clone();
                            send_later(delay, async move {
                                let _ = front3.send_to(&data, from).await;
                            });
                        }
                    });
                    backs.insert(from, b.clone());
                    b
                }
            };
            if applies && knobs.drop_now() {
                continue;
            }
            let data = buf[..n].to_vec();
            let delay = if applies {
                knobs.delay()
            } else {
                Duration::ZERO
            };
            send_later(delay, async move {
                let _ = back.send(&data).await;
            });
        }
    });
    Ok(())
}

fn send_later(delay: Duration, send: impl Future<Output = ()> + Send + 'static) {
    if delay.is_zero() {
        tokio::spawn(send);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send.await;
        });
    }
}

/// Free loopback UDP addresses for `n` relays.
pub fn relay_addresses(n: usize) -> Result<Vec<SocketAddr>> {
    (0..n).map(|_| crate::free_udp_addr()).collect()
}
