//! The store behind `response_format: "url"`: PNGs kept in memory under unguessable ids
//! for a limited time, with a cap on the bytes held (the oldest go first).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pipeline::OutputFormat;

/// How long an image URL stays valid.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Memory for images served by URL unless configured (`--url-store-mb`), in MiB.
pub const DEFAULT_STORE_MB: usize = 512;

struct Entry {
    png: bytes::Bytes,
    /// What the bytes are, for the answer's Content-Type.
    format: OutputFormat,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Ids in insertion order, which is also expiry order (one TTL for all).
    order: VecDeque<String>,
    bytes: usize,
}

impl Inner {
    fn evict_oldest(&mut self) -> bool {
        let Some(id) = self.order.pop_front() else {
            return false;
        };
        if let Some(e) = self.entries.remove(&id) {
            self.bytes -= e.png.len();
        }
        true
    }

    fn evict_expired(&mut self, now: Instant) {
        while let Some(id) = self.order.front() {
            match self.entries.get(id) {
                Some(e) if e.expires > now => break,
                _ => {
                    self.evict_oldest();
                }
            }
        }
    }
}

/// In-memory PNGs by id, each valid for `ttl`, at most `max_bytes` in all.
pub struct ImageStore {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_bytes: usize,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("ttl", &self.ttl)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// An empty store.
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every update is complete
        // before the next one starts.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `png` and returns its id, evicting expired and then the oldest images to
    /// make room. `None` when the image alone is larger than the store.
    pub fn insert(&self, png: Vec<u8>) -> Option<String> {
        self.insert_as(png, OutputFormat::Png)
    }

    /// Stores an image file of `format` (see [`insert`](Self::insert)).
    pub fn insert_as(&self, png: Vec<u8>, format: OutputFormat) -> Option<String> {
        if png.len() > self.max_bytes {
            return None;
        }
        let id = new_id();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.evict_expired(now);
        while inner.bytes + png.len() > self.max_bytes && inner.evict_oldest() {}
        inner.bytes += png.len();
        inner.order.push_back(id.clone());
        inner.entries.insert(
            id.clone(),
            Entry {
                png: png.into(),
                format,
                expires: now + self.ttl,
            },
        );
        Some(id)
    }

    /// The PNG stored under `id`, unless it expired or was evicted.
    pub fn get(&self, id: &str) -> Option<bytes::Bytes> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.evict_expired(now);
        inner.entries.get(id).map(|e| e.png.clone())
    }

    /// The image file stored under `id` and its format, unless it expired or was evicted.
    pub fn get_file(&self, id: &str) -> Option<(bytes::Bytes, OutputFormat)> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.evict_expired(now);
        inner.entries.get(id).map(|e| (e.png.clone(), e.format))
    }

    /// Images held and their total size in bytes.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

/// 128 random bits as 32 hex digits: an id nobody can guess.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to a clock- and counter-derived id (unique, if
        // guessable).
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_stays_bounded() {
        let store = ImageStore::new(Duration::from_millis(50), 10);
        let a = store.insert(vec![1; 4]).expect("fits");
        let b = store.insert(vec![2; 4]).expect("fits");
        assert_eq!(store.get(&a).as_deref(), Some(&[1u8; 4][..]));
        let c = store.insert(vec![3; 4]).expect("fits");
        assert!(
            store.get(&a).is_none(),
            "oldest evicted to stay under the cap"
        );
        assert!(store.get(&b).is_some() && store.get(&c).is_some());
        assert_eq!(store.usage(), (2, 8));
        assert!(store.insert(vec![0; 11]).is_none(), "larger than the store");
        std::thread::sleep(Duration::from_millis(80));
        assert!(store.get(&b).is_none(), "expired");
        assert_eq!(store.usage(), (0, 0));
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 32);
    }
}
