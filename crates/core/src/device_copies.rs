//! Values a layout derives for one device (its arrays uploaded there), kept with the layout
//! so that each is made once per `(layout, device)` and freed when the layout is dropped.

use std::any::Any;
use std::sync::{Arc, Mutex};

type Entry = (Box<dyn Any + Send + Sync>, Arc<dyn Any + Send + Sync>);

/// A small map from device keys to the values made for them (a layout lives on few
/// devices, so a list scanned in order).
#[derive(Default)]
pub(crate) struct DeviceCopies(Mutex<Vec<Entry>>);

impl DeviceCopies {
    /// The value of type `T` made for `key`, made by `make` on first use. A failed `make`
    /// stores nothing.
    ///
    /// # Errors
    /// What `make` returns.
    pub fn get_or_try_make<K, T, E>(
        &self,
        key: &K,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E>
    where
        K: PartialEq + Clone + Send + Sync + 'static,
        T: Send + Sync + 'static,
    {
        let mut copies = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = copies.iter().find_map(|(k, value)| {
            let same = k.downcast_ref::<K>().is_some_and(|k| k == key);
            same.then(|| Arc::clone(value).downcast::<T>().ok())
                .flatten()
        });
        if let Some(value) = found {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        copies.push((Box::new(key.clone()), value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_makes_its_value_once() {
        let copies = DeviceCopies::default();
        let mut made = 0;
        for key in [1u32, 2, 1, 2, 1] {
            let value = copies
                .get_or_try_make(&key, || {
                    made += 1;
                    Ok::<_, ()>(key * 10)
                })
                .unwrap();
            assert_eq!(*value, key * 10);
        }
        assert_eq!(made, 2);
        // A failure stores nothing: the next call makes the value.
        assert_eq!(
            copies.get_or_try_make(&3u32, || Err::<u32, _>("no")),
            Err("no")
        );
        assert_eq!(
            *copies.get_or_try_make(&3u32, || Ok::<_, ()>(7)).unwrap(),
            7
        );
        // Another key type is another key.
        assert_eq!(
            *copies.get_or_try_make(&1u64, || Ok::<_, ()>(5u8)).unwrap(),
            5
        );
    }
}
