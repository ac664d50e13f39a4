//! Network faults between the service and a server: a listener that never answers, a relay
//! that can be cut.

use super::*;

/// A listener that accepts connections and never says a word: the worst kind of outage.
pub struct Blackhole {
    pub port: u16,
    _thread: std::thread::JoinHandle<()>,
}

impl Blackhole {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    pub fn start_on(port: u16) -> Self {
        let listener = StdListener::bind(("127.0.0.1", port)).expect("bind blackhole");
        let port = listener.local_addr().expect("addr").port();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// A TCP relay in front of a server that can cut the network: after `cut`, connections that
/// were open stay open but silent for good (as when a container comes back with a new
/// address), and new ones are accepted and ignored until `heal`.
pub struct Partition {
    pub port: u16,
    generation: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    /// Milliseconds each chunk waits before it is passed on, either way (a slow link).
    delay_ms: Arc<AtomicU64>,
}

impl Partition {
    pub fn start(upstream: u16) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let generation = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (gen_, cut_, delay_) = (generation.clone(), cut.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for client in listener.incoming().flatten() {
                if cut_.load(SeqCst) {
                    held.push(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let born = gen_.load(SeqCst);
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (generation, delay) = (gen_.clone(), delay_.clone());
                    std::thread::spawn(move || relay(from, to, born, &generation, &delay));
                }
            }
        });
        Self {
            port,
            generation,
            cut,
            delay_ms,
        }
    }

    /// Every chunk waits `delay` before it is passed on, either way: a round trip takes
    /// twice that longer.
    pub fn slow(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).expect("a delay in milliseconds");
        self.delay_ms.store(ms, SeqCst);
    }

    pub fn cut(&self) {
        self.cut.store(true, SeqCst);
        self.generation.fetch_add(1, SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, SeqCst);
        self.delay_ms.store(0, SeqCst);
    }
}

/// Copies bytes until either side closes, and passes the close on (a server that stops
/// closes its clients' connections); drops them once the network was cut after this
/// connection was opened, and then passes nothing on, not even the close.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    born: u64,
    generation: &AtomicU64,
    delay_ms: &AtomicU64,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        std::thread::sleep(Duration::from_millis(delay_ms.load(SeqCst)));
        if generation.load(SeqCst) == born && to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if generation.load(SeqCst) == born {
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}
