//! Per-thread batching of hand-overs: what a request leaves behind (its request-log row, its
//! metrics) is gathered in a buffer of the thread that served it and handed on as one batch —
//! when [`PerThread::max`] items wait, or [`PerThread::every`] after the first one — instead of
//! waking another thread per request.
//!
//! Only threads with an actix runtime (the HTTP workers) batch: the timer is a local task. On
//! any other thread each item is handed on at once. A thread's buffer is handed on when the
//! thread ends, and [`PerThread::pending`] counts the threads holding items, so a shutdown or a
//! flush can wait for them.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Receives one batch (on the thread that gathered it).
pub type Sink<T> = Arc<dyn Fn(Vec<T>) + Send + Sync>;

/// A batching channel to `sink`, one buffer per thread. Cheap to clone.
pub struct PerThread<T> {
    id: u64,
    max: usize,
    every: Duration,
    sink: Sink<T>,
    pending: Arc<AtomicUsize>,
}

impl<T> Clone for PerThread<T> {
    fn clone(&self) -> Self {
        PerThread {
            id: self.id,
            max: self.max,
            every: self.every,
            sink: self.sink.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl<T> std::fmt::Debug for PerThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerThread")
            .field("id", &self.id)
            .field("max", &self.max)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// One thread's buffer for one [`PerThread`].
struct Slot<T> {
    items: Vec<T>,
    timer: bool,
    sink: Sink<T>,
    pending: Arc<AtomicUsize>,
}

impl<T> Slot<T> {
    fn take(&mut self) -> Vec<T> {
        if !self.items.is_empty() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        std::mem::take(&mut self.items)
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        // The thread ends: its items go on with it.
        let items = self.take();
        if !items.is_empty() {
            (self.sink)(items);
        }
    }
}

/// A thread-local whose contents hand their last items to actors when the thread ends (batches,
/// lease reports). Waking an actor then may find the runtime's own thread-locals already
/// destroyed, and tokio panics on that; a panic in a thread-local's destructor aborts the
/// process. This drops the contents under `catch_unwind` instead: the hand-over is queued all the
/// same (`do_send`), only its wake-up may be lost, and the process goes on.
pub(crate) struct OnThreadExit<T: Default>(pub(crate) RefCell<T>);

impl<T: Default> Drop for OnThreadExit<T> {
    fn drop(&mut self) {
        let contents = std::mem::take(self.0.get_mut());
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(contents)));
    }
}

thread_local! {
    static SLOTS: OnThreadExit<HashMap<u64, Box<dyn Any>>> = OnThreadExit(RefCell::new(HashMap::new()));
}

impl<T: 'static> PerThread<T> {
    /// Batches of at most `max` items, handed to `sink` at most `every` after their first item.
    pub fn new(max: usize, every: Duration, sink: impl Fn(Vec<T>) + Send + Sync + 'static) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PerThread {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            max: max.max(1),
            every,
            sink: Arc::new(sink),
            pending: Arc::default(),
        }
    }

    /// Threads holding items not yet handed on.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Adds `item` to this thread's batch (or hands it on at once on a thread without actix).
    pub fn push(&self, item: T) {
        if actix_rt::Arbiter::try_current().is_none() {
            (self.sink)(vec![item]);
            return;
        }
        let full = SLOTS.with(|slots| {
            let mut slots = slots.0.borrow_mut();
            let slot = slots
                .entry(self.id)
                .or_insert_with(|| {
                    Box::new(Slot {
                        items: Vec::new(),
                        timer: false,
                        sink: self.sink.clone(),
                        pending: self.pending.clone(),
                    })
                })
                .downcast_mut::<Slot<T>>()
                .expect("one item type per batcher");
            if slot.items.is_empty() {
                slot.items.reserve(self.max);
                self.pending.fetch_add(1, Ordering::AcqRel);
            }
            slot.items.push(item);
            if slot.items.len() >= self.max {
                return Some(slot.take());
            }
            if !slot.timer {
                slot.timer = true;
                let (me, every) = (self.clone(), self.every);
                actix_rt::spawn(async move {
                    actix_rt::time::sleep(every).await;
                    me.flush_thread();
                });
            }
            None
        });
        if let Some(items) = full {
            (self.sink)(items);
        }
    }

    /// Hands this thread's items on now.
    pub fn flush_thread(&self) {
        let items = SLOTS.with(|slots| {
            let mut slots = slots.0.borrow_mut();
            let slot = slots.get_mut(&self.id)?.downcast_mut::<Slot<T>>()?;
            slot.timer = false;
            Some(slot.take())
        });
        if let Some(items) = items.filter(|i| !i.is_empty()) {
            (self.sink)(items);
        }
    }

    /// Hands this thread's items on and waits (at most `limit`) until no thread holds any.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.flush_thread();
        let deadline = std::time::Instant::now() + limit;
        while self.pending() > 0 && std::time::Instant::now() < deadline {
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        self.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    fn collector() -> (Batches, PerThread<u32>) {
        let got: Batches = Arc::default();
        let sink = got.clone();
        let batcher = PerThread::new(3, Duration::from_millis(40), move |items| {
            sink.lock().unwrap().push(items)
        });
        (got, batcher)
    }

    #[actix_rt::test]
    async fn items_go_on_in_batches_when_full_or_when_the_time_is_up() {
        let (got, b) = collector();
        for i in 0..4 {
            b.push(i);
        }
        assert_eq!(
            *got.lock().unwrap(),
            vec![vec![0, 1, 2]],
            "a full batch at once"
        );
        assert_eq!(b.pending(), 1);
        actix_rt::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(
            got.lock().unwrap().last(),
            Some(&vec![3]),
            "the rest after `every`"
        );
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn without_actix_each_item_goes_on_at_once() {
        let (got, b) = collector();
        b.push(7);
        assert_eq!(*got.lock().unwrap(), vec![vec![7]]);
    }

    #[test]
    fn a_thread_that_ends_hands_on_what_it_held() {
        let (got, b) = collector();
        let b2 = b.clone();
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                b2.push(1);
                b2.push(2);
            })
        })
        .join()
        .unwrap();
        assert_eq!(*got.lock().unwrap(), vec![vec![1, 2]]);
        assert_eq!(b.pending(), 0);
    }
}
