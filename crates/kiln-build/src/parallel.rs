//! A fixed number of worker threads taking items from a slice in order, for network work
//! that mostly waits (downloads of cache hits, uploads of layers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Runs `f` on every item with at most `workers` threads; the first error is returned and
/// stops the workers from taking further items (those already started finish).
pub(crate) fn try_for_each<T: Sync, E: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<E>> = Mutex::new(None);
    let failed = || failure.lock().unwrap_or_else(PoisonError::into_inner).is_some();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(items.len()) {
            scope.spawn(|| {
                while !failed() {
                    let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if let Err(e) = f(item) {
                        failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_once_and_the_first_error_stops_the_rest() {
        let seen = Mutex::new(Vec::new());
        let all: Result<(), ()> = try_for_each(&[1, 2, 3, 4, 5], 2, |i| {
            seen.lock().unwrap_or_else(PoisonError::into_inner).push(*i);
            Ok(())
        });
        assert_eq!(all, Ok(()));
        let mut seen = seen.into_inner().unwrap_or_else(PoisonError::into_inner);
        seen.sort();
        assert_eq!(seen, [1, 2, 3, 4, 5]);

        let taken = AtomicUsize::new(0);
        let items: Vec<u32> = (0..100).collect();
        let err = try_for_each(&items, 1, |i| {
            taken.fetch_add(1, Ordering::Relaxed);
            if *i == 3 { Err(format!("item {i}")) } else { Ok(()) }
        });
        assert_eq!(err, Err("item 3".to_owned()));
        assert_eq!(taken.into_inner(), 4);
        assert_eq!(try_for_each(&[] as &[u32], 4, |_| Err(())), Ok(()));
    }
}
